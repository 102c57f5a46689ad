"""Per-class cluster trees (paper Sec. 4.2): complete-linkage HAC over masks.

One array representation serves everything downstream (search, sessions, storage):

* nodes are numbered as in ``scipy.cluster.hierarchy.linkage``: leaves ``0..n-1`` are the masks
  in input order, merge ``i`` creates node ``n + i``, the root is ``2n - 2``; every parent has a
  larger id than both children, so bottom-up passes are ascending loops and top-down passes
  descending ones (no recursion: trees of correlated data are thousands of levels deep);
* ``left``/``right``/``parent``: int32[2n-1], -1 where absent;
* ``size``: int64[2n-1] masks under a node; ``height``: float64[2n-1] merge distance;
* ``order``: int32[n] leaves in depth-first order and ``start``: int64[2n-1] so the masks of
  node ``j`` are ``order[start[j] : start[j] + size[j]]`` — any per-mask sum over every node is
  one prefix sum (see :meth:`Tree.subtree_sum`).

The distance is the paper's "mask-attention features + mask score" choice (Sec. 5.1, Fig. 6a):
Euclidean distance on features standardised per dimension and scaled by ``1/sqrt(d)`` (so the
feature part does not drown the score however large ``d`` is), concatenated with the score
standardised and multiplied by ``score_weight``.  With ``score_weight = 1`` the feature block and
the score contribute the same expected squared distance (2 each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fastcluster
import numpy as np
from _fastcluster import linkage_wrap
from numpy.typing import NDArray

from maskprop.errors import MaskpropError

#: Rows of the distance matrix computed per GEMM block; bounds the temporary to ~block*n*8 B.
_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class Tree:
    """A full binary cluster tree over ``n`` masks; see the module docstring for the arrays."""

    left: NDArray[np.int32]
    right: NDArray[np.int32]
    parent: NDArray[np.int32]
    size: NDArray[np.int64]
    height: NDArray[np.float64]
    order: NDArray[np.int32]
    start: NDArray[np.int64]
    scores: NDArray[np.float64]

    @property
    def n_leaves(self) -> int:
        return int(self.order.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.left.shape[0])

    @property
    def root(self) -> int:
        return self.n_nodes - 1

    def is_leaf(self, node: int) -> bool:
        return bool(self.left[node] < 0)

    def children(self, node: int) -> tuple[int, int]:
        return int(self.left[node]), int(self.right[node])

    def leaves(self, node: int) -> NDArray[np.int32]:
        """Mask indices under ``node`` (a view into ``order``; do not modify)."""
        s = int(self.start[node])
        return self.order[s : s + int(self.size[node])]

    def subtree_sum(
        self, values: NDArray[np.floating] | NDArray[np.integer]
    ) -> NDArray[np.float64]:
        """float64[2n-1]: for every node, the sum of ``values`` (one per mask) under it."""
        if values.shape != (self.n_leaves,):
            raise ValueError("values must have one entry per mask")
        prefix = np.concatenate(([0.0], np.cumsum(values[self.order], dtype=np.float64)))
        return prefix[self.start + self.size] - prefix[self.start]

    def cluster_scores(self) -> NDArray[np.float64]:
        """S_j for every node: the mean mask score of the cluster (paper Sec. 4.3)."""
        return self.subtree_sum(self.scores) / self.size

    def to_linkage(self) -> NDArray[np.float64]:
        """The tree as a scipy linkage matrix Z (float64[n-1, 4])."""
        n = self.n_leaves
        internal = np.arange(n, self.n_nodes)
        return np.column_stack(
            [
                self.left[internal],
                self.right[internal],
                self.height[internal],
                self.size[internal],
            ]
        ).astype(np.float64)

    def to_arrays(self) -> dict[str, NDArray[np.generic]]:
        """The arrays that define the tree, for ``np.savez`` (no pickling needed to load)."""
        return {"linkage": self.to_linkage(), "scores": self.scores}

    @classmethod
    def from_arrays(cls, arrays: dict[str, NDArray[np.generic]]) -> Tree:
        return from_linkage(
            np.asarray(arrays["linkage"], dtype=np.float64),
            np.asarray(arrays["scores"], dtype=np.float64),
        )


def from_linkage(z: NDArray[np.float64], scores: NDArray[Any]) -> Tree:
    """Build a :class:`Tree` from a scipy/fastcluster linkage matrix.

    Parameters
    ----------
    z : float64[n-1, 4], rows ``(child_a, child_b, height, size)`` as scipy writes them.
    scores : float[n], the mask score s of every leaf.
    """
    leaf_scores: NDArray[np.float64] = np.asarray(scores, dtype=np.float64)
    n = leaf_scores.shape[0]
    if n < 1:
        raise MaskpropError("a tree needs at least one mask")
    if z.shape != (n - 1, 4):
        raise MaskpropError(f"linkage matrix must have shape ({n - 1}, 4), got {z.shape}")
    n_nodes = 2 * n - 1
    left = np.full(n_nodes, -1, dtype=np.int32)
    right = np.full(n_nodes, -1, dtype=np.int32)
    parent = np.full(n_nodes, -1, dtype=np.int32)
    size = np.ones(n_nodes, dtype=np.int64)
    height = np.zeros(n_nodes, dtype=np.float64)
    if n > 1:
        a = z[:, 0].astype(np.int64)
        b = z[:, 1].astype(np.int64)
        internal = np.arange(n, n_nodes)
        if a.min() < 0 or b.min() < 0 or (a >= internal).any() or (b >= internal).any():
            raise MaskpropError("linkage matrix does not describe a tree (child id >= parent id)")
        left[internal] = a
        right[internal] = b
        parent[a] = internal
        parent[b] = internal
        height[internal] = z[:, 2]
        if (parent[:-1] < 0).any():
            raise MaskpropError("linkage matrix does not describe a tree (a node has no parent)")
        # Bottom-up: children always precede their parent in id order.
        for node in range(n, n_nodes):
            size[node] = size[left[node]] + size[right[node]]
    start = np.zeros(n_nodes, dtype=np.int64)
    # Top-down: parents have larger ids, so a descending loop visits a parent first.
    for node in range(n_nodes - 1, n - 1, -1):
        lc, rc = left[node], right[node]
        start[lc] = start[node]
        start[rc] = start[node] + size[lc]
    order = np.empty(n, dtype=np.int32)
    order[start[:n]] = np.arange(n, dtype=np.int32)
    return Tree(
        left=left,
        right=right,
        parent=parent,
        size=size,
        height=height,
        order=order,
        start=start,
        scores=leaf_scores,
    )


def embed(
    features: NDArray[np.floating], scores: NDArray[np.floating], score_weight: float = 1.0
) -> NDArray[np.float64]:
    """The vectors whose Euclidean distance is the clustering distance (module docstring).

    features : float[n, d]; scores : float[n].  Returns float64[n, d + 1].
    """
    f = np.asarray(features, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if f.ndim != 2 or s.shape != (f.shape[0],):
        raise MaskpropError("features must be [n, d] and scores [n]")
    if not (np.isfinite(f).all() and np.isfinite(s).all()):
        raise MaskpropError("features and scores must be finite")
    if score_weight < 0:
        raise MaskpropError("score_weight must not be negative")
    d = f.shape[1]
    f_std = f.std(axis=0)
    f_std[f_std == 0] = 1.0
    s_std = s.std() or 1.0
    out = np.empty((f.shape[0], d + 1), dtype=np.float64)
    out[:, :d] = (f - f.mean(axis=0)) / (f_std * np.sqrt(d))
    out[:, d] = score_weight * (s - s.mean()) / s_std
    return out


def condensed_distances(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Condensed Euclidean distance matrix (scipy ``pdist`` layout) computed by blocked GEMM.

    x : float64[n, k].  Returns float64[n (n - 1) / 2].  ``pdist`` is a scalar loop; the GEMM
    form ``|a|^2 + |b|^2 - 2 a.b`` runs on BLAS and is 20-50x faster at k ~ 32-256 (NOTES.md).
    Rows are re-centred first so the subtraction loses as little precision as possible.
    """
    n = x.shape[0]
    out = np.empty(n * (n - 1) // 2, dtype=np.float64)
    if n < 2:
        return out
    xc = x - x.mean(axis=0)
    sq = np.einsum("ij,ij->i", xc, xc)
    pos = 0
    for lo in range(0, n - 1, _BLOCK_ROWS):
        hi = min(lo + _BLOCK_ROWS, n - 1)
        block = sq[lo:hi, None] + sq[None, lo:] - 2.0 * (xc[lo:hi] @ xc[lo:].T)
        np.maximum(block, 0.0, out=block)
        np.sqrt(block, out=block)
        for r in range(hi - lo):
            row = lo + r
            length = n - row - 1
            out[pos : pos + length] = block[r, r + 1 :]
            pos += length
    return out


def build_tree(
    features: NDArray[np.floating],
    scores: NDArray[np.floating],
    *,
    score_weight: float = 1.0,
) -> Tree:
    """Complete-linkage tree of one class's masks (exact; paper Sec. 4.2).

    Parameters
    ----------
    features : float[n, d], mask features f.
    scores : float[n], mask scores s in [0, 1].
    score_weight : weight of the standardised score against the feature block.

    Memory is ~8 n^2 / 2 bytes for the condensed matrix, clustered in place by fastcluster's
    NN-chain: ~1.6 GB at 20k masks, ~3.6 GB at 30k (scipy's linkage needs about twice that).

    Examples
    --------
    >>> import numpy as np
    >>> t = build_tree(np.array([[0.0], [0.1], [5.0]]), np.array([0.9, 0.8, 0.1]))
    >>> sorted(t.leaves(t.root).tolist()), t.size[t.root]
    ([0, 1, 2], np.int64(3))
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    if n == 0:
        raise MaskpropError("cannot build a tree over zero masks")
    if n == 1:
        return from_linkage(np.zeros((0, 4)), scores)
    dist = condensed_distances(embed(features, scores, score_weight))
    z = np.empty((n - 1, 4), dtype=np.float64)
    # fastcluster.linkage() starts with np.array(X), a full copy of the n^2/2 matrix even with
    # preserve_input=False; its C entry point clusters our private matrix in place instead.
    linkage_wrap(n, dist, z, fastcluster.mthidx["complete"])
    del dist
    return from_linkage(z, scores)
