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

Scale: ``build_tree(..., method=...)``
-------------------------------------
``"exact"`` is complete linkage over every pair (fastcluster's NN-chain on a condensed
matrix, ~4 n^2 bytes: ~1.6 GB at 20k masks, out of reach past ~40-70k on 24 GB).
``"two_level"`` approximates it for any n:

1. the class is cut into blocks of at most ``2 * block_size`` masks (default target 1000,
   grown so there are at most :data:`MAX_BLOCKS` blocks) by recursive k-means (faiss, at
   most 64 centroids a split, a median split as fallback) on the same embedding, in float32;
2. each block gets its exact complete-linkage tree, blocks spread over worker processes;
3. each block's highest merges are undone, cutting it into *fragments* (by default
   ``n // FRAGMENT_SIZE`` fragments in all, at most :data:`MAX_FRAGMENTS`, at least one a
   block, shared in proportion to block size: ~7 masks a fragment at 20k, ~330 at 1M);
4. the fragments of all blocks are linked by complete linkage on the dissimilarity
   ``max(D_rep(A, B), h_A, h_B)``, where ``D_rep`` is the largest distance between the
   ``representatives`` (default 8) farthest-first points of each fragment (a lower bound of the
   true complete-linkage distance, exact when both fragments have at most that many masks) and
   ``h`` is a fragment's exact diameter (its root height), which keeps merge heights monotone;
5. everything is grafted into ONE full binary tree in scipy numbering, merges sorted by
   height as scipy writes them (fragment roots become the leaves of the top-level tree).

Below the fragments the tree is exact; the approximation is (a) which masks share a block (a
k-means cut may separate masks that exact linkage would merge early: fragments of different
blocks can still merge at the top level, which is what fragments are for) and (b) the
distances between fragments of more than ``representatives`` masks.  With one fragment a
block (``fragments=0``) the top level links whole blocks, the tree before fragments existed;
with one a mask it is the exact tree.  When the class fits one block (``n <= 2 *
block_size``) the result is the exact tree.  ``"auto"`` (default) is exact up to
:data:`AUTO_EXACT_MAX` masks.

Measured (2-core machine; ``benchmarks/bench_tree.py``, README there):

* scale, d = 32, against exact linkage at 20k timed in the same run (2026-12-05, fragments):
  1M masks 8.2 s = 0.52x exact-20k (goal 3x: met), peak 521 MiB PSS (goal < 1 GB: met); 10M
  masks 125.8 s = 7.9x (goal 36x: met), peak 4.0 GiB PSS (goal < 8 GB: met).  Most of the time
  is the per-block O(block^2) distances and NN-chain, i.e. ~O(n * block_size); the fragment
  level adds ~0.7 s a tree (one thread) above 15k masks.
* quality, Algorithm 1 with Q~ = Q on 20k-mask classes, seeds 0-15, the easiest and hardest of
  8 classes each (``bench_tree.py quality``): summed over the 32 classes this tree accepts
  106 / 104 / 101 % of the exact tree's masks after 100 / 300 / 1000 annotated clusters (goal
  >= 98 %); the tree of whole blocks (``fragments=0``) 88 / 85 / 95 %.  On the 16 hard classes
  alone 84 / 92 / 86 % (whole blocks 44 / 59 / 83 %); run to its end (``bench_tree.py hard``)
  the search there accepts 98.7 % of the exact tree's masks (jittered exact 99.6 %): the gap
  at the budgets is mostly the order clusters are found in, and one class whose first
  annotated cluster (10,393 masks, quality <= 1 - K_a) is rejected whole.  Per class the
  metric is chaotic: the exact tree of the same features jittered by 1e-3 of their spread
  scores 98 / 97 / 101 % summed, and per class it is at >= 98 % in only 56-72 % of the
  classes.  The summed figure is itself one draw (``bench_tree.py quality --draws 6``): over
  k-means seeds 0-5 this tree reads 96-107 / 93-104 / 98-101 % on all 32 classes (mean 103 /
  99 / 100 %) and 61-96 / 82-93 / 86-103 % on the hard half (mean 74 / 87 / 94 %); the exact
  tree of six jittered inputs reads 89-112 / 93-108 / 98-105 % (hard: mean 78 / 93 / 99 %).
  Over 78 seeds (156 classes; ``bench_tree.py quality $(seq 16 77) --draws 6 --jitter-draws
  2`` added to the sixteen) this tree reads 98.8 / 98.4 / 99.6 % on all classes and 85.6 /
  95.0 / 99.9 % on the hard half, where the exact tree of jittered inputs reads 86.8 / 94.7 /
  100.2 %: within 1.2 points of equally valid exact trees at every budget.  Choosing fragments
  by their distance to other blocks, or the upper bound of the inter-fragment distance, moved
  nothing beyond the spread of the draws (benchmarks/README.md).  How precisely the hard
  half reads (``bench_tree.py report`` of ``tree_quality_hard_0-77.json`` and ``..._78-155.json`` in
  benchmarks/results/, 156 hard classes): this tree 92.3 / 94.9 / 99.1 % (90 % bootstrap interval
  over classes 81-106 / 88-104 / 96-102 %), the exact tree of jittered features 90.1 / 95.0 / 99.0 %
  (78-104 / 87-103 / 96-102 %); the reference alone moves the sum by one SD of 5.8 / 3.5 / 1.4
  points, so reading the figure to one point takes ~5,000 hard classes (~22 hours of exact builds on
  2 cores): 156 classes cannot tell whether 98 % is met there.  Over 442 hard classes (``report
  benchmarks/results/tree_quality_hard_*.json``: seeds 0-441, the 286 of ``..._156-441.json`` run as
  two shards on the two cores) this tree reads **100.2 / 100.6 / 99.9 %** (mean of six k-means
  draws; 90 % bootstrap 93-108 / 96-106 / 98-102 %; the default k-means seed alone 97.5 / 98.0 /
  99.1 %), the exact tree of jittered features 98.1 / 102.2 / 101.8 %: the goal reads as met at
  every budget, at a precision of one SD of 4.5 / 2.9 / 1.0 points (the figure stayed at 91-93 % at
  100 clusters until ~300 classes).
  At 20k ``auto`` uses the exact tree anyway.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import fastcluster
import numpy as np
from _fastcluster import linkage_wrap
from numpy.typing import NDArray
from scipy.spatial.distance import squareform

from maskprop.errors import MaskpropError

#: Rows of the distance matrix computed per GEMM block; bounds the temporary to ~block*n*8 B.
_BLOCK_ROWS = 1024


def single_threaded_worker() -> None:
    """Initializer of a worker process in a pool of about one process per core: one BLAS and
    one OpenMP (faiss) thread in it.  Each library otherwise starts a thread per core in every
    worker, and their waiting threads spin on the cores the siblings need: on 2 cores with 2
    workers busy, a block's distance matrix took 1.6-3.5x the CPU it takes single-threaded
    (500-1500 masks), the bulk of a two-level tree's work."""
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    faiss.omp_set_num_threads(1)


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

    def leaves_of(self, nodes: NDArray[np.integer]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The masks under each of ``nodes``, concatenated in the nodes' order, and the index
        in ``nodes`` each belongs to: :meth:`leaves` of many nodes in one numpy pass."""
        nodes = np.asarray(nodes, dtype=np.int64)
        sizes = self.size[nodes].astype(np.int64)
        which = np.repeat(np.arange(nodes.shape[0]), sizes)
        # Position of every mask in ``order``: its node's start plus its rank within it.
        rank = np.arange(which.shape[0]) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return self.order[self.start[nodes][which] + rank].astype(np.int64), which

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
        # Sizes come from Z (scipy writes them); check them in one vectorised pass.
        size[internal] = z[:, 3].astype(np.int64)
        if (size[internal] != size[a] + size[b]).any():
            raise MaskpropError("linkage matrix sizes do not match its merges")
    start = _starts(left, right, parent, size, n)
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


def _starts(
    left: NDArray[np.int32],
    right: NDArray[np.int32],
    parent: NDArray[np.int32],
    size: NDArray[np.int64],
    n: int,
) -> NDArray[np.int64]:
    """``start`` for every node, by pointer jumping (no Python loop over nodes).

    ``start[j]`` is the sum, over the edges on the path root -> j that go to a right child, of
    the size of that edge's left sibling.  Each round adds the partial sum of a node's current
    ancestor and jumps to that ancestor's ancestor, so ``ceil(log2(depth))`` vectorised rounds
    suffice (17 for a 100k-deep caterpillar), and only unfinished nodes are touched.
    """
    n_nodes = left.shape[0]
    acc = np.zeros(n_nodes, dtype=np.int64)
    if n_nodes == 1:
        return acc
    internal = np.arange(n, n_nodes)
    acc[right[internal]] = size[left[internal]]
    anc = parent.astype(np.int64)
    active = np.flatnonzero(anc >= 0)
    while active.size:
        up = anc[active]
        acc[active] += acc[up]
        anc[active] = anc[up]
        active = active[anc[active] >= 0]
    return acc


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


#: ``method="auto"`` builds the exact tree up to this many masks, the two-level one above it.
#: At 20k exact linkage needs ~1.6 GB and ~10 s; the two-level tree's quality at 20k is in the
#: module docstring.
AUTO_EXACT_MAX = 20_000

#: Target mean block size of the two-level tree.  Blocks are split until none exceeds
#: ``2 * block_size``; exact linkage costs ~O(block^2) per block, so ~O(n * block) in all.
DEFAULT_BLOCK_SIZE = 1000

#: The block-level linkage holds a condensed matrix over blocks: at most this many blocks
#: (8 * 8192^2 / 2 B = 268 MB); above ``n = MAX_BLOCKS * block_size`` blocks grow instead.
MAX_BLOCKS = 8192

#: Farthest-first representatives per block for the inter-block distance.
DEFAULT_REPRESENTATIVES = 8

#: Mean masks a fragment the block level links by default: ``n // FRAGMENT_SIZE`` fragments,
#: at most :data:`MAX_FRAGMENTS`, and never fewer than one a block.
FRAGMENT_SIZE = 5

#: Most fragments linked by default.  The top level costs ~O(fragments^2 r^2): one thread,
#: 8 representatives, ~0.7 s at 3072 fragments, ~1.2 s at 4096, ~6 s at 8192.
MAX_FRAGMENTS = 3072

#: Fraction of available memory a build may plan to use before it refuses.
_MEMORY_FRACTION = 0.8


def available_memory() -> int:
    """Bytes of memory available: MemAvailable from /proc/meminfo (Linux), else physical
    memory.  The tree's and the simulator's memory checks both read it."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _check_memory(need: int, what: str) -> None:
    have = available_memory()
    if need > _MEMORY_FRACTION * have:
        raise MaskpropError(
            f"{what} needs about {need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB of "
            "memory is available"
        )


def _check_features(features: NDArray[Any], scores: NDArray[np.float64]) -> None:
    """One clear error for shapes and non-finite values.  Duplicate feature vectors are valid
    (a detector may emit the same feature twice): complete linkage merges them at height 0."""
    if features.ndim != 2 or scores.shape != (features.shape[0],):
        raise MaskpropError(
            f"features must be [n, d] and scores [n], got {features.shape} and {scores.shape}"
        )
    if not np.isfinite(scores).all():
        raise MaskpropError("scores must be finite (found NaN or inf)")
    chunk = 1 << 18  # rows checked at a time: no float64 copy of a whole 10M-mask class
    for lo in range(0, features.shape[0], chunk):
        block = np.asarray(features[lo : lo + chunk])
        if not np.isfinite(block).all():
            bad = lo + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise MaskpropError(f"features must be finite (mask {bad} has NaN or inf)")


def _embed32(
    features: NDArray[Any], scores: NDArray[np.float64], score_weight: float
) -> NDArray[np.float32]:
    """:func:`embed` in float32, computed in chunks (no float64 copy of the whole class)."""
    n, d = features.shape
    chunk = 1 << 18
    total = np.zeros(d)
    total_sq = np.zeros(d)
    for lo in range(0, n, chunk):
        block = np.asarray(features[lo : lo + chunk], dtype=np.float64)
        total += block.sum(axis=0)
        total_sq += np.einsum("ij,ij->j", block, block)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    std[std == 0] = 1.0
    s_std = scores.std() or 1.0
    out = np.empty((n, d + 1), dtype=np.float32)
    scale = std * np.sqrt(d)
    for lo in range(0, n, chunk):
        block = np.asarray(features[lo : lo + chunk], dtype=np.float64)
        out[lo : lo + chunk, :d] = (block - mean) / scale
    out[:, d] = score_weight * (scores - scores.mean()) / s_std
    return out


def _split_off(x: NDArray[np.float32], idx: NDArray[np.int64]) -> NDArray[np.int64]:
    """Labels 0/1 splitting ``x[idx]`` at the median of its widest dimension (a fallback when
    k-means leaves a block whole)."""
    sub = x[idx]
    dim = int(np.argmax(sub.max(axis=0) - sub.min(axis=0)))
    col = sub[:, dim]
    rank = np.argsort(col, kind="stable")
    lab = np.zeros(idx.shape[0], dtype=np.int64)
    lab[rank[idx.shape[0] // 2 :]] = 1
    return lab


def _partition(
    x: NDArray[np.float32], block_size: int, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Blocks of at most ``2 * block_size`` masks by recursive k-means (faiss).

    Returns ``perm`` (masks grouped by block) and ``bounds`` (block ``j`` is
    ``perm[bounds[j] : bounds[j + 1]]``).  Each split uses at most 64 centroids, so a 10M
    class is two or three k-means levels deep, each pass O(n * 64 * d).
    """
    import faiss

    n, d = x.shape
    limit = 2 * block_size
    done: list[NDArray[np.int64]] = []
    work: list[NDArray[np.int64] | None] = [None]  # None: the whole class, without a copy
    while work:
        idx = work.pop()
        m = n if idx is None else idx.shape[0]
        if m <= limit:
            done.append(np.arange(n, dtype=np.int64) if idx is None else idx)
            continue
        sub = x if idx is None else np.ascontiguousarray(x[idx])
        k = int(min(64, -(-m // block_size)))
        km = faiss.Kmeans(d, k, niter=12, seed=seed, max_points_per_centroid=128)
        km.train(sub)
        _, lab2 = km.index.search(sub, 1)
        lab = lab2[:, 0].astype(np.int64)
        del sub, lab2
        if np.bincount(lab, minlength=k).max() == m:
            lab = _split_off(x, np.arange(n, dtype=np.int64) if idx is None else idx)
        grouping = np.argsort(lab, kind="stable")
        cuts = np.cumsum(np.bincount(lab))[:-1]
        members = grouping if idx is None else idx[grouping]
        work.extend(part for part in np.split(members, cuts) if part.size)
    perm = np.concatenate(done)
    bounds = np.concatenate(([0], np.cumsum([b.shape[0] for b in done]))).astype(np.int64)
    return perm, bounds


def _farthest_first(x: NDArray[np.float64], r: int) -> NDArray[np.float64]:
    """``r`` rows of ``x`` chosen farthest-first (starting from the row farthest from the
    mean); fewer when the block has fewer rows."""
    m = x.shape[0]
    if m <= r:
        return x
    chosen = [int(np.argmax(((x - x.mean(axis=0)) ** 2).sum(axis=1)))]
    dmin = ((x - x[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(r - 1):
        nxt = int(np.argmax(dmin))
        chosen.append(nxt)
        np.minimum(dmin, ((x - x[nxt]) ** 2).sum(axis=1), out=dmin)
    return x[chosen]


def _block_sq_distances(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Condensed squared Euclidean distances of a small block (one square GEMM, then scipy's
    C ``squareform`` takes the upper triangle): ~2x faster than :func:`condensed_distances`'s
    row copies at a few hundred to a few thousand rows, whose m^2 square fits easily."""
    xc = x - x.mean(axis=0)
    sq = np.einsum("ij,ij->i", xc, xc)
    g = xc @ xc.T
    g *= -2.0
    g += sq[:, None]
    g += sq[None, :]
    np.maximum(g, 0.0, out=g)
    np.fill_diagonal(g, 0.0)
    out: NDArray[np.float64] = squareform(g, checks=False)
    return out


_SHARED: dict[str, Any] = {}


def _fragment_roots(z: NDArray[np.float64], m: int, f: int) -> NDArray[np.int64]:
    """Local node id of every fragment of a block: the nodes left when the block's ``f - 1``
    highest merges (the last rows of its height-sorted ``z``) are undone, ascending."""
    if f <= 1:
        return np.array([2 * m - 2 if m > 1 else 0], dtype=np.int64)
    top = np.arange(2 * m - f, 2 * m - 1)  # the undone merges' node ids
    kids = z[top - m, :2].astype(np.int64).ravel()
    return np.sort(kids[kids < 2 * m - f])


def _fragment_of_leaf(
    z: NDArray[np.float64], m: int, roots: NDArray[np.int64]
) -> NDArray[np.int64]:
    """For each of a block's ``m`` leaves, the index in ``roots`` of its fragment (pointer
    jumping over the kept merges: no Python loop over masks)."""
    kept = 2 * m - 1 - (roots.shape[0] - 1)  # nodes 0 .. kept-1 belong to fragments
    up = np.arange(kept, dtype=np.int64)
    rows = z[: kept - m, :2].astype(np.int64)
    up[rows[:, 0]] = np.arange(m, kept)
    up[rows[:, 1]] = np.arange(m, kept)
    up[roots] = roots
    while True:
        nxt = up[up]
        if np.array_equal(nxt, up):
            break
        up = nxt
    index = np.full(kept, -1, dtype=np.int64)
    index[roots] = np.arange(roots.shape[0])
    return index[up[:m]]


def _link_blocks(
    lo: int, hi: int
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Exact complete linkage of blocks ``lo..hi-1`` of the shared sorted embedding.

    Block ``j`` is cut into ``nfrag[j]`` fragments by undoing its highest merges.  Returns the
    blocks' kept local linkage rows (concatenated), each fragment's local root id and height
    (its exact diameter, 0 for a single mask) and its farthest-first representatives
    (float64[fragments * r, k], padded by repeating a row).
    """
    x: NDArray[np.float32] = _SHARED["x"]
    bounds: NDArray[np.int64] = _SHARED["bounds"]
    nfrag: NDArray[np.int64] = _SHARED["nfrag"]
    r: int = _SHARED["r"]
    zs = []
    froots = []
    fheights = []
    reps = np.empty((int(nfrag[lo:hi].sum()) * r, x.shape[1]))
    at = 0
    method = fastcluster.mthidx["complete"]
    for j in range(lo, hi):
        block = x[bounds[j] : bounds[j + 1]].astype(np.float64)
        m = block.shape[0]
        f = int(nfrag[j])
        z = np.empty((max(m - 1, 0), 4), dtype=np.float64)
        if m > 1:
            # Complete linkage only compares distances, so it runs on squared ones (same
            # merges, no square roots over m^2 / 2 entries) and the heights are rooted after.
            linkage_wrap(m, _block_sq_distances(block), z, method)
            np.sqrt(z[:, 2], out=z[:, 2])
        roots = _fragment_roots(z, m, f)
        zs.append(z[: m - f])
        froots.append(roots)
        heights = np.zeros(f)
        internal = roots >= m
        heights[internal] = z[roots[internal] - m, 2]
        fheights.append(heights)
        members = [block] if f == 1 else _split_by(block, _fragment_of_leaf(z, m, roots), f)
        for part in members:
            rep = _farthest_first(part, r)
            reps[at : at + r] = rep[np.arange(r) % rep.shape[0]]
            at += r
    zcat = np.concatenate(zs) if zs else np.zeros((0, 4))
    return zcat, np.concatenate(froots), np.concatenate(fheights), reps


def _split_by(
    block: NDArray[np.float64], label: NDArray[np.int64], f: int
) -> list[NDArray[np.float64]]:
    """Rows of ``block`` grouped by ``label`` (0..f-1), in label order."""
    grouping = np.argsort(label, kind="stable")
    return np.split(block[grouping], np.cumsum(np.bincount(label, minlength=f))[:-1])


def _block_distances(
    reps: NDArray[np.float64], roots: NDArray[np.float64], r: int
) -> NDArray[np.float64]:
    """Condensed inter-fragment dissimilarity: ``max(D_rep(A, B), h_A, h_B)`` where ``D_rep``
    is the largest distance between the fragments' representatives and ``h`` a fragment's
    diameter (its exact root height); the ``h`` terms keep every merge height >= its children's.

    The r x r distances of a pair are squared distances from one float32 GEMM, reduced by their
    maximum before the one square root a pair.
    """
    k = roots.shape[0]
    out = np.empty(k * (k - 1) // 2, dtype=np.float64)
    x = (reps - reps.mean(axis=0)).astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    rows = max(1, (1 << 22) // max(1, k * r * r))
    pos = 0
    for lo in range(0, k - 1, rows):
        hi = min(lo + rows, k - 1)
        g = x[lo * r : hi * r] @ x[lo * r :].T
        g *= -2.0
        g += sq[lo * r : hi * r, None]
        g += sq[None, lo * r :]
        # Max over A's representatives first (r whole rows, elementwise: fast), then over B's.
        d2 = np.maximum.reduce(g.reshape(hi - lo, r, (k - lo) * r), axis=1)
        d2 = d2.reshape(hi - lo, k - lo, r).max(axis=2)
        dmax = np.sqrt(np.maximum(d2, 0.0), dtype=np.float64)
        for t in range(hi - lo):
            row = lo + t
            vals = np.maximum(dmax[t, t + 1 :], roots[row + 1 :])
            length = k - row - 1
            out[pos : pos + length] = np.maximum(vals, roots[row])
            pos += length
    return out


def _fragment_count(n: int, blocks: int, fragments: int | None) -> int:
    """How many fragments the block level links: ``fragments`` when given, else
    ``min(n // FRAGMENT_SIZE, MAX_FRAGMENTS)``; never fewer than the blocks, never more than
    the masks or MAX_BLOCKS (unless there are more blocks)."""
    want = min(n // FRAGMENT_SIZE, MAX_FRAGMENTS) if fragments is None else fragments
    return int(min(max(want, blocks), max(MAX_BLOCKS, blocks), n))


def _build_two_level(
    features: NDArray[Any],
    scores: NDArray[np.float64],
    score_weight: float,
    block_size: int,
    representatives: int,
    workers: int,
    seed: int,
    fragments: int | None = None,
) -> Tree:
    n = scores.shape[0]
    d = features.shape[1]
    block_size = max(block_size, -(-n // MAX_BLOCKS))
    # Embedding (f32) twice (sorted copy), perm/labels, ~5 linkage-sized int64/float64 arrays.
    _check_memory(n * ((d + 1) * 4 * 2 + 8 * 3 + 32 * 5) + 4 * MAX_BLOCKS**2, "this tree")
    x = _embed32(features, scores, score_weight)
    perm, bounds = _partition(x, block_size, seed)
    xs = x[perm]
    del x
    k = bounds.shape[0] - 1
    m = np.diff(bounds)
    # One fragment a block, and the rest shared in proportion to block size (at most m each).
    extra = _fragment_count(n, k, fragments) - k
    nfrag = np.minimum(1 + (m * extra) // n, m)
    r = representatives
    _SHARED.update(x=xs, bounds=bounds, r=r, nfrag=nfrag)
    try:
        chunks = np.linspace(0, k, min(k, 16 * max(1, workers)) + 1).astype(int)
        spans = [(int(a), int(b)) for a, b in itertools.pairwise(chunks) if b > a]
        if workers > 1 and len(spans) > 1:
            ctx = mp.get_context("fork")
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=single_threaded_worker
            ) as ex:
                parts = list(ex.map(_link_blocks, *zip(*spans, strict=True)))
        else:
            parts = [_link_blocks(a, b) for a, b in spans]
    finally:
        _SHARED.clear()
    del xs
    zloc = np.concatenate([p[0] for p in parts])
    froot = np.concatenate([p[1] for p in parts])
    fheight = np.concatenate([p[2] for p in parts])
    reps = np.concatenate([p[3] for p in parts])
    del parts
    nf = int(nfrag.sum())
    kept = m - nfrag  # merges kept inside each block
    # Raw numbering: every block's kept merges in block order, then the fragment-level merges.
    ioff = np.concatenate(([0], np.cumsum(kept)))  # first raw merge of each block

    def raw_id(local: NDArray[np.int64], block: NDArray[np.int64]) -> NDArray[np.int64]:
        """Raw ids of block-local node ids: a leaf is its mask, merge ``i`` of the block is
        raw merge ``ioff[block] + i``."""
        mb = m[block]
        leaf = local < mb
        return np.where(
            leaf,
            perm[bounds[:-1][block] + np.where(leaf, local, 0)],
            n + ioff[:-1][block] + (local - mb),
        )

    row_block = np.repeat(np.arange(k), kept)
    z = np.empty((n - 1, 4), dtype=np.float64)
    for col in (0, 1):
        z[: n - nf, col] = raw_id(zloc[:, col].astype(np.int64), row_block)
    z[: n - nf, 2:] = zloc[:, 2:]
    del zloc, row_block
    root_raw = raw_id(froot, np.repeat(np.arange(k), nfrag))
    leaf = root_raw < n
    fsize = np.ones(nf, dtype=np.int64)
    fsize[~leaf] = z[root_raw[~leaf] - n, 3].astype(np.int64)
    if nf > 1:
        _check_memory(8 * nf * nf, "the block-level linkage")
        dist = _block_distances(reps, fheight, r)
        zb = np.empty((nf - 1, 4), dtype=np.float64)
        linkage_wrap(nf, dist, zb, fastcluster.mthidx["complete"])
        del dist
        bsize = np.concatenate((fsize, np.zeros(nf - 1, dtype=np.int64)))
        kids = zb[:, :2].astype(np.int64)
        for t in range(nf - 1):  # a loop over fragments, not masks (nf <= MAX_BLOCKS)
            bsize[nf + t] = bsize[kids[t, 0]] + bsize[kids[t, 1]]
        for col in (0, 1):
            c = kids[:, col]
            z[n - nf :, col] = np.where(
                c < nf, root_raw[np.minimum(c, nf - 1)], n + (n - nf) + c - nf
            )
        z[n - nf :, 2] = zb[:, 2]
        z[n - nf :, 3] = bsize[nf:]
    # Sort merges by height as scipy does (stable: heights never decrease towards the root,
    # so every child still precedes its parent) and renumber the internal nodes.
    rank = np.empty(n - 1, dtype=np.int64)
    order = np.argsort(z[:, 2], kind="stable")
    rank[order] = np.arange(n - 1)
    z = z[order]
    for col in (0, 1):
        c = z[:, col].astype(np.int64)
        internal = c >= n
        c[internal] = n + rank[c[internal] - n]
        z[:, col] = c
    return from_linkage(z, scores)


def build_tree(
    features: NDArray[np.floating],
    scores: NDArray[np.floating],
    *,
    score_weight: float = 1.0,
    method: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    representatives: int = DEFAULT_REPRESENTATIVES,
    workers: int | None = None,
    seed: int = 0,
    fragments: int | None = None,
) -> Tree:
    """Complete-linkage tree of one class's masks (paper Sec. 4.2).

    Parameters
    ----------
    features : float[n, d], mask features f.
    scores : float[n], mask scores s in [0, 1].
    score_weight : weight of the standardised score against the feature block.
    method : ``"exact"`` (complete linkage over all masks, the reference), ``"two_level"``
        (module docstring) or ``"auto"``: exact up to :data:`AUTO_EXACT_MAX` masks.
    block_size, representatives, seed : the two-level tree's target block size, farthest-first
        representatives per fragment and k-means seed.
    fragments : how many fragments the two-level tree's top level links (module docstring);
        ``None``: ``min(n // FRAGMENT_SIZE, MAX_FRAGMENTS)``; ``0``: whole blocks.
    workers : processes for the per-block linkage (two-level only); default ``os.cpu_count()``.

    Exact memory is ~8 n^2 / 2 bytes for the condensed matrix, clustered in place by
    fastcluster's NN-chain: ~1.6 GB at 20k masks, ~3.6 GB at 30k (scipy's linkage needs about
    twice that); a size that does not fit in available memory is refused before allocating.

    Examples
    --------
    >>> import numpy as np
    >>> t = build_tree(np.array([[0.0], [0.1], [5.0]]), np.array([0.9, 0.8, 0.1]))
    >>> sorted(t.leaves(t.root).tolist()), t.size[t.root]
    ([0, 1, 2], np.int64(3))
    """
    if method not in ("auto", "exact", "two_level"):
        raise MaskpropError(f"unknown tree method {method!r} (auto, exact or two_level)")
    if score_weight < 0:
        raise MaskpropError("score_weight must not be negative")
    if block_size < 2 or representatives < 1:
        raise MaskpropError("block_size must be >= 2 and representatives >= 1")
    if fragments is not None and fragments < 0:
        raise MaskpropError("fragments must be >= 0 (or None for the default)")
    s64: NDArray[np.float64] = np.asarray(scores, dtype=np.float64)
    features = np.asarray(features)
    n = s64.shape[0]
    if n == 0:
        raise MaskpropError("cannot build a tree over zero masks")
    _check_features(features, s64)
    if n == 1:
        return from_linkage(np.zeros((0, 4)), s64)
    if method == "auto":
        method = "exact" if n <= AUTO_EXACT_MAX else "two_level"
    if method == "two_level" and n > 2 * block_size:
        return _build_two_level(
            features,
            s64,
            score_weight,
            block_size,
            representatives,
            workers if workers is not None else len(os.sched_getaffinity(0)),
            seed,
            fragments,
        )
    _check_memory(
        8 * (n * (n - 1) // 2) + 8 * n * (features.shape[1] + 1) + 64 * n,
        f"exact complete linkage over {n} masks (use method='two_level')",
    )
    dist = condensed_distances(embed(features, s64, score_weight))
    z = np.empty((n - 1, 4), dtype=np.float64)
    # fastcluster.linkage() starts with np.array(X), a full copy of the n^2/2 matrix even with
    # preserve_input=False; its C entry point clusters our private matrix in place instead.
    linkage_wrap(n, dist, z, fastcluster.mthidx["complete"])
    del dist
    return from_linkage(z, s64)
