"""The per-class generator behind the simulation at scale: class sizes shaped like ADE20K,
classes generated on their own (same class whatever else exists), float32 throughout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskprop.errors import MaskpropError
from maskprop.simulate.generator import (
    ADE_THING_CLASSES,
    ADE_TRAIN_IMAGES,
    ade_class_sizes,
    ade_like_class,
)


def test_every_thing_class_has_an_ade_frequency() -> None:
    assert set(ADE_TRAIN_IMAGES) == set(ADE_THING_CLASSES)
    assert all(v > 0 for v in ADE_TRAIN_IMAGES.values())


def test_paper_scale_sizes_are_long_tailed_like_ade() -> None:
    sizes = ade_class_sizes(100_000_000, 100)
    assert sizes.sum() == 100_000_000
    assert np.all(np.diff(sizes) <= 0)
    # Largest classes several million, smallest tens of thousands (ADE20K's ratio ~130x).
    assert 3_000_000 <= sizes[0] <= 10_000_000
    assert 10_000 <= sizes[-1] <= 100_000
    counts = np.sort(np.array(list(ADE_TRAIN_IMAGES.values())))[::-1]
    assert sizes[0] / sizes[-1] == pytest.approx(counts[0] / counts[-1], rel=0.01)


@settings(max_examples=50, deadline=None)
@given(n_classes=st.integers(1, 300), extra=st.integers(0, 10**9))
def test_sizes_sum_exactly_and_respect_the_floor(n_classes: int, extra: int) -> None:
    n_masks = 10 * n_classes + extra
    sizes = ade_class_sizes(n_masks, n_classes)
    assert sizes.shape == (n_classes,)
    assert int(sizes.sum()) == n_masks
    assert sizes.min() >= 10
    assert np.all(np.diff(sizes) <= 0)


def test_too_few_masks_for_the_classes_are_refused() -> None:
    with pytest.raises(MaskpropError, match="cannot split 50 masks into 10 classes"):
        ade_class_sizes(50, 10)
    with pytest.raises(MaskpropError, match="n_classes"):
        ade_class_sizes(50, 0)


def test_a_class_is_the_same_whatever_else_is_generated() -> None:
    a = ade_like_class(3, 5000, seed=11, dim=8)
    ade_like_class(0, 7000, seed=11, dim=8)  # another class in between changes nothing
    b = ade_like_class(3, 5000, seed=11, dim=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = ade_like_class(4, 5000, seed=11, dim=8)
    assert not np.array_equal(a[1], c[1])


def test_class_arrays_are_float32_and_in_range() -> None:
    features, scores, ious, component = ade_like_class(0, 70_000, seed=0, dim=16)
    assert features.dtype == scores.dtype == ious.dtype == np.float32
    assert features.shape == (70_000, 16) and np.isfinite(features).all()
    assert 0.2 <= scores.min() and scores.max() <= 1.0
    assert 0.08 <= ious.min() and ious.max() <= 0.98
    # A large class keeps the Fig. 4 structure: weak per mask, strong per group.
    per_mask = np.corrcoef(scores, ious)[0, 1]
    count = np.bincount(component)
    big = count >= 20
    mean_s = np.bincount(component, scores)[big] / count[big]
    mean_iou = np.bincount(component, ious)[big] / count[big]
    assert per_mask < 0.6
    assert np.corrcoef(mean_s, mean_iou)[0, 1] >= 0.8


def test_bad_class_arguments_are_refused() -> None:
    with pytest.raises(MaskpropError, match="at least 1 mask"):
        ade_like_class(0, 0, seed=0)
    with pytest.raises(MaskpropError, match="dim"):
        ade_like_class(0, 10, seed=0, dim=0)
