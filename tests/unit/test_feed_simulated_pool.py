"""``maskprop feed-simulated --big-class``'s pool (issue #15's scale campaign): class 0 holds
the big class, the other classes share the rest with ADE20K's long-tailed sizes, and the pool
is the same in every process that builds it (the benchmark rebuilds it for the crowd's truth
and the library's reference)."""

from __future__ import annotations

import numpy as np
import pytest

from maskprop.errors import MaskpropError
from maskprop_app.cmd_services import simulated_pool


def test_big_class_pool_has_the_asked_sizes_and_is_reproducible():
    pool = simulated_pool(6000, 8, seed=3, dim=8, big_class=2500)
    sizes = np.bincount(pool.class_ids, minlength=8)
    assert len(pool) == 6000 and sizes[0] == 2500
    assert sizes[1:].sum() == 3500 and (np.diff(sizes[1:]) <= 0).all()  # a long tail
    again = simulated_pool(6000, 8, seed=3, dim=8, big_class=2500)
    assert np.array_equal(pool.features, again.features)
    assert np.array_equal(pool.ious, again.ious)


def test_big_class_must_leave_masks_for_the_other_classes():
    with pytest.raises(MaskpropError):
        simulated_pool(1000, 4, seed=0, dim=8, big_class=1000)
    with pytest.raises(MaskpropError):
        simulated_pool(1000, 1, seed=0, dim=8, big_class=500)
