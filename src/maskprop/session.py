"""The annotation session: Algorithm 1 of the paper as a resumable state machine.

A session walks the trees of every class of a campaign.  It hands out verification questions
(:meth:`AnnotationSession.lease`), consumes answers one at a time in any order
(:meth:`AnnotationSession.submit`), decides clusters (accept / reject / split, Sec. 4.4-4.5,
after the score-based selection of Sec. 4.3) and propagates labels to every mask of a decided
cluster with provenance.  Decisions accumulate in an outbox (:meth:`pop_decisions`) so a service
can publish them after persisting the state.

The whole state serialises to canonical bytes (:meth:`snapshot`); :meth:`restore` rebuilds a
session that continues exactly as the original would have, and whose snapshot is byte-identical.
A service saves it after every call, so it is cheap to write: ``b"MPS3"``, the length of a
canonical-JSON header (uint32, little-endian), the header (everything but the per-mask
arrays), then per class in class order the raw arrays ``labels int8[n] | label_node
int32[n] (little-endian) | label_source int8[n] | answers int8[n]`` (-1 not asked, 0 no,
1 yes): 7 bytes a mask, not compressed (zlib cost ~100 us a save for 1,500 masks, more than
all the rest of the snapshot).  Any other format (the magic names it) is refused with a
:class:`MaskpropError`.
Trees are not part of the snapshot (they are large and stored once by the clusterer); a checksum
of each tree is, so a snapshot is never restored over different trees.  The header's
``version`` is 5.  An older snapshot restores into a session that goes on as its writer did,
so a replica replaying an older replica's log reaches the writer's state exactly: version 4
drew cluster samples with a numpy generator seeded per cluster (5 uses
:func:`maskprop.verification.sample_order`, ~13x cheaper), and version 3 also visited quiet
subtrees (see below) node by node.

A snapshot grows with the class (7 bytes a mask: 70 MB at a 10M-mask class), so a service saves
a *base* and then an append-only *log* of what changed, bytes proportional to the calls made,
not to n (issue #14)::

    base = session.rebase()          # a snapshot; the log starts afresh over it
    ...                              # lease / submit / expire / pop_decisions /
                                     # decide_without_asking / prepare
    chunk = session.take_log()       # the changes since the last save (b"" if none)
    if session.needs_rebase():       # the log reached a quarter of the base: compact
        base = session.rebase()      # (save it in place of the base, drop the chunks)
    AnnotationSession.restore(base, trees, log=chunks)   # == the live session, byte for byte

The log records the calls that changed the state (a lease's arguments, the answers applied, the
questions expired, a pop of the outbox, a decide-without-asking), not their effects: the
session is deterministic (each cluster's sample is keyed by (seed, class, node)), so replaying
them over the base rebuilds the same state exactly, RNG included, and costs what the calls cost
live.  Chunk format: ``b"MPL1"``, 8 bytes naming the base (:func:`base_tag`), a sequence
number, records (see ``_LOG_MAGIC``); a chunk over another base or out of order is refused.

Per-node and per-mask state lives in numpy arrays; recording an answer is O(1) (answers are
indexed by depth-first position, with a count per block of 1024 positions for finding a
cluster's inherited answers).

Most nodes of a large tree need no question: a split-without-asking cluster whose subtree
holds no leaf scored above K_pa (so, its scores being means, no cluster to ask) is decided
with everything below it in one numpy pass (:meth:`AnnotationSession._sweep_quiet`) when
its parent is split, not node by node through the frontier.  Such nodes only ever push more
of themselves, so the clusters that are asked about pop in the same order and every label,
count and question is the same; only where their decisions sit in the outbox changes.  At a
700k-mask class this removed ~90 % of the ~500k frontier visits of each run.

Masks are named per class by their leaf index in that class's tree (0..n_c-1).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import repeat
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.search import Frontier, make_frontier
from maskprop.selection import PRIOR_ASK, PRIOR_REJECT, PRIOR_SPLIT, Selection
from maskprop.tree import Tree
from maskprop.verification import (
    Verdict,
    questions_per_round,
    sample_order,
    target_answers,
    verdict,
)

_MAGIC = b"MPS3"
#: The header's ``version`` a new session writes (see the module docstring for older ones).
SNAPSHOT_VERSION = 5
_HEADER_LEN = struct.Struct("<I")

# Answers by depth-first position are counted per block of 1024 positions.
_BLOCK_BITS = 10
_BLOCK = 1 << _BLOCK_BITS
_DIRECT_SCAN = 4 * _BLOCK  # clusters this small are scanned position by position
_LIST_SCAN = 64  # and this small, as Python lists


def _n_blocks(n: int) -> int:
    return (n + _BLOCK - 1) >> _BLOCK_BITS


def _empty_positions(n: int) -> NDArray[np.int8]:
    """int8 codes by depth-first position, padded to whole blocks with -1 (not asked)."""
    return np.full(_n_blocks(n) * _BLOCK, -1, np.int8)


# The change log (see the module docstring).  A chunk is ``_LOG_MAGIC``, the base's tag
# (8 bytes), its sequence number since that base (uint32, from 1), then records:
#   b"L" max_questions:int32 max_new_clusters:int32 (-1: unbounded)     a lease call
#   b"S" k:uint32 then k x (class:int32 node:int32 mask:int32 label:uint8)  applied answers
#   b"E" k:uint32 then k x (class:int32 node:int32 mask:int32)            expired questions
#   b"P"                                                                  pop_decisions
#   b"D"                                                          decide_without_asking
#   b"O" questions:uint32                                                 prepare
# all little-endian.
_LOG_MAGIC = b"MPL1"
_CHUNK_HEAD = struct.Struct("<4s8sI")
_INT32_MAX = 2**31 - 1
_LEASE = struct.Struct("<cii")
_COUNT = struct.Struct("<cI")
_ANSWER = np.dtype([("c", "<i4"), ("node", "<i4"), ("mask", "<i4"), ("label", "u1")])
_QUESTION = np.dtype([("c", "<i4"), ("node", "<i4"), ("mask", "<i4")])
#: A log this small never asks for a new base, whatever the base's size.
MIN_LOG_BEFORE_REBASE = 64 * 1024


def base_tag(base: bytes) -> bytes:
    """8 bytes naming a base snapshot; every log chunk written over it carries them."""
    return hashlib.blake2b(base, digest_size=8).digest()


@dataclass
class _Log:
    """What changed since the base ``tag`` (see :meth:`AnnotationSession.take_log`)."""

    tag: bytes
    base_bytes: int  # size of the base: compaction compares the log with it
    seq: int = 0  # chunks handed out since the base
    written: int = 0  # bytes of those chunks
    pending: list[bytes] = field(default_factory=list)
    pending_bytes: int = 0

    def add(self, record: bytes) -> None:
        self.pending.append(record)
        self.pending_bytes += len(record)


class LabelSource(IntEnum):
    """Where a mask's label came from."""

    NONE = 0  # not decided yet
    PROPAGATED = 1  # from the decision of the cluster holding it
    VERIFIED = 2  # from a person's answer about this very mask (label reuse)


class Question(NamedTuple):
    """Ask whether mask ``mask`` of class ``class_id`` is correct, on behalf of ``node``.
    (Named tuples, like :class:`Answer` and :class:`Decision`: services build one per answer
    and a frozen dataclass cost ~4x as much to build.)"""

    class_id: int
    node: int
    mask: int


class Answer(NamedTuple):
    """A person's yes (True) / no (False) to a :class:`Question`."""

    class_id: int
    node: int
    mask: int
    label: bool


# Plain ints for scalar writes into int8 arrays (an IntEnum converts several times slower).
_PROPAGATED, _VERIFIED = int(LabelSource.PROPAGATED), int(LabelSource.VERIFIED)

#: Outcomes that label nothing: the cluster's children become candidates instead.
SPLITS = frozenset({"split", "auto_split"})


class Decision(NamedTuple):
    """What happened to a cluster.

    outcome : ``accept``, ``reject`` (people said so), ``auto_reject`` (S_j <= K_pr),
        ``skip`` (a leaf with S_j <= K_pa: nothing to split), ``split`` (people),
        ``auto_split`` (K_pr < S_j <= K_pa).
    yes, answered : the answers the decision used (inherited ones included).
    new_answers : answers people gave for this very cluster.

    A sweep makes one per visited node (~5 per answer).
    """

    class_id: int
    node: int
    outcome: str
    yes: int
    answered: int
    new_answers: int

    @property
    def terminal(self) -> bool:
        return self.outcome not in SPLITS


_tuple_new = tuple.__new__


@dataclass
class _Open:
    """A cluster being verified."""

    sample: list[int]  # masks to ask, in sample order
    leased: int = 0  # sample[:leased] have been handed out
    outstanding: set[int] = field(default_factory=set)
    answered: dict[int, bool] = field(default_factory=dict)  # answers the verdict counts
    new_answers: int = 0


#: Cluster samples by (seed, class, node, masks drawn): see ``AnnotationSession(samples=...)``.
SampleMemo = MutableMapping[tuple[int, int, int, int], NDArray[np.int32]]

#: Quiet outcomes by the code :meth:`AnnotationSession._sweep_quiet` gives them.
_QUIET_OUTCOMES = ("auto_reject", "skip", "auto_split")
#: Subtrees of fewer leaves are visited node by node (numpy's per-call cost would exceed it).
QUIET_SWEEP_MIN_LEAVES = 32


def _quiet_subtrees(tree: Tree, priors: NDArray[np.int8]) -> NDArray[np.bool_]:
    """bool[2n-1]: internal nodes of at least :data:`QUIET_SWEEP_MIN_LEAVES` leaves with no
    leaf to ask about below them.  A cluster's score is the mean of its leaves' scores, so
    such a subtree needs no question anywhere (up to rounding, which
    :meth:`AnnotationSession._sweep_quiet` checks).  O(n), one byte a node."""
    n = tree.n_leaves
    ask_at = np.concatenate(([0], np.cumsum(priors[tree.order] == PRIOR_ASK, dtype=np.int64)))
    start = tree.start
    end = start + tree.size
    quiet = (ask_at[end] == ask_at[start]) & (tree.size >= QUIET_SWEEP_MIN_LEAVES)
    quiet[:n] = False
    return quiet


def tree_checksum(tree: Tree) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(tree.to_linkage()).tobytes())
    h.update(np.ascontiguousarray(tree.scores).tobytes())
    return h.hexdigest()[:16]


class AnnotationSession:
    """Selecting, annotating and propagating over the trees of a campaign (Algorithm 1).

    Parameters
    ----------
    trees : class id -> tree of that class's masks.
    params : thresholds and rules.
    selection : K_pr / K_pa for the score-based selection.
    strategy : search order, a key of :data:`maskprop.search.STRATEGIES`.
    seed : seeds the sampling of masks to verify (with the class and node, per cluster).
    priorities : class id -> float64[2n-1] search priority per node; defaults to S_j.  The
        simulator passes true cluster quality here for the "oracle" upper bound of Fig. 6b.
    samples : a memo of cluster samples that sessions over the same trees may share (the
        simulator's session runs of one class ask mostly the same clusters; with version 4's
        numpy generator ~30 % of their time went to drawing the same samples again).  A
        sample is a function of (seed, class, node, size) alone, so a session's questions and
        labels are the same with or without it.
    """

    def __init__(
        self,
        trees: Mapping[int, Tree],
        params: AnnotationParams,
        selection: Selection,
        *,
        strategy: str = "heuristic",
        seed: int = 0,
        priorities: Mapping[int, NDArray[np.float64]] | None = None,
        samples: SampleMemo | None = None,
        _restoring: bool = False,
        _version: int = SNAPSHOT_VERSION,
    ) -> None:
        if not trees:
            raise MaskpropError("a session needs at least one class tree")
        self.params = params
        self.selection = selection
        self.strategy = strategy
        self.seed = seed
        self._samples = samples
        self._trees = {int(c): trees[c] for c in sorted(trees)}
        self._scores = {c: t.cluster_scores() for c, t in self._trees.items()}
        # Per node in numpy arrays (int8 and the tree's own int32 children): Python lists of
        # 2n-1 entries cost ~200 B a mask, 2 GB at a 10M-mask class.
        self._priors = {c: selection.decide_many(sc) for c, sc in self._scores.items()}
        self._left = {c: t.left for c, t in self._trees.items()}
        self._right = {c: t.right for c, t in self._trees.items()}
        # A session restored from an older snapshot goes on as its writer did, so its
        # replayed log and later decisions are those of the process that wrote them: quiet
        # subtrees decided at once from version 4, samples by ``sample_order`` from 5.
        self._version = _version
        self._quiet = {
            c: _quiet_subtrees(t, self._priors[c])
            if _version >= 4
            else np.zeros(t.n_nodes, np.bool_)
            for c, t in self._trees.items()
        }
        self._priorities = (
            {int(c): np.asarray(p, dtype=np.float64) for c, p in priorities.items()}
            if priorities is not None
            else self._scores
        )
        self._frontier: Frontier = make_frontier(strategy, self._priorities)
        self._labels = {c: np.full(t.n_leaves, -1, np.int8) for c, t in self._trees.items()}
        self._label_node = {c: np.full(t.n_leaves, -1, np.int32) for c, t in self._trees.items()}
        self._label_source = {c: np.zeros(t.n_leaves, np.int8) for c, t in self._trees.items()}
        # People's answers per mask, int8[n] (-1 not asked, 0 no, 1 yes): what the snapshot
        # stores.  The same codes by depth-first position (a cluster is a range of positions)
        # with a count per block of positions, so a cluster's inherited answers are found
        # without a sorted list (inserting into one cost O(answers) an answer).
        self._answer_codes = {c: np.full(t.n_leaves, -1, np.int8) for c, t in self._trees.items()}
        self._answer_at = {c: _empty_positions(t.n_leaves) for c, t in self._trees.items()}
        self._block_answers = {
            c: np.zeros(_n_blocks(t.n_leaves), np.int32) for c, t in self._trees.items()
        }
        self._n_answered = dict.fromkeys(self._trees, 0)
        self._params_state = params.as_dict()
        self._open: dict[tuple[int, int], _Open] = {}
        self._outbox: list[Decision] = []
        self._checksums: dict[int, str] = {}
        self.questions = 0  # answers received from people
        self.clusters_annotated = 0  # clusters decided with at least one new answer
        self.outcomes: dict[str, int] = {}  # decisions so far, by outcome
        # The change log since the last base (None: no base yet, nothing is logged).
        self._log: _Log | None = None
        if not _restoring:
            self._frontier.push_roots([(c, t.root) for c, t in self._trees.items()])

    # ------------------------------------------------------------------ queries
    @property
    def trees(self) -> Mapping[int, Tree]:
        return self._trees

    @property
    def done(self) -> bool:
        return not self._open and len(self._frontier) == 0

    def labels(self, class_id: int) -> NDArray[np.int8]:
        """int8[n_c]: 1 accepted, 0 rejected, -1 undecided (a read-only view)."""
        v = self._labels[class_id].view()
        v.flags.writeable = False
        return v

    def label_provenance(self, class_id: int) -> tuple[NDArray[np.int32], NDArray[np.int8]]:
        """(node that decided each mask or -1, :class:`LabelSource` of each mask)."""
        return self._label_node[class_id].copy(), self._label_source[class_id].copy()

    def decision_labels(
        self, decision: Decision
    ) -> tuple[NDArray[np.int32], NDArray[np.int8], NDArray[np.int8]]:
        """Masks a terminal decision labelled, with their labels and sources."""
        if not decision.terminal:
            empty = np.zeros(0, np.int8)
            return np.zeros(0, np.int32), empty, empty
        masks = self._trees[decision.class_id].leaves(decision.node)
        return (
            masks.copy(),
            self._labels[decision.class_id][masks],
            self._label_source[decision.class_id][masks],
        )

    def decisions_labels(
        self, decisions: Sequence[Decision]
    ) -> tuple[NDArray[np.int64], NDArray[np.int8], NDArray[np.int8], NDArray[np.int64]]:
        """:meth:`decision_labels` of several decisions of one class at once, concatenated:
        (masks, labels, sources, index in ``decisions`` of each mask's decision).  A sweep
        decides thousands of one-mask clusters a call; numpy per decision cost more than
        the labels."""
        empty = np.zeros(0, np.int64)
        if not decisions:
            return empty, np.zeros(0, np.int8), np.zeros(0, np.int8), empty
        c = decisions[0].class_id
        if any(d.class_id != c for d in decisions):
            raise MaskpropError("decisions_labels takes decisions of one class")
        tree = self._trees[c]
        n = len(decisions)
        nodes = np.fromiter(map(itemgetter(1), decisions), np.int64, n)
        splits = np.fromiter(map(SPLITS.__contains__, map(itemgetter(2), decisions)), bool, n)
        terminal = np.flatnonzero(~splits)
        masks, which = tree.leaves_of(nodes[terminal])
        return masks, self._labels[c][masks], self._label_source[c][masks], terminal[which]

    def progress(self) -> dict[int, dict[str, int]]:
        """Per class: accepted/rejected masks, undecided masks, open clusters."""
        out: dict[int, dict[str, int]] = {}
        for c, lab in self._labels.items():
            out[c] = {
                "masks": int(lab.shape[0]),
                "accepted_masks": int((lab == 1).sum()),
                "rejected_masks": int((lab == 0).sum()),
                "undecided_masks": int((lab < 0).sum()),
                "open_clusters": sum(1 for (k, _) in self._open if k == c),
            }
        return out

    def open_clusters(self, class_id: int) -> int:
        """Clusters of ``class_id`` being verified (opened by a lease, not decided yet)."""
        return sum(1 for (k, _) in self._open if k == class_id)

    def questions_ready(self) -> int:
        """About how many questions :meth:`lease` could hand out now: the sample not yet
        leased of every open cluster, plus ``samples_per_cluster`` per candidate cluster (a
        candidate may give fewer, or more when it is split automatically).  0 exactly when
        :meth:`has_questions` is False.  O(open clusters); a service stores it beside the
        state so a lease picks classes without loading them."""
        if not self.has_questions():
            return 0
        sequential = self.params.sequential != "off"
        open_left = sum(
            len(oc.sample) - oc.leased
            for oc in self._open.values()
            if not (sequential and oc.outstanding)
        )
        return max(1, open_left + len(self._frontier) * self.params.samples_per_cluster)

    def is_answered(self, class_id: int, mask: int) -> bool:
        """Whether a person already answered about this mask."""
        codes = self._answer_codes.get(class_id)
        return codes is not None and 0 <= mask < codes.shape[0] and bool(codes[mask] >= 0)

    def has_questions(self) -> bool:
        """Whether :meth:`lease` might hand out a question now; False means it would return
        nothing and change nothing (no candidate left, every open cluster waits for the
        answers it leased)."""
        if len(self._frontier):
            return True
        sequential = self.params.sequential != "off"
        return any(
            oc.leased < len(oc.sample) and not (sequential and oc.outstanding)
            for oc in self._open.values()
        )

    def has_pending_decisions(self) -> bool:
        return bool(self._outbox)

    def pop_decisions(self) -> list[Decision]:
        """Decisions since the last call, oldest first (the caller publishes them)."""
        out, self._outbox = self._outbox, []
        if out and self._log is not None:
            self._log.add(b"P")
        return out

    # ------------------------------------------------------------------ leasing
    def lease(self, max_questions: int, *, max_new_clusters: int | None = None) -> list[Question]:
        """Up to ``max_questions`` questions, opening clusters in search order as needed.

        Clusters already open are served first.  ``max_new_clusters`` bounds how many candidate
        clusters this call may open; ``1`` with nothing open reproduces Algorithm 1's strict
        one-cluster-at-a-time order (the simulator's setting), while a crowd service leaves it
        unbounded so many workers can answer different clusters at once.
        """
        if max_questions < 1:
            raise MaskpropError("max_questions must be at least 1")
        # The log packs both as int32; no call can hand out more than 2**31 - 1 questions or
        # open more clusters, so clamping changes nothing and keeps the log exact.
        max_questions = min(max_questions, _INT32_MAX)
        if max_new_clusters is not None:
            max_new_clusters = min(max_new_clusters, _INT32_MAX)
        log = self._log
        if log is None:
            return self._lease(max_questions, max_new_clusters)
        before = (len(self._frontier), len(self._outbox), len(self._open))
        out = self._lease(max_questions, max_new_clusters)
        if out or before != (len(self._frontier), len(self._outbox), len(self._open)):
            bound = -1 if max_new_clusters is None else max(max_new_clusters, 0)
            log.add(_LEASE.pack(b"L", max_questions, bound))
        return out

    def _lease(self, max_questions: int, max_new_clusters: int | None) -> list[Question]:
        out: list[Question] = []
        for key in list(self._open):
            if len(out) >= max_questions:
                return out
            self._lease_from(key, self._open[key], max_questions - len(out), out)
        opened = 0
        while len(out) < max_questions and len(self._frontier):
            if max_new_clusters is not None and opened >= max_new_clusters:
                break
            new_key, _ = self._advance(until_open=True)
            if new_key is not None:
                opened += 1
                self._lease_from(new_key, self._open[new_key], max_questions - len(out), out)
        return out

    def _lease_from(self, key: tuple[int, int], oc: _Open, limit: int, out: list[Question]) -> None:
        c, node = key
        take = min(self._leasable(key, oc), limit)
        for mask in oc.sample[oc.leased : oc.leased + take]:
            oc.outstanding.add(mask)
            out.append(Question(c, node, mask))
        oc.leased += take

    def decide_without_asking(self) -> int:
        """Advance every candidate left on the frontier without handing out a question.

        What needs no question is decided as a lease would decide it: a prior reject, a split
        (its children are advanced in turn), a cluster the answers already given settle.  Any
        other cluster is opened and waits, its questions not handed out (its masks stay
        undecided; a later :meth:`lease` serves it first).  For when asking has ended (the
        campaign's budget is spent): the decisions that cost nothing still come, so a run
        whose budget is exactly the questions it needs labels the same masks as one with
        budget to spare.  Returns the candidates advanced (0: nothing changed, nothing
        logged)."""
        _, n = self._advance(until_open=False)
        if n and self._log is not None:
            self._log.add(b"D")
        return n

    def prepare(self, questions: int) -> int:
        """Open clusters in search order, deciding what needs no question on the way, until
        ``questions`` questions could be leased at once or no candidate is left; their
        questions wait for the next :meth:`lease`, which serves open clusters first.

        The steps an unbounded lease of ``questions`` would take, done ahead of it.  A service
        calls it when a class arrives: the sweep a large tree starts with (a 1M-mask class
        decided ~470k leaves in ~3 s here, inside its first lease) then runs there, not
        inside a crowd's lease.  A cluster's sample and decision do not depend on when it
        was opened (its ancestors are decided before it becomes a candidate), so labels are
        those of a session that never prepared.  Returns the candidates advanced (0:
        nothing changed, nothing logged)."""
        if questions < 0:
            raise MaskpropError("questions must not be negative")
        questions = min(questions, _INT32_MAX)
        popped = 0
        ready = sum(self._leasable(key, oc) for key, oc in self._open.items())
        while len(self._frontier) and ready < questions:
            key, n = self._advance(until_open=True)
            popped += n
            if key is not None:
                ready += self._leasable(key, self._open[key])
        if popped and self._log is not None:
            self._log.add(_COUNT.pack(b"O", questions))
        return popped

    def _leasable(self, key: tuple[int, int], oc: _Open) -> int:
        """The questions an unbounded :meth:`lease` would hand out from open cluster ``key``
        now (:meth:`_lease_from` hands out up to this many)."""
        left = len(oc.sample) - oc.leased
        if self.params.sequential == "off":
            return left
        if oc.outstanding:
            return 0  # sequential: the next batch only once the previous one is answered
        c, node = key
        size = int(self._trees[c].size[node])
        return min(left, questions_per_round(len(oc.answered), size, self.params))

    def expire(self, questions: Iterable[Question]) -> None:
        """Give leased but unanswered questions back so they are leased again."""
        expired: list[tuple[int, int, int]] = []
        for q in questions:
            oc = self._open.get((q.class_id, q.node))
            if oc is None or q.mask not in oc.outstanding:
                continue
            expired.append((q.class_id, q.node, q.mask))
            oc.outstanding.discard(q.mask)
            # Move it to the first unleased slot so the sample order stays a permutation.
            i = oc.sample.index(q.mask)
            oc.sample.pop(i)
            oc.leased -= 1
            oc.sample.insert(oc.leased, q.mask)
        if expired and self._log is not None:
            rows = np.array(expired, dtype=np.int64).astype("<i4")
            self._log.add(_COUNT.pack(b"E", len(expired)) + rows.tobytes())

    def _advance(self, *, until_open: bool) -> tuple[tuple[int, int] | None, int]:
        """Pop candidates and apply selection; returns (the key of the candidate opened or
        None, the candidates popped).

        ``until_open``: until one is opened and awaits answers, or the frontier is empty.
        Otherwise until the frontier is empty, opened candidates left waiting.
        """
        frontier, priors, reuse = self._frontier, self._priors, self.params.reuse_answers
        popped = 0
        while len(frontier):
            c, node = frontier.pop()
            popped += 1
            prior = priors[c].item(node)
            if prior != PRIOR_ASK:
                self._finish(c, node, self._quiet_outcome(c, node, prior), 0, 0, 0)
                continue
            tree = self._trees[c]
            inherited = self._inherited(c, node) if reuse else {}
            size = int(tree.size[node])
            need = max(target_answers(size, self.params) - len(inherited), 0)
            oc = _Open(sample=[], answered=dict(inherited))
            if need and (
                not inherited
                or verdict(sum(inherited.values()), len(inherited), size, self.params)
                is Verdict.MORE
            ):
                # Only a cluster the answers it inherits do not settle is sampled (the
                # sample, seeded per cluster, is the same whenever it is drawn).
                oc.sample = self._sample(c, node, need, inherited)
            key = (c, node)
            self._open[key] = oc
            if self._try_decide(key, oc) or not until_open:
                continue
            return key, popped
        return None, popped

    def _quiet_outcome(self, c: int, node: int, prior: int) -> str:
        """The decision a candidate gets without a question: a prior reject, a split without
        asking, or (a leaf: nothing to split) a skip."""
        if prior == PRIOR_REJECT:
            return "auto_reject"
        return "skip" if self._left[c].item(node) < 0 else "auto_split"

    def _expand(self, c: int, node: int) -> None:
        """Make a split cluster's children candidates.

        A child decided without a question and without children of its own (a prior reject,
        a leaf to skip: about half the nodes of a large tree) is decided here rather than
        pushed and popped.  What else the frontier holds, and so the order the other
        candidates pop in, does not change: the heuristic order is a total order over the
        items present (priority, class, node), bfs and dfs keep their insertion order, and
        a terminal item only ever left them again.  Nor do its labels: no cluster holding
        its masks can be opened meanwhile.  Only its decision comes earlier in the outbox.
        """
        priors, lefts, quiet = self._priors[c], self._left[c], self._quiet[c]
        kids: list[tuple[int, int]] = []
        for j in (lefts.item(node), self._right[c].item(node)):
            prior = priors.item(j)
            if prior == PRIOR_REJECT:
                self._finish(c, j, "auto_reject", 0, 0, 0)
            elif prior == PRIOR_SPLIT and lefts.item(j) < 0:
                self._finish(c, j, "skip", 0, 0, 0)
            elif not (quiet.item(j) and self._sweep_quiet(c, j)):
                kids.append((c, j))
        if kids:
            self._frontier.push_children((c, node), kids)

    def _sweep_quiet(self, c: int, top: int) -> bool:
        """Decide split-without-asking cluster ``top`` and everything below it that a search
        would visit, at once, if none of it needs a question; False (nothing changed) if
        some cluster below would be asked about.

        Most nodes of a large tree lie in such subtrees (S_j <= K_pa all the way down: 90 %
        of the ~500k nodes a 700k-mask class decides without a question), and their order
        in the frontier changes nothing else: they only ever push more of themselves, so the
        clusters that are asked about pop in the same order.  The decisions, labels and
        counts are those of visiting the subtree node by node; they come in breadth-first
        order, ahead of where the frontier would have put them (as :meth:`_expand` does for
        a single quiet child)."""
        tree, priors = self._trees[c], self._priors[c]
        left, right = tree.left, tree.right
        level = np.array([top], np.int64)
        levels: list[NDArray[np.int64]] = []
        while level.shape[0]:
            p = priors[level]
            if (p == PRIOR_ASK).any():
                return False  # a mean of scores rounded above K_pa: the slow path is exact
            levels.append(level)
            split = level[(p == PRIOR_SPLIT) & (left[level] >= 0)]
            level = np.column_stack((left[split], right[split])).ravel().astype(np.int64)
        nodes = np.concatenate(levels)
        codes = (priors[nodes] == PRIOR_SPLIT).astype(np.int64) * (1 + (left[nodes] >= 0))
        # 0 auto_reject, 1 skip (a leaf), 2 auto_split
        terminal = nodes[codes < 2]
        masks, which = tree.leaves_of(terminal)
        labels, source = self._labels[c], self._label_source[c]
        if (labels[masks] >= 0).any():
            raise RuntimeError(f"class {c}: cluster {top} overlaps an earlier decision")
        labels[masks] = 0
        source[masks] = _PROPAGATED
        self._label_node[c][masks] = terminal[which]
        if self.params.reuse_answers:
            self._reuse_own(c, masks)
        counts = np.bincount(codes, minlength=3).tolist()
        outcomes = self.outcomes
        for name, k in zip(_QUIET_OUTCOMES, counts, strict=True):
            if k:
                outcomes[name] = outcomes.get(name, 0) + k
        named = map(_QUIET_OUTCOMES.__getitem__, codes.tolist())
        zero = repeat(0)
        rows = zip(repeat(c), nodes.tolist(), named, zero, zero, zero)
        self._outbox.extend(map(_tuple_new, repeat(Decision), rows))
        return True

    def _inherited(self, c: int, node: int) -> dict[int, bool]:
        """Answers people gave about masks of ``node``, in depth-first order."""
        if not self._n_answered[c]:
            return {}
        tree = self._trees[c]
        lo = int(tree.start[node])
        hi = lo + int(tree.size[node])
        at = self._answer_at[c]
        if hi - lo <= _LIST_SCAN:
            # Most clusters a search opens are small: Python lists beat numpy's per-call cost.
            codes = at[lo:hi].tolist()
            if max(codes) < 0:
                return {}
            order = tree.order[lo:hi].tolist()
            return {m: a == 1 for m, a in zip(order, codes, strict=True) if a >= 0}
        if hi - lo <= _DIRECT_SCAN:
            pos = np.flatnonzero(at[lo:hi] >= 0) + lo
        else:
            # Only blocks holding an answer are scanned: ~size/1024 counters plus 1 KiB a
            # block with answers, instead of the whole range.
            b0, b1 = lo >> _BLOCK_BITS, (hi - 1) >> _BLOCK_BITS
            blocks = np.flatnonzero(self._block_answers[c][b0 : b1 + 1]) + b0
            if blocks.shape[0] == 0:
                return {}
            rows, cols = np.nonzero(at.reshape(-1, _BLOCK)[blocks] >= 0)
            pos = (blocks[rows] << _BLOCK_BITS) + cols
            pos = pos[(pos >= lo) & (pos < hi)]
        if pos.shape[0] == 0:
            return {}
        masks = tree.order[pos].tolist()
        return dict(zip(masks, (at[pos] == 1).tolist(), strict=True))

    def _sample(self, c: int, node: int, need: int, exclude: Mapping[int, bool]) -> list[int]:
        if need == 0:
            return []
        k = min(int(self._trees[c].size[node]), need + len(exclude))
        memo = self._samples
        key = (self.seed, c, node, k)
        picked = None if memo is None else memo.get(key)
        if picked is None:
            members = self._trees[c].leaves(node)
            # A function of (session seed, class, node): a cluster's sample does not depend
            # on the order clusters were opened in, so concurrent crowds, lease sizes and
            # restarts all reach the same labels as a one-at-a-time run.
            if self._version >= 5:
                picked = members[sample_order(self.seed, c, node, members.shape[0], k)]
            else:  # how versions 3 and 4 drew them (~40-75 us a cluster)
                rng = np.random.default_rng([self.seed, c, node])
                picked = members[rng.choice(members.shape[0], size=k, replace=False)]
            if memo is not None:
                memo[key] = picked  # int32, ~300 B an entry with its key
        return [m for m in picked.tolist() if m not in exclude][:need]

    # ------------------------------------------------------------------ answers
    def submit(self, answers: Iterable[Answer]) -> list[Decision]:
        """Record answers; returns the decisions they completed (also kept in the outbox).

        An answer to a question that was never leased raises :class:`MaskpropError`; a repeated
        answer to an already answered question is ignored (idempotent).
        """
        decided: list[Decision] = []
        applied: list[tuple[int, int, int, bool]] | None = None if self._log is None else []
        try:
            self._submit(answers, decided, applied)
        finally:
            # Only the answers applied are logged: a bad answer mid-batch stops the batch.
            if applied and self._log is not None:
                rows = np.array(applied, dtype=_ANSWER)
                self._log.add(_COUNT.pack(b"S", len(applied)) + rows.tobytes())
        return decided

    def _submit(
        self,
        answers: Iterable[Answer],
        decided: list[Decision],
        applied: list[tuple[int, int, int, bool]] | None,
    ) -> None:
        for a in answers:
            key = (a.class_id, a.node)
            oc = self._open.get(key)
            if oc is None or a.mask not in oc.outstanding:
                if self._already_answered(a):
                    continue
                raise MaskpropError(
                    f"no open question for class {a.class_id}, cluster {a.node}, mask {a.mask}"
                )
            oc.outstanding.discard(a.mask)
            label = bool(a.label)
            if applied is not None:
                applied.append((a.class_id, a.node, a.mask, label))
            oc.answered[a.mask] = label
            oc.new_answers += 1
            self.questions += 1
            self._record_answer(a.class_id, a.mask, label)
            if not oc.outstanding:
                before = len(self._outbox)
                self._try_decide(key, oc)
                decided.extend(self._outbox[before:])

    def _already_answered(self, a: Answer) -> bool:
        return self.is_answered(a.class_id, a.mask)

    def _record_answer(self, c: int, mask: int, label: bool) -> None:
        # O(1): a leaf's start is its depth-first position.
        codes = self._answer_codes[c]
        pos = self._trees[c].start.item(mask)
        if codes.item(mask) < 0:
            self._block_answers[c][pos >> _BLOCK_BITS] += 1
            self._n_answered[c] += 1
        codes[mask] = label
        self._answer_at[c][pos] = label

    def _try_decide(self, key: tuple[int, int], oc: _Open) -> bool:
        c, node = key
        tree = self._trees[c]
        size = int(tree.size[node])
        yes = sum(oc.answered.values())
        v = verdict(yes, len(oc.answered), size, self.params)
        if v is Verdict.MORE:
            if oc.leased < len(oc.sample) or oc.outstanding:
                return False
            # Sample exhausted (tiny cluster with reused answers): fall back to the fixed rule.
            v = verdict(yes, len(oc.answered), len(oc.answered), self.params)
        del self._open[key]
        if v is Verdict.SPLIT and tree.is_leaf(node):
            v = Verdict.REJECT
        if oc.new_answers:
            self.clusters_annotated += 1
        self._finish(c, node, v.value, yes, len(oc.answered), oc.new_answers)
        return True

    def _finish(
        self,
        c: int,
        node: int,
        outcome: str,
        yes: int,
        answered: int,
        new_answers: int,
    ) -> None:
        """Record a decision and label its masks."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        # tuple.__new__ builds the same Decision without the NamedTuple's Python-level
        # __new__: one frame less on the path most nodes of a large tree take.
        self._outbox.append(_tuple_new(Decision, (c, node, outcome, yes, answered, new_answers)))
        if outcome in SPLITS:
            self._expand(c, node)  # after the split: its children's decisions follow it
            return
        labels, source = self._labels[c], self._label_source[c]
        if self._left[c].item(node) < 0:
            # A leaf is mask ``node`` alone (most decisions of a sweep): scalar updates,
            # the same as the general case below.
            if labels.item(node) >= 0:
                raise RuntimeError(f"class {c}: cluster {node} overlaps an earlier decision")
            own = self._answer_codes[c].item(node) if self.params.reuse_answers else -1
            if own < 0:
                labels[node] = 1 if outcome == "accept" else 0
                source[node] = _PROPAGATED
            else:
                labels[node] = own
                source[node] = _VERIFIED
            self._label_node[c][node] = node
            return
        masks = self._trees[c].leaves(node)
        if (labels[masks] >= 0).any():
            raise RuntimeError(f"class {c}: cluster {node} overlaps an earlier decision")
        labels[masks] = 1 if outcome == "accept" else 0
        self._label_node[c][masks] = node
        source[masks] = LabelSource.PROPAGATED
        if self.params.reuse_answers:
            self._reuse_own(c, masks)

    def _reuse_own(self, c: int, masks: NDArray[np.integer[Any]]) -> None:
        """A person's answer about a mask of a decided cluster beats the label propagated to
        it; read from the per-mask answer codes (two numpy operations where none of
        ``masks`` was answered, most quiet clusters), not by :meth:`_inherited`'s scan."""
        own = self._answer_codes[c][masks]
        if own.shape[0] and own.max() >= 0:
            hit = own >= 0
            reused = masks[hit]
            self._labels[c][reused] = own[hit]
            self._label_source[c][reused] = _VERIFIED

    # ------------------------------------------------------------------ persistence
    def _checksum(self, class_id: int) -> str:
        # Trees never change within a session: hash each once, not on every snapshot.
        cached = self._checksums.get(class_id)
        if cached is None:
            cached = self._checksums[class_id] = tree_checksum(self._trees[class_id])
        return cached

    def rebase(self) -> bytes:
        """A new base: :meth:`snapshot` bytes, from which the change log starts afresh.

        Save it in place of the previous base and drop the previous base's log chunks; every
        later :meth:`take_log` chunk applies over it.  Logging starts with the first base (a
        session that is never saved, like the simulator's, logs nothing).
        """
        base = self.snapshot()
        self._log = _Log(tag=base_tag(base), base_bytes=len(base))
        return base

    def take_log(self) -> bytes:
        """The changes since the last :meth:`take_log` or :meth:`rebase`, as one chunk to
        append to the base's log (``b""`` when nothing changed); the pending log is cleared.

        A chunk records the calls that changed the state (leases, the answers applied,
        expired questions, decisions popped), ~13 bytes an answer and 9 a lease, whatever
        the class's size; :meth:`restore` replays them over the base.
        """
        log = self._log
        if log is None:
            raise MaskpropError("this session has no base yet: save rebase() first")
        if not log.pending:
            return b""
        log.seq += 1
        chunk = b"".join((_CHUNK_HEAD.pack(_LOG_MAGIC, log.tag, log.seq), *log.pending))
        log.pending.clear()
        log.pending_bytes = 0
        log.written += len(chunk)
        return chunk

    @property
    def log_seq(self) -> int:
        """Log chunks handed out (or applied) since the base: chunk ``log_seq + 1`` is next."""
        return 0 if self._log is None else self._log.seq

    def apply_log(self, chunks: Iterable[bytes]) -> None:
        """Bring this session up to date with chunks another process wrote over the same base
        after this session's last chunk (``log_seq + 1``, ...): a cached session catches up
        without a whole :meth:`restore`.  Refused while this session has changes of its own
        not yet taken (it would have diverged).  A chunk that fails part-way (corrupt) leaves
        the session partly updated: drop it and :meth:`restore` instead."""
        log = self._log
        if log is None:
            raise MaskpropError("this session has no base: restore it from one first")
        if log.pending:
            raise MaskpropError("this session has changes not yet saved; it cannot take a log")
        self._log = None  # replaying logs nothing
        try:
            for chunk in chunks:
                if chunk:
                    self._replay(chunk, log.tag, log.seq + 1)
                    log.seq += 1
                    log.written += len(chunk)
        finally:
            self._log = log

    @property
    def log_bytes(self) -> int:
        """Bytes of log since the base (chunks taken plus what is pending)."""
        log = self._log
        return 0 if log is None else log.written + log.pending_bytes

    def needs_rebase(self, ratio: float = 0.25, max_log_bytes: int | None = None) -> bool:
        """Whether the next save should be a new base (:meth:`rebase`) instead of a log chunk:
        no base yet, or the log since the base has reached ``ratio`` times the base's size
        (and at least :data:`MIN_LOG_BEFORE_REBASE`), or ``max_log_bytes``.

        With ``ratio`` alone the bytes written average at most ~(1 + 1/ratio) times the log
        bytes, flat in the class size; a restore then replays up to ``ratio`` of a base's
        worth of log (~13 bytes and roughly the live cost of an answer: at a 10M-mask class
        and the default, ~1.3M answers).  ``max_log_bytes`` bounds that replay at the price
        of bases written more often."""
        log = self._log
        if log is None:
            return True
        size = self.log_bytes
        if max_log_bytes is not None and size >= max_log_bytes:
            return True
        return size >= max(MIN_LOG_BEFORE_REBASE, ratio * log.base_bytes)

    def _replay(self, chunk: bytes, tag: bytes, seq: int) -> None:
        head = _CHUNK_HEAD.size
        if len(chunk) < head:
            raise MaskpropError("session log chunk is corrupt (too short)")
        magic, chunk_tag, chunk_seq = _CHUNK_HEAD.unpack_from(chunk, 0)
        if magic != _LOG_MAGIC:
            raise MaskpropError(
                f"unsupported session log format {bytes(magic)!r}: this version reads "
                f"{_LOG_MAGIC!r} logs only"
            )
        if chunk_tag != tag:
            raise MaskpropError("session log chunk was written over another base")
        if chunk_seq != seq:
            raise MaskpropError(f"session log chunk {chunk_seq} out of order (expected {seq})")
        view = memoryview(chunk)
        i = head
        try:
            while i < len(chunk):
                kind = chunk[i : i + 1]
                if kind == b"L":
                    _, mq, bound = _LEASE.unpack_from(chunk, i)
                    i += _LEASE.size
                    self.lease(mq, max_new_clusters=None if bound < 0 else bound)
                elif kind in (b"S", b"E"):
                    _, k = _COUNT.unpack_from(chunk, i)
                    i += _COUNT.size
                    dtype = _ANSWER if kind == b"S" else _QUESTION
                    end = i + k * dtype.itemsize
                    if end > len(chunk):
                        raise MaskpropError("session log chunk is corrupt (truncated record)")
                    rows = np.frombuffer(view[i:end], dtype).tolist()
                    i = end
                    if kind == b"S":
                        self.submit([Answer(c, j, m, bool(v)) for c, j, m, v in rows])
                    else:
                        self.expire([Question(c, j, m) for c, j, m in rows])
                elif kind == b"P":
                    i += 1
                    self.pop_decisions()
                elif kind == b"D":
                    i += 1
                    self.decide_without_asking()
                elif kind == b"O":
                    _, k = _COUNT.unpack_from(chunk, i)
                    i += _COUNT.size
                    self.prepare(k)
                else:
                    raise MaskpropError(f"session log chunk is corrupt (record {kind!r})")
        except struct.error:
            raise MaskpropError("session log chunk is corrupt (truncated record)") from None
        except MaskpropError as exc:
            if "corrupt" in str(exc):
                raise
            raise MaskpropError(f"session log does not apply to its base: {exc}") from None

    def snapshot(self) -> bytes:
        """Canonical bytes of the whole state (trees excluded, their checksums included)."""
        classes = {}
        blocks: list[bytes] = []
        for c in self._trees:
            classes[str(c)] = {"checksum": self._checksum(c)}
            blocks += (
                self._labels[c].tobytes(),
                self._label_node[c].astype("<i4", copy=False).tobytes(),
                self._label_source[c].tobytes(),
                self._answer_codes[c].tobytes(),
            )
        state = {
            "version": self._version,
            "params": self._params_state,
            "selection": [
                self.selection.prior_reject_threshold,
                self.selection.prior_accept_threshold,
            ],
            "strategy": self.strategy,
            "seed": self.seed,
            "frontier": self._frontier.state(),
            "classes": classes,
            "open": [
                {
                    "key": list(key),
                    "sample": oc.sample,
                    "leased": oc.leased,
                    "outstanding": sorted(oc.outstanding),
                    "answered": sorted([m, int(v)] for m, v in oc.answered.items()),
                    "new_answers": oc.new_answers,
                }
                for key, oc in self._open.items()
            ],
            "outbox": [
                [d.class_id, d.node, d.outcome, d.yes, d.answered, d.new_answers]
                for d in self._outbox
            ],
            "counters": [self.questions, self.clusters_annotated],
            "outcomes": self.outcomes,
        }
        header = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
        return b"".join((_MAGIC, _HEADER_LEN.pack(len(header)), header, *blocks))

    @classmethod
    def restore(
        cls,
        blob: bytes,
        trees: Mapping[int, Tree],
        *,
        log: Iterable[bytes] | None = None,
        priorities: Mapping[int, NDArray[np.float64]] | None = None,
    ) -> AnnotationSession:
        """Rebuild a session from a base (:meth:`snapshot` or :meth:`rebase` bytes), the
        :meth:`take_log` chunks written over it since, in order, and the same trees.

        The result's state, and so its :meth:`snapshot`, equal the live session's when it
        handed out the last chunk.  Given a ``log`` (even an empty one) it goes on logging
        over the same base (the next chunk continues the sequence); without one (a caller
        that saves whole snapshots) it logs nothing until :meth:`rebase`.
        """
        session = cls._restore_base(blob, trees, priorities)
        if log is None:
            return session
        tag = base_tag(blob)
        seq = 0
        written = 0
        for chunk in log:
            if not chunk:
                continue
            seq += 1
            session._replay(chunk, tag, seq)
            written += len(chunk)
        session._log = _Log(tag=tag, base_bytes=len(blob), seq=seq, written=written)
        return session

    @classmethod
    def _restore_base(
        cls,
        blob: bytes,
        trees: Mapping[int, Tree],
        priorities: Mapping[int, NDArray[np.float64]] | None,
    ) -> AnnotationSession:
        if not blob.startswith(_MAGIC):
            raise MaskpropError(
                f"unsupported session snapshot format {bytes(blob[: len(_MAGIC)])!r}: "
                f"this version reads {_MAGIC!r} snapshots only"
            )
        try:
            (n,) = _HEADER_LEN.unpack_from(blob, len(_MAGIC))
            body = len(_MAGIC) + _HEADER_LEN.size
            state = json.loads(blob[body : body + n])
        except (ValueError, struct.error) as exc:
            raise MaskpropError(f"session snapshot is corrupt: {exc}") from None
        arrays = memoryview(blob)[body + n :]
        if len(arrays) != 7 * sum(t.n_leaves for t in trees.values()):
            raise MaskpropError("session snapshot is corrupt (array length)")
        version = state.get("version")
        if version not in (3, 4, SNAPSHOT_VERSION):
            raise MaskpropError(f"unsupported session snapshot version {version}")
        if sorted(state["classes"], key=int) != [str(c) for c in sorted(trees)]:
            raise MaskpropError("session snapshot and trees cover different classes")
        k_pr, k_pa = state["selection"]
        session = cls(
            trees,
            AnnotationParams(**state["params"]),
            Selection(prior_reject_threshold=k_pr, prior_accept_threshold=k_pa),
            strategy=state["strategy"],
            seed=state["seed"],
            priorities=priorities,
            _restoring=True,
            _version=version,
        )
        for c, tree in session._trees.items():
            cs = state["classes"][str(c)]
            if cs["checksum"] != session._checksum(c):
                raise MaskpropError(f"class {c}: tree differs from the one the snapshot used")
            n = tree.n_leaves
            raw, arrays = arrays[: 7 * n], arrays[7 * n :]
            session._labels[c] = np.frombuffer(raw, np.int8, n, 0).copy()
            session._label_node[c] = np.frombuffer(raw, "<i4", n, n).astype(np.int32)
            session._label_source[c] = np.frombuffer(raw, np.int8, n, 5 * n).copy()
            codes = np.frombuffer(raw, np.int8, n, 6 * n).copy()
            asked = np.flatnonzero(codes >= 0)
            session._answer_codes[c] = codes
            pos = tree.start[asked]
            session._answer_at[c][pos] = codes[asked]
            session._block_answers[c] = np.bincount(
                pos >> _BLOCK_BITS, minlength=_n_blocks(n)
            ).astype(np.int32)
            session._n_answered[c] = int(asked.shape[0])
        session._frontier = make_frontier(state["strategy"], session._priorities, state["frontier"])
        for o in state["open"]:
            session._open[(o["key"][0], o["key"][1])] = _Open(
                sample=list(o["sample"]),
                leased=o["leased"],
                outstanding=set(o["outstanding"]),
                answered={int(m): bool(v) for m, v in o["answered"]},
                new_answers=o["new_answers"],
            )
        session._outbox = [Decision(*d) for d in state["outbox"]]
        session.questions, session.clusters_annotated = state["counters"]
        session.outcomes = {str(k): int(v) for k, v in state["outcomes"].items()}
        return session
