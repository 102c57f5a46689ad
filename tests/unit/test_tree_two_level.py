"""The scalable (two-level) tree: same array format, exact inside blocks, bad input refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, is_isomorphic, is_monotonic, is_valid_linkage

import maskprop.tree as tree_mod
from maskprop.errors import MaskpropError
from maskprop.tree import Tree, build_tree, from_linkage


def clusters_of(z: np.ndarray, n: int) -> set[frozenset[int]]:
    members: dict[int, frozenset[int]] = {i: frozenset([i]) for i in range(n)}
    out = set()
    for i, (a, b, _, _) in enumerate(z):
        members[n + i] = members[int(a)] | members[int(b)]
        out.add(members[n + i])
    return out


def assert_full_binary_tree(t: Tree, n: int) -> None:
    z = t.to_linkage()
    assert t.n_nodes == 2 * n - 1 and t.n_leaves == n
    assert sorted(t.leaves(t.root).tolist()) == list(range(n))
    if n == 1:
        return
    assert is_valid_linkage(z) and is_monotonic(z)
    internal = np.arange(n, 2 * n - 1)
    assert (t.left[internal] < internal).all() and (t.right[internal] < internal).all()
    assert (t.parent[t.left[internal]] == internal).all()
    assert (t.parent[t.right[internal]] == internal).all()
    np.testing.assert_array_equal(
        t.size[internal], t.size[t.left[internal]] + t.size[t.right[internal]]
    )
    # Leaves of a node are its left child's leaves followed by its right child's.
    np.testing.assert_array_equal(t.start[t.left[internal]], t.start[internal])
    np.testing.assert_array_equal(
        t.start[t.right[internal]], t.start[internal] + t.size[t.left[internal]]
    )


def test_two_level_equals_exact_when_the_class_fits_one_block():
    rng = np.random.default_rng(0)
    f, s = rng.normal(size=(180, 5)), rng.uniform(size=180)
    exact = build_tree(f, s, method="exact").to_linkage()
    two = build_tree(f, s, method="two_level", block_size=100).to_linkage()
    assert clusters_of(two, 180) == clusters_of(exact, 180)
    for k in (2, 5, 20, 60):
        assert is_isomorphic(
            fcluster(exact, k, criterion="maxclust"), fcluster(two, k, criterion="maxclust")
        )


def test_one_mask_fragments_give_the_exact_tree():
    # Every mask its own fragment: the block level is complete linkage over single masks with
    # their exact distances, i.e. the exact tree, whatever the blocks were.
    rng = np.random.default_rng(5)
    f, s = rng.normal(size=(300, 4)), rng.uniform(size=300)
    exact = build_tree(f, s, method="exact").to_linkage()
    two = build_tree(f, s, method="two_level", block_size=40, fragments=300, workers=1)
    assert clusters_of(two.to_linkage(), 300) == clusters_of(exact, 300)
    np.testing.assert_allclose(two.to_linkage()[:, 2], exact[:, 2], rtol=1e-5)


def test_fragments_default_to_blocks_below_their_floor():
    # fragments=0 (or fewer than the blocks) links whole blocks, as before fragments existed.
    rng = np.random.default_rng(6)
    f, s = rng.normal(size=(400, 3)), rng.uniform(size=400)
    a = build_tree(f, s, method="two_level", block_size=30, fragments=0, workers=1)
    b = build_tree(f, s, method="two_level", block_size=30, fragments=1, workers=1)
    np.testing.assert_array_equal(a.to_linkage(), b.to_linkage())
    assert_full_binary_tree(a, 400)


@given(
    n=st.integers(min_value=1, max_value=130),
    block_size=st.integers(min_value=2, max_value=24),
    fragments=st.one_of(st.none(), st.integers(min_value=0, max_value=140)),
    seed=st.integers(min_value=0, max_value=10_000),
)
@settings(max_examples=80, deadline=None)
def test_every_two_level_tree_is_a_full_binary_tree(n, block_size, fragments, seed):
    # Sizes straddle block boundaries: n around 1x, 2x, 3x ... block_size; fragments from
    # one a block to one a mask.
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 3))
    s = rng.uniform(size=n)
    t = build_tree(
        f,
        s,
        method="two_level",
        block_size=block_size,
        representatives=3,
        workers=1,
        fragments=fragments,
    )
    assert_full_binary_tree(t, n)
    np.testing.assert_allclose(t.cluster_scores()[t.root], s.mean())


@pytest.mark.parametrize("fragments", [0, 300])
def test_parallel_blocks_give_the_same_tree(fragments):
    rng = np.random.default_rng(2)
    f, s = rng.normal(size=(900, 6)), rng.uniform(size=900)
    kw = {"method": "two_level", "block_size": 40, "fragments": fragments}
    one = build_tree(f, s, workers=1, **kw).to_linkage()
    two = build_tree(f, s, workers=2, **kw).to_linkage()
    np.testing.assert_array_equal(one, two)
    assert_full_binary_tree(build_tree(f, s, workers=2, **kw), 900)


def test_auto_is_exact_below_the_documented_size():
    rng = np.random.default_rng(3)
    f, s = rng.normal(size=(300, 4)), rng.uniform(size=300)
    auto = build_tree(f, s, block_size=20).to_linkage()
    exact = build_tree(f, s, method="exact").to_linkage()
    assert 300 <= tree_mod.AUTO_EXACT_MAX
    np.testing.assert_array_equal(auto, exact)


def loop_from_linkage_starts(z: np.ndarray, n: int) -> np.ndarray:
    """The reference: sizes and starts by Python loops, as the module did before."""
    size = np.ones(2 * n - 1, dtype=np.int64)
    for i, (a, b, _, _) in enumerate(z):
        size[n + i] = size[int(a)] + size[int(b)]
    start = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 2, n - 1, -1):
        a, b = int(z[node - n, 0]), int(z[node - n, 1])
        start[a] = start[node]
        start[b] = start[node] + size[a]
    return start


@given(st.integers(min_value=2, max_value=300), st.integers(min_value=0, max_value=10_000))
@settings(max_examples=40, deadline=None)
def test_vectorised_from_linkage_matches_the_loop(n, seed):
    rng = np.random.default_rng(seed)
    # A random tree: repeatedly merge two random roots.
    roots = list(range(n))
    z = np.zeros((n - 1, 4))
    size = [1] * n
    for i in range(n - 1):
        a, b = rng.choice(len(roots), 2, replace=False)
        ra, rb = roots[a], roots[b]
        z[i] = (ra, rb, i, size[ra] + size[rb])
        size.append(size[ra] + size[rb])
        roots = [r for k, r in enumerate(roots) if k not in (a, b)] + [n + i]
    t = from_linkage(z, rng.uniform(size=n))
    np.testing.assert_array_equal(t.start, loop_from_linkage_starts(z, n))
    assert_full_binary_tree(t, n)


def test_from_linkage_refuses_wrong_sizes():
    z = np.array([[0.0, 1.0, 1.0, 3.0]])
    with pytest.raises(MaskpropError, match="sizes"):
        from_linkage(z, np.zeros(2))


@pytest.mark.parametrize("method", ["exact", "two_level"])
def test_bad_inputs_are_one_clear_error(method):
    rng = np.random.default_rng(4)
    f = rng.normal(size=(50, 3))
    s = rng.uniform(size=50)
    nan = f.copy()
    nan[9, 1] = np.nan
    with pytest.raises(MaskpropError, match="mask 9"):
        build_tree(nan, s, method=method, block_size=10)
    with pytest.raises(MaskpropError, match="scores"):
        build_tree(f, np.r_[s[:-1], np.inf], method=method, block_size=10)
    with pytest.raises(MaskpropError, match=r"\[n, d\]"):
        build_tree(f[:, 0], s, method=method)
    with pytest.raises(MaskpropError, match="unknown tree method"):
        build_tree(f, s, method="single")
    with pytest.raises(MaskpropError, match="fragments"):
        build_tree(f, s, method=method, fragments=-1)


def test_a_class_too_large_for_memory_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(tree_mod, "available_memory", lambda: 10_000)
    rng = np.random.default_rng(5)
    f, s = rng.normal(size=(400, 3)), rng.uniform(size=400)
    with pytest.raises(MaskpropError, match="GiB"):
        build_tree(f, s, method="exact")
    with pytest.raises(MaskpropError, match="GiB"):
        build_tree(f, s, method="two_level", block_size=20)


def test_a_class_of_one_mask_is_a_single_leaf():
    t = build_tree(np.ones((1, 3)), np.array([0.4]), method="two_level")
    assert t.n_nodes == 1 and t.leaves(t.root).tolist() == [0]


@pytest.mark.parametrize("method", ["exact", "two_level"])
def test_duplicate_features_are_valid_and_merge_first(method):
    """A detector may emit the same feature twice, even for a whole block of masks."""
    rng = np.random.default_rng(5)
    f = np.repeat(rng.normal(size=(4, 3)), [1, 60, 2, 37], axis=0)
    s = rng.uniform(size=len(f))
    t = build_tree(f, s, method=method, block_size=10)
    assert t.n_leaves == len(f) and t.size[t.root] == len(f)
    assert sorted(t.leaves(t.root).tolist()) == list(range(len(f)))
    dup = f.copy()
    dup[17] = dup[3] = rng.normal(size=3) * 100
    t = build_tree(dup, s, method=method, block_size=10)
    assert t.parent[3] == t.parent[17]


def test_the_default_fragment_count():
    # ~FRAGMENT_SIZE masks a fragment up to MAX_FRAGMENTS; never fewer than the blocks.
    count = tree_mod._fragment_count
    assert count(10_000, 10, None) == 10_000 // tree_mod.FRAGMENT_SIZE
    assert count(1_000_000, 1000, None) == tree_mod.MAX_FRAGMENTS
    assert count(10_000_000, tree_mod.MAX_BLOCKS, None) == tree_mod.MAX_BLOCKS
    assert count(5000, 5, 0) == 5 and count(50, 3, 10_000) == 50
