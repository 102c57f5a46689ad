"""The ADE-like generator, the prediction-table format and the fitted-mixture pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maskprop.errors import MaskpropError
from maskprop.simulate.generator import (
    ade_like_pool,
    ade_like_pool_with_components,
    fitted_pool,
    load_prediction_table,
    save_prediction_table,
    zipf_class_sizes,
)
from maskprop.simulate.pool import MaskPool


@pytest.fixture(scope="module")
def pool_and_components() -> tuple[MaskPool, np.ndarray]:
    return ade_like_pool_with_components(n_masks=30000, n_classes=20, seed=7, dim=16)


def test_same_seed_same_pool_other_seed_other_pool() -> None:
    a = ade_like_pool(3000, 6, seed=1, dim=8)
    b = ade_like_pool(3000, 6, seed=1, dim=8)
    c = ade_like_pool(3000, 6, seed=2, dim=8)
    for field in ("features", "scores", "ious", "class_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.ious, c.ious)
    assert not np.array_equal(a.features, c.features)


def test_shapes_dtypes_and_ranges() -> None:
    pool = ade_like_pool(2000, 5, seed=0, dim=8)
    assert pool.features.shape == (2000, 8) and pool.features.dtype == np.float32
    assert pool.scores.dtype == pool.ious.dtype == np.float32
    assert pool.class_ids.dtype == np.int32
    assert pool.class_names[:3] == ("person", "windowpane", "chair")
    assert 0.2 <= pool.scores.min() and pool.scores.max() <= 1.0
    assert 0.05 <= pool.ious.min() and pool.ious.max() <= 0.99


def test_many_classes_get_generic_names() -> None:
    pool = ade_like_pool(1500, 120, seed=0, dim=4)
    assert pool.class_names[0] == "class_000" and len(set(pool.class_names)) == 120


def test_class_sizes_sum_exactly_are_long_tailed_and_capped() -> None:
    sizes = zipf_class_sizes(200000, 100, max_class_size=30000)
    assert sizes.sum() == 200000
    assert sizes.max() <= 30000 and sizes.min() >= 10
    assert np.all(np.diff(sizes) <= 0)
    # Long tail: the largest class dwarfs the median one, the top tenth holds a large share.
    assert sizes[0] >= 20 * np.median(sizes)
    assert sizes[:10].sum() >= 0.4 * sizes.sum()


@pytest.mark.parametrize(
    ("n_masks", "n_classes"), [(10, 1), (17, 1), (1000, 3), (997, 7), (5000, 100)]
)
def test_class_sizes_sum_exactly_for_odd_totals(n_masks: int, n_classes: int) -> None:
    sizes = zipf_class_sizes(n_masks, n_classes, max_class_size=900)
    assert sizes.sum() == n_masks
    assert sizes.min() >= 10 and sizes.max() <= 900


def test_pool_follows_class_sizes() -> None:
    pool = ade_like_pool(5000, 8, seed=3, dim=4, max_class_size=1200)
    counts = np.bincount(pool.class_ids, minlength=8)
    np.testing.assert_array_equal(counts, zipf_class_sizes(5000, 8, max_class_size=1200))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_masks": 0, "n_classes": 3}, "n_masks"),
        ({"n_masks": 100, "n_classes": 0}, "n_classes"),
        ({"n_masks": 100, "n_classes": 3, "dim": 0}, "dim"),
        ({"n_masks": 25, "n_classes": 3}, "cannot split 25 masks"),
        ({"n_masks": 1000, "n_classes": 3, "max_class_size": 300}, "cannot split 1000"),
    ],
)
def test_impossible_pools_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(MaskpropError, match=message):
        ade_like_pool(seed=0, **kwargs)


def test_fig4_weak_per_mask_strong_per_cluster_correlation(
    pool_and_components: tuple[MaskPool, np.ndarray],
) -> None:
    pool, component = pool_and_components
    s, iou = pool.scores.astype(float), pool.ious.astype(float)
    per_mask = np.corrcoef(s, iou)[0, 1]
    count = np.bincount(component)
    big = count >= 20  # means of tiny groups are mostly sampling noise
    mean_s = np.bincount(component, s)[big] / count[big]
    mean_iou = np.bincount(component, iou)[big] / count[big]
    per_cluster = np.corrcoef(mean_s, mean_iou)[0, 1]
    assert 0.25 <= per_mask <= 0.55
    assert per_cluster >= 0.8
    assert per_cluster - per_mask >= 0.3


def test_share_of_correct_masks_and_impure_clusters_are_realistic(
    pool_and_components: tuple[MaskPool, np.ndarray],
) -> None:
    pool, component = pool_and_components
    correct = pool.ious >= 0.75
    assert 0.35 <= correct.mean() <= 0.55
    count = np.bincount(component)
    quality = np.bincount(component, correct)[count >= 20] / count[count >= 20]
    # Pure-good, pure-bad and impure groups all occur in numbers (paper Fig. 5).
    assert (quality >= 0.85).mean() >= 0.1
    assert (quality <= 0.15).mean() >= 0.1
    assert ((quality > 0.15) & (quality < 0.85)).mean() >= 0.25


def test_components_stay_within_their_class(
    pool_and_components: tuple[MaskPool, np.ndarray],
) -> None:
    pool, component = pool_and_components
    classes_of = np.zeros(component.max() + 1, dtype=np.int64) - 1
    classes_of[component] = pool.class_ids
    np.testing.assert_array_equal(classes_of[component], pool.class_ids)


def test_table_round_trip(tmp_path: Path) -> None:
    names = ("chest of drawers", 'odd, "quoted" name', "car")
    rng = np.random.default_rng(0)
    pool = MaskPool(
        features=rng.normal(size=(30, 3)).astype(np.float32),
        scores=rng.random(30).astype(np.float32),
        ious=rng.random(30).astype(np.float32),
        class_ids=np.array([2, 0, 1] * 10, dtype=np.int32),
        class_names=names,
    )
    path = tmp_path / "table.csv"
    save_prediction_table(pool, path)
    loaded = load_prediction_table(str(path))
    np.testing.assert_array_equal(loaded.features, pool.features)
    np.testing.assert_array_equal(loaded.scores, pool.scores)
    np.testing.assert_array_equal(loaded.ious, pool.ious)
    # Ids follow first appearance; the names per row are what must survive.
    assert loaded.class_names == ("car", "chest of drawers", 'odd, "quoted" name')
    assert [loaded.class_names[i] for i in loaded.class_ids] == [names[i] for i in pool.class_ids]


def test_table_columns_in_any_order_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("f1,iou,class,s,f0\n0.5,0.8,bed,0.9,1.5\n\n2,0.1,bed,0.3,-1\n")
    pool = load_prediction_table(path)
    np.testing.assert_array_equal(pool.features, np.array([[1.5, 0.5], [-1, 2]], np.float32))
    np.testing.assert_array_equal(pool.ious, np.array([0.8, 0.1], np.float32))
    assert pool.class_names == ("bed",)


GOOD_HEADER = "class,s,iou,f0,f1\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        (GOOD_HEADER, "no rows"),
        ("class,s,f0\nbed,0.5,1\n", r"line 1: missing column\(s\) iou"),
        ("class,s,iou\nbed,0.5,0.5\n", r"missing column\(s\) f0"),
        ("class,s,iou,f0,f2\nbed,0.5,0.5,1,2\n", "contiguous f0..f2, missing f1"),
        ("class,s,iou,f0,score\nbed,0.5,0.5,1,2\n", "unexpected column 'score'"),
        ("class,s,iou,f0,f0\nbed,0.5,0.5,1,2\n", "'f0' appears twice"),
        (GOOD_HEADER + "bed,0.5,0.5,1,2\nbed,0.5,0.5,1\n", "line 3: 4 fields"),
        (GOOD_HEADER + "bed,0.5,0.5,1,2\nbed,0.5,high,1,2\n", "line 3, column 'iou': 'high'"),
        (GOOD_HEADER + "bed,0.5,0.5,,2\n", "line 2, column 'f0': '' is not a number"),
        (GOOD_HEADER + "bed,0.5,0.5,1,nan\n", "line 2, column 'f1': nan is not a finite"),
        (GOOD_HEADER + "bed,0.5,0.5,inf,1\n", "line 2, column 'f0': inf is not a finite"),
        (GOOD_HEADER + "bed,1.5,0.5,1,1\n", r"line 2, column 's': 1.5 is outside \[0, 1\]"),
        (GOOD_HEADER + "bed,0.5,-0.1,1,1\n", r"column 'iou': -0.1 is outside"),
        (GOOD_HEADER + ",0.5,0.5,1,1\n", "line 2, column 'class': empty name"),
    ],
)
def test_malformed_tables_are_refused_with_the_place(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(MaskpropError, match=message) as caught:
        load_prediction_table(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MaskpropError, match="no such file"):
        load_prediction_table(tmp_path / "absent.csv")
    with pytest.raises(MaskpropError, match="cannot read"):
        load_prediction_table(tmp_path)  # a directory
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"class,s,iou,f0\n\xff\xfe,0.5,0.5,1\n")
    with pytest.raises(MaskpropError, match="not a UTF-8"):
        load_prediction_table(binary)


@pytest.fixture(scope="module")
def table() -> MaskPool:
    return ade_like_pool(600, 4, seed=5, dim=4)


def test_fitted_pool_follows_class_proportions_and_ranges(table: MaskPool) -> None:
    sampled = fitted_pool(table, n_masks=3000, seed=1, n_components=3)
    assert len(sampled) == 3000 and sampled.class_names == table.class_names
    assert sampled.features.shape == (3000, 4) and sampled.features.dtype == np.float32
    expected = 3000 * np.bincount(table.class_ids) / len(table)
    assert np.all(np.abs(np.bincount(sampled.class_ids) - expected) <= 1)
    assert 0.0 <= sampled.scores.min() and sampled.scores.max() <= 1.0
    assert 0.0 <= sampled.ious.min() and sampled.ious.max() <= 1.0
    # The joint distribution survives roughly: share of correct masks, score-IoU link.
    assert abs((sampled.ious >= 0.75).mean() - (table.ious >= 0.75).mean()) < 0.1
    assert np.corrcoef(sampled.scores, sampled.ious)[0, 1] > 0.15


def test_fitted_pool_is_reproducible(table: MaskPool) -> None:
    a = fitted_pool(table, n_masks=500, seed=4, n_components=2)
    b = fitted_pool(table, n_masks=500, seed=4, n_components=2)
    c = fitted_pool(table, n_masks=500, seed=5, n_components=2)
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.features, c.features)


def test_fitted_pool_refuses_a_class_with_one_row(table: MaskPool) -> None:
    index = np.concatenate([table.class_indices(0), table.class_indices(2)[:1]])
    with pytest.raises(MaskpropError, match="class 'chair' has 1 row"):
        fitted_pool(table.subset(index), n_masks=100, seed=0)
    with pytest.raises(MaskpropError, match="n_masks"):
        fitted_pool(table, n_masks=0, seed=0)
