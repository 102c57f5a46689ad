"""The comparison methods of the paper's Fig. 8: manual polygons, naive verification, LSUN."""

from __future__ import annotations

import numpy as np
import pytest

from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.simulate.annotator import SimulatedAnnotator
from maskprop.simulate.baselines import lsun, manual_polygons, naive_verification
from maskprop.simulate.generator import ade_like_pool
from maskprop.simulate.pool import MaskPool

PARAMS = AnnotationParams()


@pytest.fixture(scope="module")
def pool() -> MaskPool:
    return ade_like_pool(n_masks=20000, n_classes=20, seed=11, dim=16)


def annotator_for(pool: MaskPool, error_rate: float = 0.0) -> SimulatedAnnotator:
    return SimulatedAnnotator(pool.ious, PARAMS.iou_threshold, error_rate=error_rate, seed=5)


def test_manual_polygons_draw_every_object(pool: MaskPool) -> None:
    result = manual_polygons(pool, PARAMS, seed=0)
    assert result.polygons == len(pool) and result.questions == 0
    assert result.clusters_annotated == 0 and result.obtained_mask_ids.size == 0
    assert result.obtained_ious.shape == (len(pool),)
    assert abs(result.obtained_ious.mean() - 0.9) < 0.005
    assert result.curve.quantity[-1] == len(pool)
    assert result.curve.hours[-1] == pytest.approx(len(pool) * 80 / 3600)
    again = manual_polygons(pool, PARAMS, seed=0)
    np.testing.assert_array_equal(result.obtained_ious, again.obtained_ious)
    with pytest.raises(MaskpropError, match="polygon_iou_mean"):
        manual_polygons(pool, PARAMS, seed=0, polygon_iou_mean=1.0)


def test_naive_verification_without_errors_obtains_exactly_the_correct_masks(
    pool: MaskPool,
) -> None:
    annotator = annotator_for(pool)
    result = naive_verification(pool, annotator, PARAMS)
    assert result.questions == len(pool) == annotator.questions_answered
    assert result.polygons == 0 and result.clusters_annotated == 0
    correct = np.flatnonzero(pool.ious >= PARAMS.iou_threshold)
    np.testing.assert_array_equal(np.sort(result.obtained_mask_ids), correct)
    np.testing.assert_array_equal(result.obtained_ious, pool.ious[result.obtained_mask_ids])
    # Asked by descending score, so obtained masks come out in that order.
    assert np.all(np.diff(pool.scores[result.obtained_mask_ids]) <= 0)
    assert result.curve.hours[-1] == pytest.approx(len(pool) * 2 / 3600)
    assert result.curve.quantity[-1] == correct.size


def test_naive_verification_with_errors_keeps_wrong_yeses(pool: MaskPool) -> None:
    result = naive_verification(pool, annotator_for(pool, 0.1), PARAMS)
    precision = (pool.ious[result.obtained_mask_ids] >= PARAMS.iou_threshold).mean()
    assert 0.8 < precision < 0.95


def test_lsun_is_consistent_and_deterministic(pool: MaskPool) -> None:
    annotator = annotator_for(pool)
    result = lsun(pool, annotator, PARAMS, seed=3)
    assert result.questions == annotator.questions_answered
    assert result.polygons == 0 and result.clusters_annotated == 0
    ids = result.obtained_mask_ids
    assert np.unique(ids).size == ids.size
    np.testing.assert_array_equal(result.obtained_ious, pool.ious[ids])
    assert result.curve.quantity[-1] == ids.size
    assert result.curve.hours[-1] == pytest.approx(result.questions * 2 / 3600)
    again = lsun(pool, annotator_for(pool), PARAMS, seed=3)
    np.testing.assert_array_equal(again.obtained_mask_ids, ids)
    assert again.questions == result.questions


def test_lsun_asks_less_than_naive_but_obtains_lower_precision(pool: MaskPool) -> None:
    naive = naive_verification(pool, annotator_for(pool), PARAMS)
    auto = lsun(pool, annotator_for(pool), PARAMS, seed=0)
    precision = {
        name: (pool.ious[r.obtained_mask_ids] >= PARAMS.iou_threshold).mean()
        for name, r in (("naive", naive), ("lsun", auto))
    }
    assert auto.questions < naive.questions
    assert precision["lsun"] < precision["naive"] == 1.0
    # It still auto-labels sensibly: most of what it keeps is correct.
    assert precision["lsun"] > 0.85


def test_lsun_verifies_a_class_whose_sample_has_one_answer() -> None:
    rng = np.random.default_rng(0)
    pool = MaskPool(
        features=rng.normal(size=(300, 4)).astype(np.float32),
        scores=rng.random(300).astype(np.float32),
        ious=np.full(300, 0.9, np.float32),  # everything correct: no negative to learn from
        class_ids=np.zeros(300, np.int32),
        class_names=("bed",),
    )
    result = lsun(pool, annotator_for(pool), PARAMS, seed=0)
    assert result.questions == 300 and result.obtained_mask_ids.size == 300


def test_lsun_with_a_sample_covering_the_class_verifies_it(pool: MaskPool) -> None:
    small = pool.subset(pool.class_indices(19)[:30])
    result = lsun(small, annotator_for(small), PARAMS, seed=0, min_samples=40)
    assert result.questions == 30


def test_bad_arguments_are_refused(pool: MaskPool) -> None:
    with pytest.raises(MaskpropError, match="annotator knows"):
        naive_verification(pool, SimulatedAnnotator(pool.ious[:10], 0.75), PARAMS)
    with pytest.raises(MaskpropError, match="sample_fraction"):
        lsun(pool, annotator_for(pool), PARAMS, seed=0, sample_fraction=0.0)
    with pytest.raises(MaskpropError, match="target_precision"):
        lsun(pool, annotator_for(pool), PARAMS, seed=0, target_precision=0.4)
