"""The simulated verifier: truthful, consistent per mask, and counting its work."""

from __future__ import annotations

import numpy as np
import pytest

from maskprop.errors import MaskpropError
from maskprop.simulate.annotator import SimulatedAnnotator


@pytest.fixture
def ious() -> np.ndarray:
    return np.random.default_rng(0).random(20000).astype(np.float32)


def test_error_free_annotator_tells_the_truth(ious: np.ndarray) -> None:
    annotator = SimulatedAnnotator(ious, iou_threshold=0.75)
    ids = np.arange(ious.size)
    np.testing.assert_array_equal(annotator.answer(ids), ious >= 0.75)


def test_threshold_is_inclusive() -> None:
    annotator = SimulatedAnnotator(np.array([0.75, 0.7499], np.float32), iou_threshold=0.75)
    assert annotator.answer(np.array([0, 1])).tolist() == [True, False]


def test_error_rate_flips_that_share_of_answers(ious: np.ndarray) -> None:
    annotator = SimulatedAnnotator(ious, iou_threshold=0.75, error_rate=0.2, seed=3)
    wrong = annotator.answer(np.arange(ious.size)) != (ious >= 0.75)
    assert abs(wrong.mean() - 0.2) < 0.015


def test_same_mask_same_answer_whatever_the_order(ious: np.ndarray) -> None:
    ids = np.arange(ious.size)
    order = np.random.default_rng(1).permutation(ious.size)
    first = SimulatedAnnotator(ious, 0.75, error_rate=0.3, seed=9)
    second = SimulatedAnnotator(ious, 0.75, error_rate=0.3, seed=9)
    in_order = first.answer(ids)
    shuffled = np.empty_like(in_order)
    shuffled[order] = second.answer(order)
    np.testing.assert_array_equal(in_order, shuffled)
    # Asking again never changes a mind.
    np.testing.assert_array_equal(first.answer(ids[:100]), in_order[:100])


def test_counts_questions_and_time(ious: np.ndarray) -> None:
    annotator = SimulatedAnnotator(ious, 0.75, mean_seconds=1.5, seed=2)
    annotator.answer(np.arange(5000))
    annotator.answer(np.array([3, 3, 3]))
    annotator.answer(np.zeros(0, dtype=np.int64))
    assert annotator.questions_answered == 5003
    assert abs(annotator.seconds_spent / 5003 - 1.5) < 0.05


def test_timing_never_changes_answers(ious: np.ndarray) -> None:
    slow = SimulatedAnnotator(ious, 0.75, error_rate=0.1, mean_seconds=9.0, seed=4)
    fast = SimulatedAnnotator(ious, 0.75, error_rate=0.1, mean_seconds=0.5, seed=4)
    ids = np.arange(ious.size)
    np.testing.assert_array_equal(slow.answer(ids), fast.answer(ids))


@pytest.mark.parametrize(
    ("iou_threshold", "error_rate", "mean_seconds", "message"),
    [
        (0.75, -0.1, 2.0, "error_rate"),
        (0.75, 0.6, 2.0, "error_rate"),
        (0.75, 0.1, 0.0, "mean_seconds"),
        (0.0, 0.1, 2.0, "iou_threshold"),
    ],
)
def test_bad_settings_are_refused(
    ious: np.ndarray, iou_threshold: float, error_rate: float, mean_seconds: float, message: str
) -> None:
    with pytest.raises(MaskpropError, match=message):
        SimulatedAnnotator(ious, iou_threshold, error_rate, mean_seconds)


def test_bad_mask_ids_are_refused(ious: np.ndarray) -> None:
    annotator = SimulatedAnnotator(ious, 0.75)
    with pytest.raises(MaskpropError, match="out of range"):
        annotator.answer(np.array([ious.size]))
    with pytest.raises(MaskpropError, match="integer"):
        annotator.answer(np.array([0.5]))
    assert annotator.questions_answered == 0
