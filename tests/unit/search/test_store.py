"""maskprop_search.store pieces without Redis: the LRU bound on cached sessions and the
counters a save stores (they must equal the library's progress)."""

from __future__ import annotations

import numpy as np
import pytest
from maskprop_search.store import Loaded, SessionCache, counters

from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import AnnotationSession, Answer
from maskprop.tree import Tree, build_tree


def _tree(n: int, seed: int = 0) -> Tree:
    rng = np.random.default_rng(seed)
    iou = rng.uniform(size=n)
    return build_tree(rng.normal(size=(n, 4)) + iou[:, None], np.clip(iou, 0, 1))


def _loaded(n: int, seed: int = 0) -> Loaded:
    tree = _tree(n, seed)
    session = AnnotationSession({0: tree}, AnnotationParams(), Selection(0.0, 0.7))
    return Loaded(1, 1, session, tree, masks=None)  # type: ignore[arg-type]


def test_the_cache_evicts_least_recently_used_classes_past_its_mask_bound() -> None:
    cache = SessionCache(max_masks=250)
    a, b, c = _loaded(100, 1), _loaded(100, 2), _loaded(100, 3)
    cache.put(("c", 0), a)
    cache.put(("c", 1), b)
    assert cache.masks == 200 and len(cache) == 2
    assert cache.get(("c", 0)) is a  # now the most recently used
    cache.put(("c", 2), c)  # 300 > 250: class 1, the least recently used, goes
    assert ("c", 1) not in cache and cache.get(("c", 1)) is None
    assert cache.get(("c", 0)) is a and cache.get(("c", 2)) is c
    assert cache.masks == 200
    cache.put(("c", 2), c)  # put again: counted once
    assert cache.masks == 200
    cache.drop(("c", 0))
    assert cache.masks == 100 and len(cache) == 1


def test_a_class_larger_than_the_bound_is_still_cached_alone() -> None:
    cache = SessionCache(max_masks=50)
    cache.put(("c", 0), _loaded(60, 1))
    assert len(cache) == 1
    big = _loaded(80, 2)
    cache.put(("c", 1), big)
    assert len(cache) == 1 and cache.get(("c", 1)) is big and cache.masks == 80
    with pytest.raises(ValueError):
        SessionCache(0)


def test_counters_follow_the_library_progress_through_a_whole_session() -> None:
    tree = _tree(400, 5)
    truth = np.random.default_rng(9).uniform(size=400) < 0.6
    session = AnnotationSession({0: tree}, AnnotationParams(), Selection(0.0, 0.7))
    accepted = rejected = 0
    steps = 0
    while not session.done:
        qs = session.lease(23)
        session.submit([Answer(0, q.node, q.mask, bool(truth[q.mask])) for q in qs])
        decisions = [d for d in session.pop_decisions() if d.terminal]
        if decisions:
            _, labels, _, _ = session.decisions_labels(decisions)
            accepted += int((labels == 1).sum())
            rejected += int((labels == 0).sum())
        p = session.progress()[0]
        open_, questions, c_acc, c_rej, done, ready = counters(session, 0)
        assert (accepted, rejected) == (p["accepted_masks"], p["rejected_masks"])
        assert open_ == p["open_clusters"] and questions == session.questions
        assert c_acc == session.outcomes.get("accept", 0)
        assert c_rej == session.outcomes.get("reject", 0) + session.outcomes.get("auto_reject", 0)
        assert done == int(session.done)
        assert (ready > 0) == session.has_questions()
        steps += 1
    assert steps > 3 and accepted + rejected == 400
