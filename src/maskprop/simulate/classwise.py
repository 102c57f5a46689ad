"""The large-scale simulation class by class (paper Sec. 5.2 at the paper's scale).

A pool of 100M masks never exists in one piece here.  A :class:`ClassSource` hands out one
class at a time (generated on demand, or cut from a pool in memory); every class is simulated
on its own, in a worker process, and returns only what the report needs:

* sufficient statistics of the IoUs each method obtained (:class:`IouStats`: count, sums and
  the counts the SQ and precision need), so the report's numbers are exact sums over classes;
* its share of each curve as a :class:`BinnedLog`: events placed in bins of a global ordering
  key, so the per-class logs add up to the campaign's log.  For the heuristic search, which
  pops clusters from one priority queue over every class, the key is the cluster's
  *bottleneck* priority (the lowest priority on its path from the root): a best-first search
  on a tree pops nodes in decreasing bottleneck order, so merging per-class logs by it gives
  the order of the campaign's single queue.  Nodes below a cluster of lower priority share its
  bottleneck and are popped as one run, so the merged curve is exact at the end of every such
  run (the first run of the 100k-mask pool is 79 clusters) but not inside one.  BFS orders by
  depth, DFS class after class in pre-order.  A session run logs one event per decision at its
  node's bin, so how many clusters a simulated round opens moves no curve;
* the Fig. 6b search curves, computed without visiting nodes one by one: with Q~ = Q the set of
  clusters a search pops does not depend on its order (a cluster is popped when every
  ancestor was split), only the order does, and both come from path reductions over the
  ``parent`` array by pointer doubling (O(n log depth) numpy work).

The sum over classes of a method's totals equals a campaign run over all classes at once:
sessions sample each cluster with a seed of its class and node, the simulated crowd answers
each mask with a seed of its class, and every decision of Algorithm 1 concerns one class.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import lru_cache
from multiprocessing import get_context
from operator import attrgetter, itemgetter
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from maskprop.errors import MaskpropError
from maskprop.metrics import (
    MATCH_IOU,
    SECONDS_PER_HOUR,
    cost_usd,
    human_seconds,
    pearson,
    speedup_vs_manual,
)
from maskprop.params import AnnotationParams
from maskprop.progress import Progress, no_progress
from maskprop.search import universal_cut
from maskprop.selection import Likelihoods, Selection, fit_likelihoods
from maskprop.session import AnnotationSession, Answer, Decision, SampleMemo
from maskprop.simulate.annotator import SimulatedAnnotator
from maskprop.simulate.baselines import _accept_threshold, _reject_threshold, _stratified_halves
from maskprop.simulate.pool import MaskPool
from maskprop.simulate.result import Curve
from maskprop.tree import (
    AUTO_EXACT_MAX,
    Tree,
    available_memory,
    build_tree,
    single_threaded_worker,
)
from maskprop.verification import Verdict, verdict

#: Bins of a priority or score key in [0, 1] (finer than float32 scores).
KEY_BINS = 2**30
#: Bins per class of the logs that run class after class (DFS, LSUN's per-class questions).
BINS_PER_CLASS = 2**20
#: Entries a class's log keeps (see :class:`BinnedLog`).
MAX_LOG_ENTRIES = 8192
#: Clusters of at least this many masks teach the selection and make Fig. 4's cluster points.
MIN_FIT_CLUSTER = 10
#: Decisions a session run collects before reading their labels in one pass.
_LABEL_CHUNK = 65536
#: Clusters a simulated session round opens (their questions are all answered in the round).
_ROUND_CLUSTERS = 1024
_INT32_MAX = 2**31 - 1
#: A class's memo of cluster samples keeps at most one entry per this many masks (~300 B an
#: entry: ~75 B a mask; a 1M-mask class of the 100M simulation used 0.14 entries a mask).
MEMO_MASKS_PER_ENTRY = 4
#: Fig. 6b universal-threshold cuts traced.
UNIVERSAL_POINTS = 24
_POLYGON_CONCENTRATION = 30.0  # the same Beta as baselines.manual_polygons
_POLYGON_IOU_MEAN = 0.9


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class IouStats:
    """What the report needs of a set of obtained IoUs, additive over classes."""

    count: int = 0
    iou_sum: float = 0.0
    matched: int = 0  # IoU > 0.5 (panoptic matching), for SQ
    matched_sum: float = 0.0
    correct: int = 0  # IoU >= K_iou, for precision

    @classmethod
    def of(cls, ious: NDArray[np.floating], iou_threshold: float) -> IouStats:
        x = np.asarray(ious, dtype=np.float64)
        m = x > MATCH_IOU
        return cls(
            count=int(x.size),
            iou_sum=float(x.sum()),
            matched=int(m.sum()),
            matched_sum=float(x[m].sum()),
            correct=int((x >= iou_threshold).sum()),
        )

    def __add__(self, other: IouStats) -> IouStats:
        return IouStats(
            self.count + other.count,
            self.iou_sum + other.iou_sum,
            self.matched + other.matched,
            self.matched_sum + other.matched_sum,
            self.correct + other.correct,
        )


def summarize_stats(
    stats: IouStats,
    questions: int,
    polygons: int,
    clusters_annotated: int,
    params: AnnotationParams,
) -> dict[str, Any]:
    """The report entry of one method, the keys and values of
    :func:`maskprop.metrics.summarize` computed from :class:`IouStats`."""
    seconds = human_seconds(
        questions, params.seconds_per_question, polygons, params.seconds_per_polygon
    )
    hours = seconds / SECONDS_PER_HOUR
    q = stats.count
    return {
        "quantity": q,
        "quality_mean_iou": stats.iou_sum / q if q else None,
        "sq": stats.matched_sum / stats.matched if stats.matched else None,
        "precision": stats.correct / q if q else None,
        "questions": int(questions),
        "polygons": int(polygons),
        "clusters_annotated": int(clusters_annotated),
        "hours": hours,
        "cost_usd": cost_usd(hours, params.hourly_wage),
        "masks_per_hour": q / hours if hours > 0 else None,
        "masks_per_question": q / questions if questions else None,
        "speedup_vs_manual": speedup_vs_manual(q, seconds, params.seconds_per_polygon),
    }


@dataclass(frozen=True)
class BinnedLog:
    """A method's event log reduced to bins of a global ordering key (earlier bins first).

    Sparse: ``key`` holds the used bins in increasing order and, per bin, the human seconds
    spent, annotations obtained, the sum of their IoUs and clusters annotated.  Logs of
    different classes add bin by bin.  A class's log keeps at most :data:`MAX_LOG_ENTRIES`
    entries: beyond that, runs of consecutive bins are merged into their last bin, so the
    merged curve is exact at every point up to 1/``MAX_LOG_ENTRIES`` of each class's log."""

    key: NDArray[np.int64]
    seconds: NDArray[np.float64]
    quantity: NDArray[np.int64]
    iou_sum: NDArray[np.float64]
    clusters: NDArray[np.int64]

    @classmethod
    def empty(cls) -> BinnedLog:
        zi, zf = np.zeros(0, np.int64), np.zeros(0)
        return cls(zi, zf, zi, zf, zi)

    @classmethod
    def _reduce(
        cls,
        keys: NDArray[np.int64],
        values: tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]],
        limit: int | None,
    ) -> BinnedLog:
        uniq, inverse = np.unique(keys, return_inverse=True)
        if limit is not None and uniq.size > limit:
            group = (np.arange(uniq.size) * limit) // uniq.size
            last = np.flatnonzero(np.append(group[1:] != group[:-1], True))
            inverse = group[inverse]
            uniq = uniq[last]
        k = uniq.size
        sums = [np.bincount(inverse, weights=v, minlength=k) for v in values]
        return cls(
            uniq.astype(np.int64),
            sums[0].astype(np.float64),
            np.rint(sums[1]).astype(np.int64),
            sums[2].astype(np.float64),
            np.rint(sums[3]).astype(np.int64),
        )

    @classmethod
    def of(
        cls,
        bins: NDArray[np.int64],
        seconds: NDArray[np.float64],
        obtained_iou_sum: NDArray[np.float64],
        obtained: NDArray[np.int64],
        clusters: NDArray[np.int64] | None = None,
    ) -> BinnedLog:
        """Events with their bin; ``obtained`` annotations of IoU sum ``obtained_iou_sum``."""
        b = np.asarray(bins, dtype=np.int64)
        if b.size == 0:
            return cls.empty()
        c = clusters if clusters is not None else np.zeros(b.size, np.int64)
        return cls._reduce(b, (seconds, obtained, obtained_iou_sum, c), MAX_LOG_ENTRIES)

    def __add__(self, other: BinnedLog) -> BinnedLog:
        if self.key.size == 0:
            return other
        if other.key.size == 0:
            return self
        return BinnedLog._reduce(
            np.concatenate([self.key, other.key]),
            (
                np.concatenate([self.seconds, other.seconds]),
                np.concatenate([self.quantity, other.quantity]),
                np.concatenate([self.iou_sum, other.iou_sum]),
                np.concatenate([self.clusters, other.clusters]),
            ),
            None,
        )

    def curve(self, points: int = 200) -> Curve:
        """The cumulative curve, sampled at bin ends (exact points of the merged log)."""
        used = np.flatnonzero((self.seconds > 0) | (self.quantity > 0) | (self.clusters > 0))
        if used.size == 0:
            zero_i = np.zeros(1, dtype=np.int64)
            return Curve(np.zeros(1), zero_i, np.full(1, np.nan), zero_i)
        seconds = np.cumsum(self.seconds)[used]
        quantity = np.cumsum(self.quantity)[used]
        iou_sum = np.cumsum(self.iou_sum)[used]
        clusters = np.cumsum(self.clusters)[used]
        at = np.unique(np.linspace(0, used.size - 1, min(points, used.size)).round().astype(int))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_iou = np.where(quantity[at] > 0, iou_sum[at] / np.maximum(quantity[at], 1), np.nan)
        return Curve(
            hours=seconds[at] / SECONDS_PER_HOUR,
            quantity=quantity[at].astype(np.int64),
            mean_iou=mean_iou,
            clusters=clusters[at].astype(np.int64),
        )


def _key_bins(key: NDArray[np.float64], bins: int = KEY_BINS) -> NDArray[np.int64]:
    """Bins of a key in [0, 1], 0 first."""
    return np.clip((np.asarray(key) * bins).astype(np.int64), 0, bins - 1)


def _class_bins(rank: int, position: NDArray[np.float64]) -> NDArray[np.int64]:
    """Bins of a class-after-class log: class ``rank``, ``position`` in [0, 1] within it."""
    return rank * BINS_PER_CLASS + _key_bins(position, BINS_PER_CLASS)


# --------------------------------------------------------------------------- tree paths
def _parents(tree: Tree) -> NDArray[np.int64]:
    """int64[2n-1] parent of every node, the root its own parent."""
    parent = np.asarray(tree.parent, dtype=np.int64).copy()
    parent[tree.root] = tree.root
    return parent


def path_reduce(
    values: NDArray[Any], parent: NDArray[np.int64], op: Callable[[Any, Any], Any]
) -> NDArray[Any]:
    """``op`` of ``values`` over every node and all its ancestors (pointer doubling).

    ``op`` must be associative; for a non-idempotent ``op`` (addition) the root's value must
    be the identity, since the root is its own parent.  O(n log depth)."""
    out = np.array(values, copy=True)
    anc = parent.copy()
    root_reached = anc == anc[anc]
    while True:
        out = op(out, out[anc])
        if root_reached.all():
            return out
        anc = anc[anc]
        root_reached = anc == anc[anc]


def bottleneck(priority: NDArray[np.float64], parent: NDArray[np.int64]) -> NDArray[np.float64]:
    """Lowest priority on each node's path from the root: best-first search pops in
    decreasing order of it."""
    return path_reduce(priority, parent, np.minimum)


def depth(parent: NDArray[np.int64]) -> NDArray[np.int64]:
    """Edges from the root to every node."""
    step = (parent != np.arange(parent.size)).astype(np.int64)
    return path_reduce(step, parent, np.add)


def preorder(
    tree: Tree, parent: NDArray[np.int64], first_right: NDArray[np.bool_] | None = None
) -> NDArray[np.int64]:
    """Pre-order rank of every node (0 = root).  Children left first, or right first where
    ``first_right`` (per internal node) says so (DFS with heuristic child order)."""
    start = np.asarray(tree.start, dtype=np.int64)
    if first_right is not None:
        # Leaf start positions when some children swap: a node's offset within its parent
        # is 0 for the first child and the first child's size for the second.
        nodes = np.arange(tree.n_nodes)
        left, right = tree.left.astype(np.int64), tree.right.astype(np.int64)
        internal = left >= 0
        offset = np.zeros(tree.n_nodes, np.int64)
        swap = internal & first_right
        keep = internal & ~first_right
        offset[right[keep]] = tree.size[left[keep]]
        offset[left[swap]] = tree.size[right[swap]]
        start = path_reduce(offset, parent, np.add)
        del nodes
    order = np.lexsort((-np.asarray(tree.size), start))
    rank = np.empty(tree.n_nodes, np.int64)
    rank[order] = np.arange(tree.n_nodes)
    return rank


def searched(
    tree: Tree, quality: NDArray[np.float64], accept_threshold: float, parent: NDArray[np.int64]
) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """Fig. 6b protocol (Q~ = Q, every popped cluster annotated): which clusters a search pops
    (every ancestor split), and the masks each popped cluster yields (its size if accepted)."""
    accept = quality >= accept_threshold - 1e-12
    split = (quality > 1.0 - accept_threshold + 1e-12) & ~accept & (tree.left >= 0)
    not_split_parent = ~split[parent]
    not_split_parent[tree.root] = False
    popped = ~path_reduce(not_split_parent, parent, np.logical_or)
    gain = np.where(popped & accept, tree.size, 0).astype(np.int64)
    return popped, gain


# --------------------------------------------------------------------------- sources
class ClassSource(Protocol):
    """Hands out the masks of one class: (pool part, held-out part), both single-class pools
    with class id 0 and the class's name."""

    class_names: tuple[str, ...]

    def sizes(self) -> NDArray[np.int64]: ...
    def heldout_sizes(self) -> NDArray[np.int64]: ...
    def dim(self) -> int: ...
    def get(self, class_id: int) -> tuple[MaskPool, MaskPool]: ...


def _single(pool: MaskPool, name: str) -> MaskPool:
    return MaskPool(
        features=pool.features,
        scores=pool.scores,
        ious=pool.ious,
        class_ids=np.zeros(len(pool), np.int32),
        class_names=(name,),
    )


@dataclass(frozen=True)
class PoolSource:
    """Classes cut from a pool and a held-out pool in memory."""

    pool: MaskPool
    heldout: MaskPool

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.pool.class_names

    def sizes(self) -> NDArray[np.int64]:
        return np.bincount(self.pool.class_ids, minlength=len(self.class_names)).astype(np.int64)

    def heldout_sizes(self) -> NDArray[np.int64]:
        ids = self.heldout.class_ids
        return np.bincount(ids, minlength=len(self.class_names)).astype(np.int64)

    def dim(self) -> int:
        return int(self.pool.features.shape[1])

    def get(self, class_id: int) -> tuple[MaskPool, MaskPool]:
        name = self.class_names[class_id]
        return (
            _single(self.pool.subset(self.pool.class_indices(class_id)), name),
            _single(self.heldout.subset(self.heldout.class_indices(class_id)), name),
        )


@dataclass(frozen=True)
class AdeSource:
    """The ADE-like generator class by class: sizes from :func:`ade_class_sizes` for pool plus
    held-out masks; each class generated on demand and split at random into held-out and pool
    masks (the held-out set is ``heldout_masks`` in all, spread over classes by size)."""

    n_masks: int
    heldout_masks: int
    n_classes: int
    seed: int
    feature_dim: int = 32

    @property
    def class_names(self) -> tuple[str, ...]:
        from maskprop.simulate.generator import _class_names

        return _class_names(self.n_classes)

    def _total_sizes(self) -> NDArray[np.int64]:
        from maskprop.simulate.generator import ade_class_sizes

        return ade_class_sizes(self.n_masks + self.heldout_masks, self.n_classes)

    def heldout_sizes(self) -> NDArray[np.int64]:
        total = self._total_sizes()
        share = self.heldout_masks * total / total.sum()
        out = np.floor(share).astype(np.int64)
        out[np.argsort(-(share - out), kind="stable")[: self.heldout_masks - int(out.sum())]] += 1
        return np.minimum(out, total - 1)

    def sizes(self) -> NDArray[np.int64]:
        return self._total_sizes() - self.heldout_sizes()

    def dim(self) -> int:
        return self.feature_dim

    def get(self, class_id: int) -> tuple[MaskPool, MaskPool]:
        from maskprop.simulate.generator import ade_like_class

        total = int(self._total_sizes()[class_id])
        held = int(self.heldout_sizes()[class_id])
        f, s, iou, _ = ade_like_class(class_id, total, self.seed, self.feature_dim)
        pick = np.random.default_rng([self.seed, class_id, 1]).permutation(total)
        name = self.class_names[class_id]

        def part(index: NDArray[np.int64]) -> MaskPool:
            index = np.sort(index)
            return MaskPool(f[index], s[index], iou[index], np.zeros(index.size, np.int32), (name,))

        return part(pick[held:]), part(pick[:held])


# --------------------------------------------------------------------------- memory
def class_bytes(n: int, dim: int) -> int:
    """Estimated peak memory of simulating one class of ``n`` masks in a worker: the generated
    class (float32 features and float64 temporaries), its tree (2n-1 nodes of ~60 B), the
    session's per-mask and per-node arrays, the memo of cluster samples, and the tree build's
    working set, which for the exact path is the condensed distance matrix (4 n^2 bytes).  Above
    :data:`maskprop.tree.AUTO_EXACT_MAX` masks ``build_tree`` takes its two-level path."""
    linear = n * (dim * 4 * 3 + 64 * 8) + 200 * 2 * n + 80 * n + 300 * 2**20
    if n <= AUTO_EXACT_MAX:
        return linear + 4 * n * n
    return linear + n * dim * 8 * 2


def plan_workers(sizes: NDArray[np.int64], dim: int, workers: int, budget: int) -> int:
    """Check that every class fits ``budget`` bytes and return the worker count to use.

    Raises MaskpropError with one line naming the class when one does not fit."""
    if workers < 1:
        raise MaskpropError(f"--workers must be at least 1, got {workers}")
    need = [class_bytes(int(n), dim) for n in sizes if n > 0]
    if not need:
        raise MaskpropError("the pool has no masks")
    largest = max(need)
    if largest > budget:
        n = int(sizes.max())
        raise MaskpropError(
            f"the largest class ({n:,} masks) needs ~{largest / 2**30:.1f} GiB to simulate but "
            f"{budget / 2**30:.1f} GiB are available; use fewer masks or more memory"
        )
    return workers


class _SampleMemo(dict[tuple[int, int, int, int], NDArray[np.int32]]):
    """The cluster samples a class's session runs share, at most ``limit`` of them (past
    that a sample is drawn again, the same one, rather than kept)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: tuple[int, int, int, int], value: NDArray[np.int32]) -> None:
        if len(self) < self.limit:
            super().__setitem__(key, value)


# --------------------------------------------------------------------------- workers
@dataclass
class HeldoutOutcome:
    class_id: int
    cluster_s: NDArray[np.float32]
    cluster_q: NDArray[np.float32]
    cluster_mean_iou: NDArray[np.float32]
    mask_moments: NDArray[np.float64]  # n, sum s, sum iou, sum s^2, sum iou^2, sum s iou


@dataclass
class MethodOutcome:
    stats: IouStats
    questions: int
    polygons: int
    clusters: int
    log: BinnedLog
    decisions: dict[str, int] = field(default_factory=dict)


@dataclass
class ClassOutcome:
    class_id: int
    n_masks: int
    methods: dict[str, MethodOutcome]
    search: dict[str, BinnedLog]
    universal: tuple[NDArray[np.int64], NDArray[np.int64]] | None
    ablation: dict[str, MethodOutcome]
    peak_rss_bytes: int


@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one class (picklable)."""

    source: Any
    class_id: int
    rank: int  # position among the non-empty classes
    n_classes: int  # non-empty classes
    params: AnnotationParams
    selection: Selection | None = None
    strategy: str = "heuristic"
    annotator_error: float = 0.0
    seed: int = 0
    ablation: bool = True
    strategy_curves: bool = True
    universal_sizes: tuple[float, ...] = ()
    tree_workers: int | None = None  # build_tree's own processes (1 when classes run in parallel)


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def heldout_class(job: Job) -> HeldoutOutcome:
    """Phase 1: the held-out part's tree, its clusters' (S, Q, mean IoU), and the moments of
    the per-mask (s, IoU) correlation."""
    _, held = job.source.get(job.class_id)
    s = held.scores.astype(np.float64)
    iou = held.ious.astype(np.float64)
    moments = np.array(
        [s.size, s.sum(), iou.sum(), (s * s).sum(), (iou * iou).sum(), (s * iou).sum()]
    )
    if len(held) < 2:
        empty = np.zeros(0, np.float32)
        return HeldoutOutcome(job.class_id, empty, empty, empty, moments)
    tree = build_tree(held.features, held.scores, workers=job.tree_workers)
    ok = (held.ious >= job.params.iou_threshold).astype(np.float64)
    big = np.flatnonzero(tree.size >= MIN_FIT_CLUSTER)
    return HeldoutOutcome(
        job.class_id,
        tree.cluster_scores()[big].astype(np.float32),
        (tree.subtree_sum(ok)[big] / tree.size[big]).astype(np.float32),
        (tree.subtree_sum(iou)[big] / tree.size[big]).astype(np.float32),
        moments,
    )


def _class_seed(seed: int, class_id: int) -> int:
    return int(np.random.SeedSequence([seed, class_id]).generate_state(1)[0])


def _order_bins(
    tree: Tree,
    parent: NDArray[np.int64],
    strategy: str,
    priorities: NDArray[np.float64],
    rank: int,
) -> NDArray[np.int64]:
    """Bin of every node in the campaign-wide pop order of ``strategy``."""
    if strategy == "heuristic":
        return _key_bins(1.0 - bottleneck(priorities, parent))
    if strategy == "bfs":
        return depth(parent)
    first_right = None
    if strategy == "dfs_heuristic":
        first_right = np.zeros(tree.n_nodes, bool)
        internal = tree.left >= 0
        lp = priorities[np.maximum(tree.left, 0)]
        rp = priorities[np.maximum(tree.right, 0)]
        first_right[internal] = (rp > lp)[internal] | ((rp == lp) & (tree.right < tree.left))[
            internal
        ]
    pre = preorder(tree, parent, first_right)
    return _class_bins(rank, pre / max(tree.n_nodes, 1))


@dataclass
class _Trace:
    """What a session run without answer reuse asked, for :func:`_replay_sequential`: its
    log events (one per decision that asked or obtained something) and every question in
    the order it was leased (a cluster's questions together, in its sample's order) with the
    answer it got."""

    event_node: NDArray[np.int64]
    event_asked: NDArray[np.int64]
    event_obtained: NDArray[np.int64]
    event_iou: NDArray[np.float64]
    question_node: NDArray[np.int64]
    question_yes: NDArray[np.bool_]


def _run_session(
    tree: Tree,
    cls: MaskPool,
    job: Job,
    params: AnnotationParams,
    selection: Selection,
    strategy: str,
    bins: NDArray[np.int64],
    priorities: NDArray[np.float64] | None,
    samples: SampleMemo | None = None,
    trace: list[_Trace] | None = None,
) -> MethodOutcome:
    """Algorithm 1 on one class with the simulated crowd; one log event per decision.

    A decision depends on its cluster alone (the sample is a function of the cluster, the
    answers of its masks, inherited ones come from its ancestors, decided first), so which
    clusters are decided, and how, does not depend on the order clusters are opened in:
    each round opens up to :data:`_ROUND_CLUSTERS` clusters and answers all their questions,
    never part of a sequential batch.  Where a decision falls on the curves is its node's
    bin in the strategy's pop order (``bins``), as if clusters were opened one at a time.
    ``samples``: a memo shared by the runs of one class (see :class:`AnnotationSession`).
    ``trace``: where given, the run's :class:`_Trace` is appended to it."""
    c = job.class_id
    session = AnnotationSession(
        {c: tree},
        params,
        selection,
        strategy=strategy,
        seed=job.seed,
        priorities={c: priorities} if priorities is not None else None,
        samples=samples,
    )
    annotator = SimulatedAnnotator(
        cls.ious,
        params.iou_threshold,
        error_rate=job.annotator_error,
        seed=_class_seed(job.seed, c),
    )
    truth = annotator.answers  # the same answers as annotator.answer, without response times
    pending: list[Decision] = []  # popped decisions not yet reduced to log events
    events: list[tuple[NDArray[Any], ...]] = []  # (node, new answers, obtained, IoU sum)
    got: list[NDArray[np.int64]] = []
    asked_nodes: list[NDArray[np.int64]] = []
    asked_yes: list[NDArray[np.bool_]] = []

    def reduce_pending() -> None:
        # Labels of a decided mask never change, so reading them a chunk of decisions later
        # (one numpy pass) gives the same masks per decision.
        n = len(pending)
        masks, labels_, _, which = session.decisions_labels(pending)
        yes = labels_ == 1
        got.append(masks[yes])
        node = np.fromiter(map(itemgetter(1), pending), np.int64, n)
        asked = np.fromiter(map(attrgetter("new_answers"), pending), np.int64, n)
        obtained = np.bincount(which[yes], minlength=n)
        iou = np.bincount(which[yes], weights=cls.ious[masks[yes]].astype(np.float64), minlength=n)
        keep = (asked > 0) | (obtained > 0)  # an event with neither moves no curve
        events.append((node[keep], asked[keep], obtained[keep], iou[keep]))
        pending.clear()

    while not session.done:
        qs = session.lease(_INT32_MAX, max_new_clusters=_ROUND_CLUSTERS)
        if qs:
            ids = np.fromiter(map(itemgetter(2), qs), np.int64, len(qs))
            if trace is not None:
                asked_nodes.append(np.fromiter(map(itemgetter(1), qs), np.int64, len(qs)))
                asked_yes.append(truth[ids])
            session.submit(
                Answer(q.class_id, q.node, q.mask, v)
                for q, v in zip(qs, truth[ids].tolist(), strict=True)
            )
        decisions = session.pop_decisions()
        if not decisions:
            if not qs and not session.done:
                raise RuntimeError("session stalled: no questions to ask but not done")
            continue
        pending.extend(decisions)
        if len(pending) >= _LABEL_CHUNK:
            reduce_pending()
    if pending:
        reduce_pending()
    obtained_masks = np.concatenate(got) if got else np.zeros(0, np.int64)
    node, asked, obtained, iou_sum = (np.concatenate(a) for a in zip(*events, strict=True))
    if trace is not None:
        empty = np.zeros(0, np.int64)
        trace.append(
            _Trace(
                node,
                asked,
                obtained,
                iou_sum,
                np.concatenate(asked_nodes) if asked_nodes else empty,
                np.concatenate(asked_yes) if asked_yes else empty.astype(np.bool_),
            )
        )
    log = BinnedLog.of(
        bins[node],
        asked.astype(np.float64) * params.seconds_per_question,
        iou_sum,
        obtained,
        (asked > 0).astype(np.int64),
    )
    return MethodOutcome(
        IouStats.of(cls.ious[obtained_masks], params.iou_threshold),
        session.questions,
        0,
        session.clusters_annotated,
        log,
        dict(session.outcomes),  # every decision was popped: the session's own count
    )


_VERDICT_CODES = {v: i for i, v in enumerate(Verdict)}


@lru_cache(maxsize=16)
def _verdict_table(params: AnnotationParams) -> NDArray[np.int8]:
    """``table[m, answered, yes]``: :func:`verdict`'s code (index in :class:`Verdict`) for a
    cluster whose fixed rule needs ``m`` answers (the cluster size matters only through m);
    read-only, cached per rule (N_s^3 / 6 calls to build)."""
    ns = params.samples_per_cluster
    table = np.full((ns + 1, ns + 1, ns + 1), _VERDICT_CODES[Verdict.MORE], np.int8)
    for m in range(1, ns + 1):
        for answered in range(1, m + 1):
            for yes in range(answered + 1):
                table[m, answered, yes] = _VERDICT_CODES[verdict(yes, answered, m, params)]
    table.flags.writeable = False
    return table


def _replay_sequential(
    fixed: MethodOutcome,
    trace: _Trace,
    bins: NDArray[np.int64],
    params: AnnotationParams,
) -> MethodOutcome | None:
    """The run of ``params`` (a sequential rule, no answer reuse) read off the fixed-N_s
    run's ``trace``, or None when it would decide some cluster differently.

    Without reuse a cluster's decision depends on its own sample and answers alone, and a
    sequential rule asks a prefix of the sample the fixed rule asks, ``sequential_batch``
    answers at a time, deciding after each batch (the last one falls back to the fixed
    rule).  So where the rule's decision equals the fixed rule's on every cluster the fixed
    run asked about (always for ``curtail``, which stops only once the outcome is settled;
    ``beta`` may differ), the same clusters are opened, decided alike and label the same
    masks, and the run differs only in how many questions each cluster took: the stopping
    points of the rule on the answers the fixed run received.  ``tests/unit/simulate/
    test_classwise.py`` checks the replayed report against the sessions', bin by bin."""
    node = trace.question_node
    if node.shape[0] == 0:
        return fixed
    # A cluster's questions are leased together and each cluster is opened once.
    starts = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
    m = np.diff(np.r_[starts, node.shape[0]])
    if m.max() > params.samples_per_cluster:
        return None  # not a fixed-N_s run's trace
    yes_before = np.r_[0, np.cumsum(trace.question_yes, dtype=np.int64)]
    batch = params.sequential_batch
    table = _verdict_table(params)
    more = _VERDICT_CODES[Verdict.MORE]
    stop = np.zeros(m.shape[0], np.int64)  # answers when the rule decides (0: not yet)
    code = np.full(m.shape[0], more, np.int8)
    answered = np.zeros(m.shape[0], np.int64)
    while (stop == 0).any():
        open_ = np.flatnonzero(stop == 0)
        answered[open_] = np.minimum(answered[open_] + batch, m[open_])
        b = answered[open_]
        yes = yes_before[starts[open_] + b] - yes_before[starts[open_]]
        code[open_] = table[m[open_], b, yes]
        decided = open_[code[open_] != more]
        stop[decided] = answered[decided]
    yes_all = yes_before[starts + m] - yes_before[starts]
    if (code != table[m, m, yes_all]).any():
        return None  # some decision differs: the clusters opened below it differ too
    asked = trace.event_asked.copy()
    is_asked = asked > 0
    order = np.argsort(node[starts])
    at = order[np.searchsorted(node[starts], trace.event_node[is_asked], sorter=order)]
    if not np.array_equal(asked[is_asked], m[at]):
        return None  # not a fixed-N_s run's trace
    asked[is_asked] = stop[at]
    return MethodOutcome(
        fixed.stats,
        int(asked.sum()),
        fixed.polygons,
        fixed.clusters,
        BinnedLog.of(
            bins[trace.event_node],
            asked.astype(np.float64) * params.seconds_per_question,
            trace.event_iou,
            trace.event_obtained,
            is_asked.astype(np.int64),
        ),
        dict(fixed.decisions),
    )


def _run_universal(tree: Tree, cls: MaskPool, job: Job, rank: int) -> MethodOutcome:
    """Universal threshold cut (mean cluster size 8), N_s masks verified per cluster."""
    params = job.params
    rng = np.random.default_rng([job.seed, job.class_id, 2])
    annotator = SimulatedAnnotator(
        cls.ious,
        params.iou_threshold,
        job.annotator_error,
        seed=_class_seed(job.seed, job.class_id),
    )
    nodes = universal_cut(tree, max(1, math.ceil(tree.n_leaves / 8.0)))
    m = np.minimum(params.samples_per_cluster, tree.size[nodes])
    # One random sample per cluster: the first m of a random key order within the cluster.
    key = rng.random(tree.n_leaves)
    which = np.repeat(np.arange(nodes.size), tree.size[nodes])
    members = np.concatenate([tree.leaves(int(v)) for v in nodes]).astype(np.int64)
    order = np.lexsort((key[members], which))
    members, which = members[order], which[order]
    rank_in = np.arange(members.size) - np.repeat(
        np.cumsum(tree.size[nodes]) - tree.size[nodes], tree.size[nodes]
    )
    asked = rank_in < m[which]
    yes = np.bincount(which[asked], weights=annotator.answer(members[asked]), minlength=nodes.size)
    accepted = yes / m >= params.accept_threshold - 1e-9
    obtained = members[accepted[which]]
    questions = int(m.sum())
    log = BinnedLog.of(
        np.array([rank], np.int64),
        np.array([questions * params.seconds_per_question]),
        np.array([float(cls.ious[obtained].astype(np.float64).sum())]),
        np.array([obtained.size], np.int64),
        np.array([nodes.size], np.int64),
    )
    return MethodOutcome(
        IouStats.of(cls.ious[obtained], params.iou_threshold), questions, 0, int(nodes.size), log
    )


def _manual(cls: MaskPool, job: Job) -> MethodOutcome:
    """One polygon per mask, IoU ~ Beta(mean 0.9), in random order (baselines.manual_polygons)."""
    params = job.params
    n = len(cls)
    rng = np.random.default_rng([job.seed, job.class_id, 3])
    ious = rng.beta(
        _POLYGON_IOU_MEAN * _POLYGON_CONCENTRATION,
        (1.0 - _POLYGON_IOU_MEAN) * _POLYGON_CONCENTRATION,
        n,
    )
    bins = _key_bins(rng.random(n))
    log = BinnedLog.of(bins, np.full(n, params.seconds_per_polygon), ious, np.ones(n, np.int64))
    return MethodOutcome(IouStats.of(ious.astype(np.float32), params.iou_threshold), 0, n, 0, log)


def _naive(cls: MaskPool, annotator: SimulatedAnnotator, job: Job) -> MethodOutcome:
    """One question per mask, best score first over the whole campaign (keyed by score)."""
    params = job.params
    yes = annotator.answer(np.arange(len(cls)))
    obtained = np.flatnonzero(yes)
    bins = _key_bins(1.0 - cls.scores.astype(np.float64))
    log = BinnedLog.of(
        bins,
        np.full(len(cls), params.seconds_per_question),
        np.where(yes, cls.ious, 0.0).astype(np.float64),
        yes.astype(np.int64),
    )
    return MethodOutcome(IouStats.of(cls.ious[obtained], params.iou_threshold), len(cls), 0, 0, log)


def _lsun(
    cls: MaskPool,
    annotator: SimulatedAnnotator,
    job: Job,
    sample_fraction: float = 0.02,
    min_samples: int = 40,
    target_precision: float = 0.95,
) -> MethodOutcome:
    """baselines.lsun on one class; the campaign's log runs all samples, then all
    auto-labels, then the remaining questions class after class."""
    from sklearn.linear_model import LogisticRegression

    params = job.params
    spq = params.seconds_per_question
    n = len(cls)
    rng = np.random.default_rng([job.seed, job.class_id, 4])
    k = min(n, max(min_samples, math.ceil(sample_fraction * n)))
    picked = rng.permutation(n)
    sample, rest = picked[:k], picked[k:]
    yes = annotator.answer(sample)
    auto_yes = np.zeros(0, np.int64)
    auto_n = 0
    later = rest[np.argsort(-cls.scores[rest], kind="stable")]
    halves = _stratified_halves(yes, rng) if rest.size else None
    if halves is not None:
        train, calibration = halves
        x_all = np.column_stack([cls.features, cls.scores]).astype(np.float32)
        mean = x_all.mean(axis=0, dtype=np.float64)
        scale = x_all.std(axis=0, dtype=np.float64)
        scale[scale < 1e-12] = 1.0
        del x_all

        def x_of(index: NDArray[np.int64]) -> NDArray[np.float64]:
            x = np.column_stack([cls.features[index], cls.scores[index]]).astype(np.float64)
            return (x - mean) / scale

        x_sample = x_of(sample)
        model = LogisticRegression(max_iter=1000).fit(x_sample[train], yes[train])
        p_cal = model.predict_proba(x_sample[calibration])[:, 1]
        accept_at = _accept_threshold(p_cal, yes[calibration], target_precision)
        reject_at = _reject_threshold(p_cal, yes[calibration], target_precision)
        p_rest = (
            np.concatenate(
                [
                    model.predict_proba(x_of(rest[lo : lo + 1_000_000]))[:, 1]
                    for lo in range(0, rest.size, 1_000_000)
                ]
            )
            if rest.size
            else np.zeros(0)
        )
        accept = (p_rest >= accept_at) & (p_rest > reject_at)
        reject = (p_rest <= reject_at) & (p_rest < accept_at)
        auto_yes = rest[accept]
        auto_n = int(accept.sum() + reject.sum())
        ask = ~(accept | reject)
        later = rest[ask][np.argsort(-p_rest[ask], kind="stable")]
    later_yes = annotator.answer(later)
    obtained = np.concatenate([sample[yes], auto_yes, later[later_yes]])
    ious = cls.ious.astype(np.float64)
    c_bins = BINS_PER_CLASS * job.n_classes
    pos = np.arange(later.size) / max(later.size, 1)
    log = BinnedLog.of(
        np.concatenate([[job.rank], [c_bins + job.rank], 2 * c_bins + _class_bins(job.rank, pos)]),
        np.concatenate([[k * spq], [0.0], np.full(later.size, spq)]),
        np.concatenate(
            [
                [ious[sample[yes]].sum()],
                [ious[auto_yes].sum()],
                np.where(later_yes, ious[later], 0.0),
            ]
        ),
        np.concatenate([[int(yes.sum())], [auto_yes.size], later_yes.astype(np.int64)]),
    )
    del auto_n
    return MethodOutcome(
        IouStats.of(cls.ious[obtained], params.iou_threshold), int(k + later.size), 0, 0, log
    )


def simulate_class(job: Job) -> ClassOutcome:
    """Phase 2: every method on one class."""
    params = job.params
    selection = job.selection
    assert selection is not None
    cls, _ = job.source.get(job.class_id)
    tree = build_tree(cls.features, cls.scores, workers=job.tree_workers)
    parent = _parents(tree)
    scores = tree.cluster_scores()
    ok = (cls.ious >= params.iou_threshold).astype(np.float64)
    quality = tree.subtree_sum(ok) / tree.size
    mean_iou = tree.subtree_sum(cls.ious.astype(np.float64)) / tree.size
    base_strategy = "heuristic" if job.strategy == "oracle" else job.strategy
    priorities = mean_iou if job.strategy == "oracle" else None

    # The search-order bins are the same for the main run and every ablation variant (the
    # strategy curves below compute their own ``bins``).
    ours_bins = (
        None
        if job.strategy == "universal"
        else _order_bins(
            tree, parent, base_strategy, priorities if priorities is not None else scores, job.rank
        )
    )

    # The main run and the ablation variants draw mostly the same cluster samples.
    samples = _SampleMemo(max(len(cls) // MEMO_MASKS_PER_ENTRY, 1024))

    def ours(p: AnnotationParams, trace: list[_Trace] | None = None) -> MethodOutcome:
        if ours_bins is None:
            return _run_universal(tree, cls, job, job.rank)
        return _run_session(
            tree, cls, job, p, selection, base_strategy, ours_bins, priorities, samples, trace
        )

    annotator = SimulatedAnnotator(
        cls.ious,
        params.iou_threshold,
        job.annotator_error,
        seed=_class_seed(job.seed, job.class_id),
    )
    methods = {
        "maskprop": ours(params),
        "manual": _manual(cls, job),
        "naive_verification": _naive(cls, annotator, job),
        "lsun": _lsun(cls, annotator, job),
    }
    search: dict[str, BinnedLog] = {}
    universal = None
    if job.strategy_curves:
        # Which clusters are popped does not depend on the order (module docstring).
        popped, gain = searched(tree, quality, params.accept_threshold, parent)
        for name in ("heuristic", "oracle", "dfs_heuristic", "bfs", "dfs"):
            pri = mean_iou if name == "oracle" else scores
            strategy = "heuristic" if name == "oracle" else name
            bins = _order_bins(tree, parent, strategy, pri, job.rank)[popped]
            search[name] = BinnedLog.of(
                bins,
                np.zeros(bins.size),
                np.zeros(bins.size),
                gain[popped],
                np.ones(bins.size, np.int64),
            )
        ks, gots = [], []
        for mean_size in job.universal_sizes:
            nodes = universal_cut(tree, max(1, math.ceil(tree.n_leaves / mean_size)))
            good = quality[nodes] >= params.accept_threshold - 1e-12
            ks.append(nodes.size)
            gots.append(int(tree.size[nodes[good]].sum()))
        universal = (np.asarray(ks, np.int64), np.asarray(gots, np.int64))
    ablation: dict[str, MethodOutcome] = {}
    if job.ablation:
        # The fixed-N_s run without reuse, whose trace the sequential rules without reuse
        # are read off (``_replay_sequential``: a few ms where a 1M-mask class's session run
        # takes ~5 s).
        fixed: tuple[AnnotationParams, MethodOutcome, _Trace, NDArray[np.int64]] | None = None
        for name, change in ABLATION.items():
            variant = replace(params, **change)  # type: ignore[arg-type]
            # The variant the main run already is (deterministic) is not run twice.
            if variant == params and job.strategy != "universal":
                ablation[name] = methods["maskprop"]
                continue
            if fixed is not None and replace(variant, sequential="off") == fixed[0]:
                replayed = _replay_sequential(*fixed[1:], variant)
                if replayed is not None:
                    ablation[name] = replayed
                    continue
            traces: list[_Trace] = []
            plain = variant.sequential == "off" and not variant.reuse_answers
            ablation[name] = ours(variant, traces if plain and fixed is None else None)
            if traces and ours_bins is not None:
                fixed = (variant, ablation[name], traces[0], ours_bins)
    return ClassOutcome(job.class_id, len(cls), methods, search, universal, ablation, _peak_rss())


#: Label reuse and sequential verification, each on and off.
ABLATION: dict[str, dict[str, object]] = {
    "paper_fixed_ns": {"reuse_answers": False, "sequential": "off"},
    "reuse": {"reuse_answers": True, "sequential": "off"},
    "curtail": {"reuse_answers": False, "sequential": "curtail"},
    "beta": {"reuse_answers": False, "sequential": "beta"},
    "reuse_curtail": {"reuse_answers": True, "sequential": "curtail"},
    "reuse_beta": {"reuse_answers": True, "sequential": "beta"},
}


# --------------------------------------------------------------------------- driver
def _map(
    fn: Callable[[Job], Any],
    jobs: list[Job],
    workers: int,
    weights: list[int],
    budget: int,
    label: str,
    progress: Progress,
) -> Iterator[Any]:
    """``fn`` over ``jobs`` (largest first) in at most ``workers`` processes whose estimated
    memory (``weights``) stays within ``budget``; yields results in completion order."""
    order = sorted(range(len(jobs)), key=lambda i: -weights[i])
    total = len(jobs)
    progress(label, 0, total)  # the stage is shown (and timed) from its start
    if workers == 1 or total == 1:
        for done, i in enumerate(order, 1):
            yield fn(jobs[i])
            progress(label, done, total)
        return
    # fork: workers share the parent's imports and the source (no pickling of a pool); a
    # class's big arrays are numpy buffers, returned to the system when the class is done.
    # One BLAS/OpenMP thread a worker: the workers already fill the cores.
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("fork"), initializer=single_threaded_worker
    ) as pool:
        running: dict[Future[Any], int] = {}
        pending = list(order)
        done = 0
        while pending or running:
            in_use = sum(weights[i] for i in running.values())
            while pending and len(running) < workers:
                i = pending[0]
                if running and in_use + weights[i] > budget:
                    # The largest waiting class does not fit beside the running ones; a
                    # smaller one might.
                    fit = [j for j in pending if in_use + weights[j] <= budget]
                    if not fit:
                        break
                    i = fit[0]
                pending.remove(i)
                running[pool.submit(fn, jobs[i])] = i
                in_use += weights[i]
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                del running[fut]
                done += 1
                progress(label, done, total)
                yield fut.result()


@dataclass
class ClasswiseOutput:
    report: dict[str, Any]
    curves: dict[str, Curve]
    search_curves: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]]
    likelihoods: Likelihoods
    #: Peak RSS of the largest class's process (not in the report: it varies run to run).
    peak_class_rss_bytes: int = 0


def _geom_points(log: BinnedLog, points: int = 200) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(clusters popped, masks obtained) of a search log at ~``points`` geometric steps."""
    used = np.flatnonzero(log.clusters > 0)
    xs = np.cumsum(log.clusters)[used]
    ys = np.cumsum(log.quantity)[used]
    if xs.size == 0:
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    want = np.unique(np.geomspace(1, xs[-1], points).round().astype(np.int64))
    at = np.unique(np.minimum(np.searchsorted(xs, want), xs.size - 1))
    return xs[at].astype(np.int64), ys[at].astype(np.int64)


def simulate_classes(
    source: Any,
    params: AnnotationParams,
    *,
    strategy: str = "heuristic",
    annotator_error: float = 0.0,
    seed: int = 0,
    ablation: bool = True,
    strategy_curves: bool = True,
    workers: int | None = None,
    memory_budget: int | None = None,
    progress: Progress = no_progress,
) -> ClasswiseOutput:
    """Ours and the baselines over every class of ``source``, class by class in workers;
    thresholds are learned on the held-out parts.  Same report as
    :func:`maskprop.simulate.runner.simulate`."""
    sizes = source.sizes()
    held_sizes = source.heldout_sizes()
    classes = [c for c in range(len(sizes)) if sizes[c] > 0]
    budget = int(memory_budget if memory_budget is not None else 0.8 * available_memory())
    n_workers = plan_workers(sizes, source.dim(), workers or (os.cpu_count() or 1), budget)
    n_total = int(sizes.sum())
    base = Job(
        source,
        0,
        0,
        len(classes),
        params,
        None,
        strategy,
        annotator_error,
        seed,
        ablation,
        strategy_curves,
        tree_workers=1 if n_workers > 1 else None,
    )

    # Phase 1: the selection thresholds from held-out clusters (Sec. 4.3).
    held_jobs = [
        replace(base, class_id=c, rank=r) for r, c in enumerate(classes) if held_sizes[c] > 0
    ]
    held = sorted(
        _map(
            heldout_class,
            held_jobs,
            n_workers,
            [class_bytes(int(held_sizes[j.class_id]), source.dim()) for j in held_jobs],
            budget,
            "held-out trees",
            progress,
        ),
        key=lambda h: h.class_id,
    )
    s_all = np.concatenate([h.cluster_s for h in held]).astype(np.float64)
    q_all = np.concatenate([h.cluster_q for h in held]).astype(np.float64)
    lik = fit_likelihoods(s_all, q_all, params.accept_threshold)
    learned = lik.thresholds()
    selection = learned.overridden(params.prior_reject_threshold, params.prior_accept_threshold)
    mom = np.sum([h.mask_moments for h in held], axis=0)
    n, ss, si, sss, sii, ssi = mom
    cov = ssi / n - ss / n * si / n
    var_s, var_i = sss / n - (ss / n) ** 2, sii / n - (si / n) ** 2
    fig4 = {
        "mask_corr_s_iou": float(cov / math.sqrt(var_s * var_i))
        if var_s > 0 and var_i > 0
        else math.nan,
        "cluster_corr_S_mean_iou": pearson(
            s_all, np.concatenate([h.cluster_mean_iou for h in held]).astype(np.float64)
        ),
        "learned_prior_reject_threshold": learned.prior_reject_threshold,
        "learned_prior_accept_threshold": learned.prior_accept_threshold,
    }

    # Phase 2: every method on every class.
    universal_sizes = tuple(
        float(v) for v in np.geomspace(max(n_total / len(classes), 2.0), 1.0, UNIVERSAL_POINTS)
    )
    jobs = [
        replace(base, class_id=c, rank=r, selection=selection, universal_sizes=universal_sizes)
        for r, c in enumerate(classes)
    ]
    outcomes = sorted(
        _map(
            simulate_class,
            jobs,
            n_workers,
            [class_bytes(int(sizes[j.class_id]), source.dim()) for j in jobs],
            budget,
            "classes",
            progress,
        ),
        key=lambda o: o.class_id,
    )

    def total(name: str, pick: Callable[[ClassOutcome], MethodOutcome]) -> MethodOutcome:
        parts = [pick(o) for o in outcomes]
        out = MethodOutcome(IouStats(), 0, 0, 0, BinnedLog.empty(), {})
        for p in parts:
            out.stats = out.stats + p.stats
            out.questions += p.questions
            out.polygons += p.polygons
            out.clusters += p.clusters
            out.log = out.log + p.log
            for k, v in p.decisions.items():
                out.decisions[k] = out.decisions.get(k, 0) + v
        return out

    names = ("maskprop", "manual", "naive_verification", "lsun")
    merged = {name: total(name, lambda o, name=name: o.methods[name]) for name in names}  # type: ignore[misc]
    report: dict[str, Any] = {
        name: summarize_stats(m.stats, m.questions, m.polygons, m.clusters, params)
        for name, m in merged.items()
    }
    report["maskprop"]["decisions"] = merged["maskprop"].decisions
    report["config"] = {
        "masks": n_total,
        "heldout_masks": int(held_sizes.sum()),
        "classes": len(classes),
        "largest_class": int(sizes.max()),
        "seed": seed,
        "strategy": strategy,
        "annotator_error": annotator_error,
        "params": params.as_dict(),
        "selection_used": {
            "prior_reject_threshold": selection.prior_reject_threshold,
            "prior_accept_threshold": selection.prior_accept_threshold,
        },
        "workers": n_workers,
    }
    report["fig4"] = fig4
    search_curves: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]] = {}
    if strategy_curves:
        from maskprop.simulate.runner import CURVE_STRATEGIES

        for name in CURVE_STRATEGIES:
            if name == "universal":
                ks = np.sum([o.universal[0] for o in outcomes if o.universal is not None], axis=0)
                gots = np.sum([o.universal[1] for o in outcomes if o.universal is not None], axis=0)
                search_curves[name] = (ks.astype(np.int64), gots.astype(np.int64))
                continue
            log = BinnedLog.empty()
            for o in outcomes:
                log = log + o.search[name]
            search_curves[name] = _geom_points(log)
        report["search_curves"] = {
            name: {"clusters": xs.tolist(), "masks": ys.tolist()}
            for name, (xs, ys) in search_curves.items()
        }
    if ablation:
        rows = {}
        for name, change in ABLATION.items():
            m = total(name, lambda o, name=name: o.ablation[name])  # type: ignore[misc]
            s = summarize_stats(m.stats, m.questions, 0, m.clusters, replace(params, **change))  # type: ignore[arg-type]
            rows[name] = {
                k: s[k] for k in ("quantity", "questions", "masks_per_question", "sq", "precision")
            }
        base_mpq = rows["paper_fixed_ns"]["masks_per_question"] or math.nan
        for row in rows.values():
            mpq = row["masks_per_question"]
            row["masks_per_question_vs_paper"] = mpq / base_mpq if mpq else None
        report["ablation"] = rows
    return ClasswiseOutput(
        report=report,
        curves={name: m.log.curve() for name, m in merged.items()},
        search_curves=search_curves,
        likelihoods=lik,
        peak_class_rss_bytes=max(o.peak_rss_bytes for o in outcomes),
    )
