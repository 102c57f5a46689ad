import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster

from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.search import STRATEGIES, make_frontier, universal_cut
from maskprop.selection import Selection
from maskprop.session import AnnotationSession, Answer
from maskprop.tree import build_tree


def run_all(trees, ious, strategy, params, selection):
    session = AnnotationSession(trees, params, selection, strategy=strategy, seed=0)
    terminal = set()
    while not session.done:
        qs = session.lease(params.samples_per_cluster)
        session.submit(
            Answer(q.class_id, q.node, q.mask, bool(ious[q.class_id][q.mask] >= 0.75)) for q in qs
        )
        terminal |= {(d.class_id, d.node, d.outcome) for d in session.pop_decisions() if d.terminal}
    return terminal, {c: session.labels(c).copy() for c in trees}


@given(
    n=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=3),
    seed=st.integers(min_value=0, max_value=1000),
)
@settings(max_examples=25, deadline=None)
def test_every_strategy_ends_at_the_same_leaves(n, seed):
    # "All clusters annotated": no score-based selection, and N_s at least every cluster's size
    # so the estimated quality is the true one (Sec. 5.1, Fig. 6b protocol).
    rng = np.random.default_rng(seed)
    trees, ious = {}, {}
    for c, size in enumerate(n):
        ious[c] = rng.uniform(size=size)
        trees[c] = build_tree(rng.normal(size=(size, 3)), rng.uniform(size=size))
    params = AnnotationParams(samples_per_cluster=64, prior_accept_threshold=0.0)
    selection = Selection(0.0, 0.0)
    results = [run_all(trees, ious, s, params, selection) for s in STRATEGIES]
    first_leaves, first_labels = results[0]
    for leaves, labels in results[1:]:
        assert leaves == first_leaves
        for c in trees:
            np.testing.assert_array_equal(labels[c], first_labels[c])


def test_heuristic_pops_highest_score_first():
    prio = {0: np.array([0.1, 0.9, 0.5]), 1: np.array([0.95])}
    fr = make_frontier("heuristic", prio)
    fr.push_roots([(0, 0), (0, 1), (0, 2), (1, 0)])
    assert [fr.pop() for _ in range(4)] == [(1, 0), (0, 1), (0, 2), (0, 0)]


def test_dfs_heuristic_prefers_better_child_and_state_round_trips():
    prio = {0: np.array([0.2, 0.8, 0.0])}
    fr = make_frontier("dfs_heuristic", prio)
    fr.push_children((0, 2), [(0, 0), (0, 1)])
    again = make_frontier("dfs_heuristic", prio, fr.state())
    assert again.pop() == (0, 1)
    assert fr.pop() == (0, 1)


def test_unknown_strategy():
    with pytest.raises(MaskpropError, match="unknown search strategy"):
        make_frontier("best-first", {})


def test_universal_cut_matches_scipy_maxclust():
    rng = np.random.default_rng(4)
    tree = build_tree(rng.normal(size=(200, 4)), rng.uniform(size=200))
    for k in (1, 2, 7, 50, 200):
        nodes = universal_cut(tree, k)
        ours = {frozenset(tree.leaves(int(j)).tolist()) for j in nodes}
        flat = fcluster(tree.to_linkage(), k, criterion="maxclust")
        ref = {frozenset(np.flatnonzero(flat == lab).tolist()) for lab in np.unique(flat)}
        assert ours == ref
