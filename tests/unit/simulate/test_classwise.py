"""The simulation class by class: vectorised tree paths against plain loops, search curves
against the library's frontiers, additive statistics against ``metrics.summarize``, and the
whole run reproducible for a seed whatever the number of workers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskprop.errors import MaskpropError
from maskprop.metrics import summarize
from maskprop.params import AnnotationParams
from maskprop.search import make_frontier
from maskprop.simulate.classwise import (
    AdeSource,
    BinnedLog,
    IouStats,
    _parents,
    bottleneck,
    class_bytes,
    depth,
    plan_workers,
    preorder,
    searched,
    simulate_classes,
    summarize_stats,
)
from maskprop.simulate.result import MethodResult, sample_curve
from maskprop.tree import Tree, build_tree

PARAMS = AnnotationParams(prior_accept_threshold=0.7, prior_reject_threshold=None)


def _tree(n: int, seed: int) -> tuple[Tree, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 3)) + rng.integers(0, 4, n)[:, None] * 3.0
    s = rng.random(n)
    return build_tree(f, s), rng.random(n)


def _ancestors(tree: Tree, node: int) -> list[int]:
    path = [node]
    while path[-1] != tree.root:
        path.append(int(tree.parent[path[-1]]))
    return path


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 120), seed=st.integers(0, 10**6))
def test_path_reductions_equal_walking_up_the_tree(n: int, seed: int) -> None:
    tree, _ = _tree(n, seed)
    parent = _parents(tree)
    priority = tree.cluster_scores()
    low = bottleneck(priority, parent)
    d = depth(parent)
    for node in range(tree.n_nodes):
        path = _ancestors(tree, node)
        assert low[node] == min(priority[v] for v in path)
        assert d[node] == len(path) - 1
    # Pre-order, left child first: what a depth-first walk visits.
    walk, stack = [], [tree.root]
    while stack:
        v = stack.pop()
        walk.append(v)
        if not tree.is_leaf(v):
            left, right = tree.children(v)
            stack += [right, left]
    rank = preorder(tree, parent)
    assert rank[walk].tolist() == list(range(tree.n_nodes))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 150), seed=st.integers(0, 10**6), accept=st.sampled_from([0.6, 0.85]))
def test_searched_clusters_and_heuristic_order_match_the_frontier(
    n: int, seed: int, accept: float
) -> None:
    tree, iou = _tree(n, seed)
    quality = tree.subtree_sum((iou >= 0.5).astype(float)) / tree.size
    priority = tree.cluster_scores()
    popped, gain = searched(tree, quality, accept, _parents(tree))
    low = bottleneck(priority, _parents(tree))
    for strategy in ("heuristic", "bfs", "dfs"):
        frontier = make_frontier(strategy, {0: priority})
        frontier.push_roots([(0, tree.root)])
        order, obtained = [], 0
        while len(frontier):
            _, node = frontier.pop()
            order.append(node)
            q = quality[node]
            if q >= accept - 1e-12:
                obtained += int(tree.size[node])
            elif q > 1.0 - accept + 1e-12 and not tree.is_leaf(node):
                frontier.push_children((0, node), [(0, c) for c in tree.children(node)])
        assert sorted(order) == np.flatnonzero(popped).tolist()
        assert obtained == int(gain.sum())
        if strategy == "heuristic":
            # A best-first search pops in decreasing bottleneck priority (ties aside).
            assert np.all(np.diff(low[order]) <= 1e-12)
        if strategy == "dfs":
            assert np.all(np.diff(preorder(tree, _parents(tree))[order]) > 0)


def test_stats_summary_equals_metrics_summarize() -> None:
    rng = np.random.default_rng(0)
    ious = rng.random(500).astype(np.float32)
    result = MethodResult(
        name="x",
        obtained_ious=ious,
        questions=321,
        polygons=7,
        clusters_annotated=12,
        curve=sample_curve(np.arange(3.0), np.array([0.5, np.nan, 0.9])),
    )
    half = IouStats.of(ious[:200], PARAMS.iou_threshold) + IouStats.of(
        ious[200:], PARAMS.iou_threshold
    )
    ours = summarize_stats(half, 321, 7, 12, PARAMS)
    theirs = summarize(result, PARAMS)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value), key


def test_binned_logs_add_like_one_log() -> None:
    rng = np.random.default_rng(1)
    bins = rng.integers(0, 50, 300)
    sec, iou = rng.random(300), rng.random(300)
    got = rng.integers(0, 2, 300)
    whole = BinnedLog.of(bins, sec, iou * got, got)
    parts = BinnedLog.of(bins[:100], sec[:100], (iou * got)[:100], got[:100]) + BinnedLog.of(
        bins[100:], sec[100:], (iou * got)[100:], got[100:]
    )
    for a, b in zip(
        (whole.seconds, whole.quantity, whole.iou_sum),
        (parts.seconds, parts.quantity, parts.iou_sum),
        strict=True,
    ):
        np.testing.assert_allclose(a, b)
    curve = whole.curve()
    assert curve.quantity[-1] == got.sum()
    assert np.all(np.diff(curve.hours) >= 0)


def _run(seed: int, workers: int) -> dict:
    source = AdeSource(2500, 2000, 5, seed=seed, feature_dim=8)
    report = simulate_classes(source, PARAMS, seed=seed, ablation=False, workers=workers).report
    assert report["config"].pop("workers") == workers
    return report


def test_simulation_is_reproducible_for_a_seed_whatever_the_workers() -> None:
    one = _run(3, workers=1)
    assert one == _run(3, workers=1)
    assert one == _run(3, workers=2)
    assert one != _run(4, workers=1)
    assert one["config"]["masks"] == 2500
    assert one["maskprop"]["questions"] > 0


def test_a_class_too_large_for_memory_is_one_clear_error() -> None:
    sizes = np.array([10**10, 10])
    with pytest.raises(MaskpropError, match=r"largest class \(10,000,000,000 masks\) needs"):
        plan_workers(sizes, 32, 2, budget=16 * 2**30)
    assert plan_workers(np.array([1000, 10]), 32, 2, budget=16 * 2**30) == 2
    assert class_bytes(10**6, 32) < class_bytes(10**7, 32)


def test_ade_source_splits_every_class_into_pool_and_heldout() -> None:
    from maskprop.simulate.generator import ade_class_sizes, ade_like_class

    source = AdeSource(20_000, 2_000, 7, seed=5, feature_dim=4)
    sizes, held = source.sizes(), source.heldout_sizes()
    assert int(sizes.sum()) == 20_000 and int(held.sum()) == 2_000
    np.testing.assert_array_equal(sizes + held, ade_class_sizes(22_000, 7))
    pool, heldout = source.get(2)
    assert (len(pool), len(heldout)) == (sizes[2], held[2])
    whole = ade_like_class(2, int(sizes[2] + held[2]), seed=5, dim=4)[1]
    both = np.sort(np.concatenate([pool.scores, heldout.scores]))
    np.testing.assert_array_equal(both, np.sort(whole))


def test_a_simulated_session_labels_the_same_whatever_clusters_a_round_opens(monkeypatch) -> None:
    """A decision is a function of its cluster (sample, answers, inherited answers), so opening
    one cluster a round (Algorithm 1's strict order) and opening many at once decide the same
    clusters the same way; and a decision's place on the curves is its node's bin, so the
    curves agree too.  Every sequential rule and label reuse, on and off, is run."""
    import maskprop.simulate.classwise as classwise

    def run(round_clusters: int) -> dict:
        monkeypatch.setattr(classwise, "_ROUND_CLUSTERS", round_clusters)
        source = AdeSource(6000, 2000, 4, seed=2, feature_dim=8)
        return simulate_classes(source, PARAMS, seed=2, ablation=True, workers=1).report

    def close(a: object, b: object) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a if k != "config")
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, float) and isinstance(b, float):
            return a == pytest.approx(b, rel=1e-12, abs=1e-12, nan_ok=True)
        return a == b

    one = run(1)
    assert one["maskprop"]["questions"] > 0 and one["ablation"]
    for k in (3, 1024):
        assert close(run(k), one), k


@pytest.mark.parametrize(
    ("change", "error", "replays"),
    [
        ({}, 0.0, True),
        ({"samples_per_cluster": 10, "sequential_batch": 4}, 0.1, True),
        ({"reject_action": "split", "sequential_batch": 1}, 0.05, True),
        # A posterior this loose decides some clusters unlike the fixed rule: beta runs its
        # own session.
        ({"sequential_confidence": 0.6}, 0.0, False),
    ],
)
def test_sequential_rules_without_reuse_read_off_the_fixed_run_equal_their_sessions(
    monkeypatch, change: dict, error: float, replays: bool
) -> None:
    """The curtailed and beta runs without reuse are read off the fixed-N_s run's answers
    (``_replay_sequential``) where every decision agrees; the report is the one their own
    session runs give, to the last bin of every curve."""
    import maskprop.simulate.classwise as classwise

    params = AnnotationParams(prior_accept_threshold=0.7, prior_reject_threshold=None, **change)
    real_replay = classwise._replay_sequential
    outcomes: list[str] = []

    def spy(fixed, trace, bins, p):  # type: ignore[no-untyped-def]
        out = real_replay(fixed, trace, bins, p)
        outcomes.append(f"{p.sequential}:{'replayed' if out is not None else 'refused'}")
        return out

    def run() -> dict:
        source = AdeSource(8000, 2000, 4, seed=6, feature_dim=8)
        return simulate_classes(
            source, params, seed=6, annotator_error=error, ablation=True, workers=1
        ).report

    monkeypatch.setattr(classwise, "_replay_sequential", spy)
    replayed = run()
    assert "curtail:replayed" in outcomes and "curtail:refused" not in outcomes
    assert ("beta:refused" not in outcomes) == replays
    assert any(o.startswith("beta:") for o in outcomes)
    monkeypatch.setattr(classwise, "_replay_sequential", lambda *a: None)
    sessions = run()
    assert replayed == sessions
    rows = replayed["ablation"]
    assert rows["curtail"]["quantity"] == rows["paper_fixed_ns"]["quantity"]
    assert rows["curtail"]["questions"] < rows["paper_fixed_ns"]["questions"]
