"""Worker quality control's rules, as pure functions of what quality control stored: no Redis.

Conventions (NOTES.md, "Conventions users expect"; Toloka and CVAT honeypots): a qualification
test of gold questions before real work; hidden gold mixed into real work at ``gold_share``
(5-10 % in small pools); a worker is "too fast" below about half the crowd's median answer time;
colluding workers share answers to small, repeating gold sets, so a worker never sees the same
gold item twice and the gold pool must be large and look like real questions.

The storage (gold pool, per-worker records, votes in Redis) is :mod:`maskprop_gateway.quality`;
it reads the records, calls these rules and writes what they decide.

>>> p = QualityPolicy(redundancy=3, max_redundancy=3)
>>> missing_votes({"a": True, "b": True}, p)
1
>>> st = {w: worker_state(w, {}, [1] * 10, [], None, p) for w in "abc"}
>>> decide("q", {"a": True, "b": True, "c": False}, st, p)
True
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
from crowdkit.aggregation import MajorityVote

Qualification = Literal["required", "in_progress", "passed", "failed"]

#: Vote weight floor: workers at or below chance weigh (almost) nothing, but never exactly zero,
#: so crowd-kit's normalisation stays defined when every voter is that bad.
MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class QualityPolicy:
    """Thresholds of worker quality control (all shares in [0, 1], times in seconds)."""

    qualification_size: int = 10
    qualification_pass: float = 0.8
    gold_share: float = 0.05  # share of served questions that are hidden gold
    window: int = 50  # rolling gold answers (and answer times) per worker
    min_gold: int = 8  # gold answers (answer times) before accuracy (speed) can suspend
    min_accuracy: float = 0.7
    fast_fraction: float = 0.5  # "too fast" = below fast_fraction x crowd median answer time
    max_fast_share: float = 0.3  # suspended when more of the recent answers are too fast
    discount_window_s: float = 3600  # a suspended worker's votes this close to it are ignored
    redundancy: int = 1  # counted answers per question before aggregation
    # Dynamic overlap: when the first ``redundancy`` counted answers disagree, more are asked
    # for, up to this many (default 2 x redundancy - 1), before the weighted vote decides.
    # Honest workers agree, so a disagreement flags a bad voter who may not be caught yet.
    max_redundancy: int | None = None
    # Workers a hidden gold item is shown to at most (None: as many as a real question can be,
    # ``vote_cap``), so colluding workers comparing items cannot tell gold by how often it
    # repeats; once every item reached it, no hidden gold is served until more is imported.
    gold_exposure: int | None = None
    # Beta prior of the smoothed gold accuracy (reliability): 4 right, 1 wrong -> new workers 0.8.
    prior_correct: float = 4.0
    prior_wrong: float = 1.0
    vote_ttl_s: int = 7 * 24 * 3600  # votes of a question are forgotten this long after the last

    @property
    def vote_cap(self) -> int:
        """Counted answers at which a disagreeing question is decided anyway."""
        cap = 2 * self.redundancy - 1 if self.max_redundancy is None else self.max_redundancy
        return max(self.redundancy, cap)

    @property
    def gold_cap(self) -> int:
        """Workers a hidden gold item is shown to at most."""
        return self.vote_cap if self.gold_exposure is None else self.gold_exposure

    def __post_init__(self) -> None:
        shares = ("qualification_pass", "gold_share", "min_accuracy", "max_fast_share")
        for name in shares:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.qualification_size < 0:
            raise ValueError("qualification_size must be >= 0")
        if not 1 <= self.min_gold <= self.window:
            raise ValueError("need 1 <= min_gold <= window")
        if self.fast_fraction <= 0 or self.discount_window_s < 0 or self.vote_ttl_s <= 0:
            raise ValueError("fast_fraction and vote_ttl_s must be > 0, discount_window_s >= 0")
        if self.redundancy < 1:
            raise ValueError("redundancy must be >= 1")
        if self.gold_exposure is not None and self.gold_exposure < 1:
            raise ValueError("gold_exposure must be >= 1")
        if self.prior_correct <= 0 or self.prior_wrong <= 0:
            raise ValueError("the Beta prior needs prior_correct > 0 and prior_wrong > 0")


@dataclass(frozen=True)
class GoldQuestion:
    """A gold item as a worker may see it: everything but the answer.

    ``gold_id`` is for the gateway only (to score the answer); never show it to the worker.
    """

    gold_id: str
    campaign: str
    class_name: str
    image_id: str
    rle_h: int
    rle_w: int
    rle_counts: bytes


@dataclass(frozen=True)
class GoldItem:
    """A question with a known answer (``True``: the mask is a correct ``class_name`` instance).

    The mask is a COCO RLE (``rle_h`` x ``rle_w``, compressed ``rle_counts``), like real work, so
    gold cannot be told apart.  ``answer`` is hidden from ``repr`` so a logged item leaks nothing.
    """

    gold_id: str
    campaign: str
    class_name: str
    image_id: str
    rle_h: int
    rle_w: int
    rle_counts: bytes
    answer: bool = field(repr=False)

    def public_view(self) -> GoldQuestion:
        return GoldQuestion(
            self.gold_id,
            self.campaign,
            self.class_name,
            self.image_id,
            self.rle_h,
            self.rle_w,
            self.rle_counts,
        )


@dataclass(frozen=True)
class WorkerState:
    """What quality control knows about one worker.

    ``gold_accuracy`` and ``fast_share`` are over the rolling ``window`` (``None`` before any
    gold answer / answer time); ``reliability`` is the Beta-smoothed gold accuracy in (0, 1).
    """

    worker: str
    qualification: Qualification
    gold_answers: int
    gold_accuracy: float | None
    fast_share: float | None
    suspended: bool
    reliability: float
    suspended_at: float | None = None  # unix seconds
    suspension_reason: str | None = None  # comma-separated: "accuracy", "too_fast"
    recent_times: int = 0  # answer times in the rolling window (0 when not read)

    @property
    def can_work(self) -> bool:
        """Qualified and not suspended: may be served real questions (and hidden gold)."""
        return self.qualification == "passed" and not self.suspended


# ---------------------------------------------------------------------- draws
def uniform(seed: int, *parts: object) -> float:
    """A reproducible draw in [0, 1) from ``seed`` and ``parts`` (no shared RNG state, so
    replicas and restarts agree)."""
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def gold_due(seed: int, worker: str, served: Iterable[int], gold_share: float) -> list[bool]:
    """Per served question (its 1-based count ``served`` for this worker): whether it is hidden
    gold, true with probability ``gold_share``, a fixed function of (seed, worker, count)."""
    return [uniform(seed, "due", worker, n) < gold_share for n in served]


# ---------------------------------------------------------------------- workers
def reliability(right: int, answered: int, policy: QualityPolicy) -> float:
    """Beta-smoothed gold accuracy over the rolling window: ``right`` of ``answered``."""
    return (right + policy.prior_correct) / (answered + policy.prior_correct + policy.prior_wrong)


def fast_share(
    times_ms: Sequence[float], crowd_median_ms: float | None, fraction: float
) -> float | None:
    """Share of ``times_ms`` below ``fraction`` x the crowd's median answer time (``None``
    without times or a median)."""
    if not times_ms or crowd_median_ms is None:
        return None
    return sum(t < fraction * crowd_median_ms for t in times_ms) / len(times_ms)


def worker_state(
    worker: str,
    record: Mapping[str, str],
    gold_window: Sequence[int],
    times_ms: Sequence[float],
    crowd_median_ms: float | None,
    policy: QualityPolicy,
) -> WorkerState:
    """A worker's state from its stored record (``qual_ids``, ``qual_result``, ``gold_total``,
    ``suspended_at``, ``suspended_reason``), its rolling gold window (1 right, 0 wrong) and its
    recent answer times (ms; empty when not read)."""
    if "qual_result" in record:
        qualification: Qualification = "passed" if record["qual_result"] == "passed" else "failed"
    elif "qual_ids" in record:
        qualification = "in_progress"
    else:
        qualification = "passed" if policy.qualification_size == 0 else "required"
    right = sum(gold_window)
    suspended_at = float(record["suspended_at"]) if "suspended_at" in record else None
    return WorkerState(
        worker=worker,
        qualification=qualification,
        gold_answers=int(record.get("gold_total", 0)),
        gold_accuracy=right / len(gold_window) if gold_window else None,
        fast_share=fast_share(times_ms, crowd_median_ms, policy.fast_fraction),
        suspended=suspended_at is not None,
        reliability=reliability(right, len(gold_window), policy),
        suspended_at=suspended_at,
        suspension_reason=record.get("suspended_reason"),
        recent_times=len(times_ms),
    )


def suspension_reasons(state: WorkerState, policy: QualityPolicy) -> list[str]:
    """Why a worker is to be suspended now (empty: it is not).

    Over the rolling window: gold accuracy below ``min_accuracy`` after ``min_gold`` gold
    answers (``"accuracy"``), or more than ``max_fast_share`` of the answers too fast after
    ``min_gold`` answer times (``"too_fast"``)."""
    reasons = []
    n_gold = min(state.gold_answers, policy.window)  # the rolling window's length
    if n_gold >= policy.min_gold and state.gold_accuracy is not None:
        if state.gold_accuracy < policy.min_accuracy:
            reasons.append("accuracy")
    if state.recent_times >= policy.min_gold and state.fast_share is not None:
        if state.fast_share > policy.max_fast_share:
            reasons.append("too_fast")
    return reasons


# ---------------------------------------------------------------------- gold and qualification
def gold_correct(answers: Sequence[bool], items: Sequence[GoldItem]) -> list[bool]:
    """Whether each answer matches its gold item's answer."""
    return [a == g.answer for a, g in zip(answers, items, strict=True)]


def qualification_outcome(
    answers: Mapping[str, bool], items: Sequence[GoldItem], policy: QualityPolicy
) -> tuple[Literal["passed", "failed"], int]:
    """(``"passed"``/``"failed"``, answers right) of a qualification test of ``items``:
    passed when the share right is >= ``qualification_pass``."""
    correct = sum(answers[g.gold_id] == g.answer for g in items)
    passed = correct >= policy.qualification_pass * len(items) - 1e-9
    return ("passed" if passed else "failed"), correct


# ---------------------------------------------------------------------- votes
def vote_weight(reliability: float) -> float:
    """Log-odds of a worker's reliability, floored at :data:`MIN_WEIGHT` (see :func:`decide`)."""
    return max(MIN_WEIGHT, math.log(reliability / (1.0 - reliability)))


def counted_votes(
    votes: Mapping[str, tuple[bool, float]],
    states: Mapping[str, WorkerState],
    policy: QualityPolicy,
) -> dict[str, bool]:
    """The votes that count (worker -> label) of ``votes`` (worker -> (label, cast at unix s)).

    Not counted: votes of workers who failed qualification, and votes of suspended workers
    cast at most ``discount_window_s`` before their suspension (or after it)."""
    counted: dict[str, bool] = {}
    for w, (label, at) in votes.items():
        st = states[w]
        if st.qualification == "failed":
            continue
        if st.suspended_at is not None and at >= st.suspended_at - policy.discount_window_s:
            continue  # cast while the worker was already going wrong, or after
        counted[w] = label
    return counted


def missing_votes(counted: Mapping[str, bool], policy: QualityPolicy) -> int:
    """Counted votes still missing before :func:`decide` decides (dynamic redundancy)."""
    if len(counted) < policy.redundancy:
        return policy.redundancy - len(counted)
    if len(set(counted.values())) <= 1:
        return 0
    return max(0, policy.vote_cap - len(counted))


def decide(
    question_id: str,
    counted: Mapping[str, bool],
    states: Mapping[str, WorkerState],
    policy: QualityPolicy,
) -> bool | None:
    """The reliability-weighted answer, or ``None`` until ``redundancy`` counted votes agree,
    or, when they disagree, until ``vote_cap`` counted votes.

    ``counted``: worker -> label (:func:`counted_votes`); ``states``: at least the counted
    workers' states.  The decision is crowd-kit's ``MajorityVote`` with skills = the log-odds
    ``log(r / (1 - r))`` of each worker's reliability ``r``, floored at ``1e-3``.  Log-odds
    are the optimal weights of a weighted majority for independent binary voters of known
    accuracy (Nitzan & Paroush 1982): a 50 % clicker weighs ~0, so one reliable worker
    outvotes two random ones, which raw accuracies (0.95 vs 0.5 + 0.5) would not.  Gold-based
    skills rather than skills learnt from agreement (Wawa, Dawid-Skene, GLAD): the gateway
    decides one question at a time with 2-5 votes, too little agreement data to learn skills
    from, while gold measures each worker directly (crowd-kit's ``GoldMajorityVote`` does the
    same with unsmoothed gold accuracy).
    Exact ties go to ``False`` (crowd-kit's ``idxmax`` takes the first label), so a tie never
    accepts a mask.
    """
    if len(counted) < policy.redundancy:
        return None
    if len(set(counted.values())) == 1:
        # Unanimous: every weight is positive, so the weighted vote is that label; skip
        # building a DataFrame (the common case, and the only one at redundancy 1).
        return next(iter(counted.values()))
    if len(counted) < policy.vote_cap:
        return None  # a disagreement: ask more workers first (dynamic overlap)
    workers = sorted(counted)
    data = pd.DataFrame(
        {"task": question_id, "worker": workers, "label": [counted[w] for w in workers]}
    )
    skills = pd.Series({w: vote_weight(states[w].reliability) for w in workers})
    labels = MajorityVote().fit_predict(data, skills)
    return bool(labels.loc[question_id])
