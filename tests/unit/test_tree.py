import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist

from maskprop.errors import MaskpropError
from maskprop.tree import Tree, build_tree, condensed_distances, embed, from_linkage


def clusters_of(z: np.ndarray, n: int) -> set[frozenset[int]]:
    """Every cluster of a linkage matrix as a set of leaves: equal sets = same tree."""
    members: dict[int, frozenset[int]] = {i: frozenset([i]) for i in range(n)}
    out = set()
    for i, (a, b, _, _) in enumerate(z):
        members[n + i] = members[int(a)] | members[int(b)]
        out.add(members[n + i])
    return out


@pytest.mark.parametrize("n,d", [(2, 3), (50, 4), (700, 16)])
def test_tree_equals_scipy_complete_linkage_up_to_relabelling(n, d):
    rng = np.random.default_rng(n)
    f = rng.normal(size=(n, d))
    s = rng.uniform(size=n)
    tree = build_tree(f, s)
    z_ref = linkage(embed(f, s), method="complete")
    assert clusters_of(tree.to_linkage(), n) == clusters_of(z_ref, n)
    np.testing.assert_allclose(np.sort(tree.height[n:]), np.sort(z_ref[:, 2]), rtol=1e-9)


def test_gemm_distances_match_pdist():
    x = np.random.default_rng(1).normal(size=(300, 33))
    np.testing.assert_allclose(condensed_distances(x), pdist(x), atol=1e-10)


@given(st.integers(min_value=1, max_value=60), st.integers(min_value=0, max_value=10_000))
@settings(max_examples=40, deadline=None)
def test_tree_invariants(n, seed):
    rng = np.random.default_rng(seed)
    s = rng.uniform(size=n)
    tree = build_tree(rng.normal(size=(n, 3)), s)
    assert tree.n_nodes == 2 * n - 1
    assert tree.size[tree.root] == n
    assert sorted(tree.leaves(tree.root).tolist()) == list(range(n))
    for node in range(n, tree.n_nodes):
        a, b = tree.children(node)
        assert tree.parent[a] == node and tree.parent[b] == node
        assert set(tree.leaves(node).tolist()) == set(tree.leaves(a).tolist()) | set(
            tree.leaves(b).tolist()
        )
    np.testing.assert_allclose(tree.cluster_scores()[tree.root], s.mean())


def test_deep_chain_needs_no_recursion():
    # A caterpillar tree 100k levels deep: recursion would blow Python's stack.
    n = 100_000
    z = np.zeros((n - 1, 4))
    z[:, 0] = np.r_[0, np.arange(n, 2 * n - 2)]
    z[:, 1] = np.arange(1, n)
    z[:, 2] = np.arange(1, n)
    z[:, 3] = np.arange(2, n + 1)
    tree = from_linkage(z, np.linspace(0, 1, n))
    assert tree.size[tree.root] == n
    assert tree.leaves(n)[:2].tolist() == [0, 1]
    np.testing.assert_allclose(tree.cluster_scores()[tree.root], 0.5)


def test_arrays_round_trip():
    rng = np.random.default_rng(3)
    t = build_tree(rng.normal(size=(40, 2)), rng.uniform(size=40))
    t2 = Tree.from_arrays(t.to_arrays())
    for name in ("left", "right", "parent", "size", "order", "start"):
        np.testing.assert_array_equal(getattr(t, name), getattr(t2, name))


def test_bad_input_is_a_clear_error():
    with pytest.raises(MaskpropError):
        build_tree(np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(MaskpropError):
        build_tree(np.array([[np.nan], [1.0]]), np.array([0.1, 0.2]))
    with pytest.raises(MaskpropError):
        from_linkage(np.zeros((3, 4)), np.zeros(2))
