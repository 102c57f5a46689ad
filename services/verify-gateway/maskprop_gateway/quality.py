"""Worker quality control for the crowd-vendor gateway: qualification, hidden gold, answer-time
checks, suspension and the reliability-weighted vote over redundant answers.

Conventions (NOTES.md, "Conventions users expect"; Toloka and CVAT honeypots): a qualification
test of gold questions before real work; hidden gold mixed into real work at ``gold_share``
(5-10 % in small pools); a worker is "too fast" below about half the crowd's median answer time;
colluding workers share answers to small, repeating gold sets, so a worker never sees the same
gold item twice and the gold pool must be large and look like real questions.

Aggregation uses crowd-kit's ``MajorityVote`` with per-worker skills (see :meth:`aggregate`).

Redis keys (prefix ``maskprop:gw:qc:``; ``{w}`` worker id such as ``"<vendor>:<worker>"``,
``{c}`` campaign, ``{q}`` question id):

* ``gold``  hash  gold id -> JSON of a :class:`GoldItem` (the only place answers live)
* ``campaign:{c}:gold``  set  gold ids of a campaign
* ``worker:{w}``  hash  ``qual_ids`` (JSON list), ``qual_result`` (passed/failed, written once),
  ``qual_correct``, ``served`` (questions served, drives :meth:`gold_due`), ``gold_total``,
  ``suspended_at`` (unix s, written once: suspension is sticky), ``suspended_reason``
* ``worker:{w}:seen``  set  gold ids ever shown to the worker (qualification included)
* ``worker:{w}:scored``  hash  gold id -> 1/0, so a retried gold submission counts once
* ``worker:{w}:gold``  list  rolling 1/0 correctness of the last ``window`` gold answers
* ``worker:{w}:times``  list  the last ``window`` answer times (ms), real and gold
* ``medians``  hash  worker -> median of their recent answer times (ms)
* ``votes:{q}``  hash  worker -> ``"<0|1>:<unix s>"`` (first vote wins; expires after
  ``vote_ttl_s``)

Gold answers never leave this module: :meth:`QualityControl.next_gold` and
:meth:`QualityControl.qualification_questions` return :class:`GoldQuestion` (no answer), no
:class:`WorkerState` field depends on a single gold item, ``GoldItem``'s repr hides the answer,
and log records name neither gold ids nor answers.  The gateway must still keep gold ids
internal (serve gold under the same opaque question ids as real work) and must not tell a worker
whether a gold answer was right, or the gold is no longer hidden.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from crowdkit.aggregation import MajorityVote

log = logging.getLogger(__name__)

PREFIX = "maskprop:gw:qc:"

Qualification = Literal["required", "in_progress", "passed", "failed"]

#: Vote weight floor: workers at or below chance weigh (almost) nothing, but never exactly zero,
#: so crowd-kit's normalisation stays defined when every voter is that bad.
_MIN_WEIGHT = 1e-3

# ARGV: votes-key prefix, worker, cast at (unix s), ttl, then (question id, 0|1) pairs.
# Per vote: whether it is new (first vote of the worker wins) and every vote on the question
# now, as HGETALL's flat list: one round trip for a submitted batch, whatever its size.
_CAST = """
local prefix, worker, at, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {}
for i = 5, #ARGV, 2 do
  local key = prefix .. ARGV[i]
  out[#out + 1] = redis.call('hsetnx', key, worker, ARGV[i + 1] .. ':' .. at)
  redis.call('expire', key, ttl)
  out[#out + 1] = redis.call('hgetall', key)
end
return out
"""


class QualityError(ValueError):
    """A caller error (bad worker request or gateway misuse); routes map it to 4xx."""


class UnknownGold(QualityError):
    """A gold id that does not exist or was never served to this worker."""


class NotEnoughGold(QualityError):
    """The campaign has fewer unseen gold items than a qualification test needs."""


class QualificationError(QualityError):
    """Qualification called out of order (none in progress, already decided, answers missing)."""


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
    # Beta prior of the smoothed gold accuracy (reliability): 4 right, 1 wrong -> new workers 0.8.
    prior_correct: float = 4.0
    prior_wrong: float = 1.0
    vote_ttl_s: int = 7 * 24 * 3600  # votes of a question are forgotten this long after the last

    @property
    def vote_cap(self) -> int:
        """Counted answers at which a disagreeing question is decided anyway."""
        cap = 2 * self.redundancy - 1 if self.max_redundancy is None else self.max_redundancy
        return max(self.redundancy, cap)

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


def _vote_weight(reliability: float) -> float:
    """Log-odds of a worker's reliability, floored at ``_MIN_WEIGHT`` (see ``aggregate``)."""
    return max(_MIN_WEIGHT, math.log(reliability / (1.0 - reliability)))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _item_to_json(item: GoldItem) -> str:
    return json.dumps(
        {
            "gold_id": item.gold_id,
            "campaign": item.campaign,
            "class_name": item.class_name,
            "image_id": item.image_id,
            "rle_h": item.rle_h,
            "rle_w": item.rle_w,
            "rle_counts": base64.b64encode(item.rle_counts).decode(),
            "answer": item.answer,
        },
        sort_keys=True,
    )


def _item_from_json(raw: Any) -> GoldItem:
    d = json.loads(raw)
    d["rle_counts"] = base64.b64decode(d["rle_counts"])
    return GoldItem(**d)


class QualityControl:
    """Worker quality control over Redis (see the module docstring for the keys).

    ``redis`` is a ``redis.Redis``-compatible client (fakeredis in tests), bytes or decoded
    responses; ``clock`` gives unix seconds; ``seed`` makes gold draws and :meth:`gold_due`
    reproducible per worker.

    Call order in the gateway: :meth:`qualification_questions` -> :meth:`submit_qualification`;
    then for each served question :meth:`gold_due` picks gold (:meth:`next_gold`) or real work;
    every answer's time goes to :meth:`record_answer_time`, then a gold answer to
    :meth:`score_gold`, a real one to :meth:`add_vote`; :meth:`review` after each answer;
    :meth:`aggregate` / :meth:`needs_more_votes` per question.
    """

    def __init__(
        self,
        redis: Any,
        policy: QualityPolicy,
        *,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
    ) -> None:
        self.r = redis
        self.policy = policy
        self.clock = clock
        self.seed = seed
        self._gold_cache: dict[str, list[str]] = {}
        self._median_cache: tuple[float, float | None] | None = None
        self._cast = redis.register_script(_CAST)

    # ------------------------------------------------------------------ keys
    @staticmethod
    def _gold_key() -> str:
        return PREFIX + "gold"

    @staticmethod
    def _campaign_key(campaign: str) -> str:
        return f"{PREFIX}campaign:{campaign}:gold"

    @staticmethod
    def _worker_key(worker: str, what: str = "") -> str:
        return f"{PREFIX}worker:{worker}" + (f":{what}" if what else "")

    @staticmethod
    def _medians_key() -> str:
        return PREFIX + "medians"

    @staticmethod
    def _votes_key(question_id: str) -> str:
        return f"{PREFIX}votes:{question_id}"

    #: Prefix of the per-question votes keys (the gateway deletes them with the question).
    votes_prefix = f"{PREFIX}votes:"

    def _uniform(self, *parts: object) -> float:
        """A reproducible draw in [0, 1) from the seed and ``parts`` (no shared RNG state, so
        replicas and restarts agree)."""
        text = ":".join(str(p) for p in (self.seed, *parts)).encode()
        digest = hashlib.blake2b(text, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    # ------------------------------------------------------------------ gold pool
    def import_gold(self, items: Iterable[GoldItem]) -> int:
        """Store gold items; returns how many ids are new (re-importing an id replaces it)."""
        by_id: dict[str, GoldItem] = {}
        for item in items:
            if not item.gold_id or not item.campaign:
                raise QualityError("gold items need a gold_id and a campaign")
            if item.rle_h <= 0 or item.rle_w <= 0 or not isinstance(item.answer, bool):
                raise QualityError("gold items need a positive RLE size and a bool answer")
            by_id[item.gold_id] = item
        if not by_id:
            return 0
        ids = list(by_id)
        old = self.r.hmget(self._gold_key(), ids)
        pipe = self.r.pipeline(transaction=True)
        for gid, raw in zip(ids, old, strict=True):
            item = by_id[gid]
            if raw is not None:
                previous = json.loads(raw)["campaign"]
                if previous != item.campaign:
                    pipe.srem(self._campaign_key(previous), gid)
            pipe.hset(self._gold_key(), gid, _item_to_json(item))
            pipe.sadd(self._campaign_key(item.campaign), gid)
        pipe.execute()
        return sum(raw is None for raw in old)

    def gold_count(self, campaign: str) -> int:
        return int(self.r.scard(self._campaign_key(campaign)))

    def _load(self, gold_id: str) -> GoldItem:
        return self._load_many([gold_id])[0]

    def _load_many(self, gold_ids: list[str]) -> list[GoldItem]:
        """Gold items by id, in one round trip (a qualification test reads ten)."""
        raws = self.r.hmget(self._gold_key(), gold_ids) if gold_ids else []
        if any(raw is None for raw in raws):
            raise UnknownGold("unknown gold item")
        return [_item_from_json(raw) for raw in raws]

    def _unseen(self, campaign: str, worker: str) -> list[str]:
        # O(gold in the campaign) per call; sorted so the seeded pick is reproducible.
        return sorted(
            _s(g)
            for g in self.r.sdiff(self._campaign_key(campaign), self._worker_key(worker, "seen"))
        )

    #: Random probes into the campaign's gold before :meth:`next_gold` lists the unseen set.
    GOLD_PROBES = 8

    def _gold_ids(self, campaign: str) -> list[str]:
        """The campaign's gold ids, sorted; cached while the set's size is unchanged (gold is
        imported rarely, and a re-import that keeps the size keeps the ids)."""
        n = int(self.r.scard(self._campaign_key(campaign)))
        cached = self._gold_cache.get(campaign)
        if cached is None or len(cached) != n:
            cached = sorted(_s(g) for g in self.r.smembers(self._campaign_key(campaign)))
            self._gold_cache[campaign] = cached
        return cached

    def next_gold(self, campaign: str, worker: str) -> GoldQuestion | None:
        """A gold question the worker has never seen (qualification included), or ``None`` when
        the campaign's gold is exhausted for them."""
        got = self.next_golds(campaign, worker, 1)
        return got[0] if got else None

    def next_golds(self, campaign: str, worker: str, k: int) -> list[GoldQuestion]:
        """Up to ``k`` gold questions the worker has never seen (fewer when the campaign's gold
        is exhausted for them).

        Seeded random probes first (the n-th draw of a worker is a fixed function of the seed,
        worker and n), each claimed by SADD to the worker's seen set, a few round trips for the
        whole batch while the worker has seen a minority of the pool; then the exact unseen
        set (O(gold)) for whatever is still missing."""
        if k <= 0:
            return []
        seen = self._worker_key(worker, "seen")
        ids = self._gold_ids(campaign)
        picked: list[str] = []
        if ids:
            last = int(self.r.hincrby(self._worker_key(worker), "gold_draws", k))
            draws = list(range(last - k + 1, last + 1))
            for attempt in range(self.GOLD_PROBES):
                if not draws:
                    break
                cands = [
                    ids[int(self._uniform("gold", worker, d, attempt) * len(ids))] for d in draws
                ]
                pipe = self.r.pipeline(transaction=False)
                for g in cands:
                    pipe.sadd(seen, g)
                claimed = pipe.execute()
                picked += [g for g, new in zip(cands, claimed, strict=True) if new]
                draws = [d for d, new in zip(draws, claimed, strict=True) if not new]
        out = []
        if picked:
            for raw in self.r.hmget(self._gold_key(), picked):
                item = _item_from_json(raw) if raw is not None else None
                if item is not None and item.campaign == campaign:  # the id cache was not stale
                    out.append(item.public_view())
        unseen = self._unseen(campaign, worker) if len(out) < k else []
        while len(out) < k and unseen:
            i = int(self._uniform("gold", worker, self.r.scard(seen)) * len(unseen))
            gold_id = unseen.pop(i)
            # SADD is the claim: a concurrent call that took the same item retries another.
            if self.r.sadd(seen, gold_id):
                out.append(self._load(gold_id).public_view())
        return out

    def gold_due(self, worker: str) -> bool:
        """Whether the question about to be served to ``worker`` should be hidden gold.

        Call once per served question: it counts them, and the n-th answer is a fixed function
        of (seed, worker, n), true with probability ``gold_share``.
        """
        return self.gold_due_many(worker, 1)[0]

    def gold_due_many(self, worker: str, k: int) -> list[bool]:
        """:meth:`gold_due` for the next ``k`` served questions, in one round trip."""
        if k <= 0:
            return []
        n = int(self.r.hincrby(self._worker_key(worker), "served", k))
        return [
            self._uniform("due", worker, i) < self.policy.gold_share
            for i in range(n - k + 1, n + 1)
        ]

    # ------------------------------------------------------------------ qualification
    def qualification_questions(self, campaign: str, worker: str) -> list[GoldQuestion]:
        """Draw ``qualification_size`` unseen gold questions and mark the worker in progress;
        while in progress, the same questions again.  Raises :class:`QualificationError` once
        the test is decided and :class:`NotEnoughGold` when the campaign lacks unseen gold."""
        size = self.policy.qualification_size
        if size == 0:
            return []
        wkey = self._worker_key(worker)
        ids_raw, result = self.r.hmget(wkey, ["qual_ids", "qual_result"])
        if result is not None:
            raise QualificationError(f"qualification already {_s(result)}")
        if ids_raw is None:
            unseen = self._unseen(campaign, worker)
            if len(unseen) < size:
                raise NotEnoughGold(
                    f"campaign {campaign!r} has {len(unseen)} unseen gold items, need {size}"
                )
            rng = random.Random(int(self._uniform("qualification", worker) * 2**53))
            ids = rng.sample(unseen, size)
            # HSETNX: of two concurrent first calls, one set wins and both return it.
            if self.r.hsetnx(wkey, "qual_ids", json.dumps(ids)):
                self.r.sadd(self._worker_key(worker, "seen"), *ids)
            else:
                ids_raw = self.r.hget(wkey, "qual_ids")
        if ids_raw is not None:
            ids = json.loads(ids_raw)
        return [item.public_view() for item in self._load_many(ids)]

    def submit_qualification(self, worker: str, answers: dict[str, bool]) -> WorkerState:
        """Score the qualification test: every drawn question answered, nothing else.

        ``passed`` when the share right is >= ``qualification_pass``, else ``failed``; the
        result is written once (a retried submission returns it unchanged), so failed workers
        stay failed and never get real questions.
        """
        wkey = self._worker_key(worker)
        ids_raw, result = self.r.hmget(wkey, ["qual_ids", "qual_result"])
        if result is not None:
            return self.state(worker)
        if ids_raw is None:
            raise QualificationError("no qualification in progress")
        ids: list[str] = json.loads(ids_raw)
        if set(answers) != set(ids):
            missing = len(set(ids) - set(answers))
            extra = len(set(answers) - set(ids))
            raise QualificationError(
                f"answer every qualification question and nothing else "
                f"({missing} missing, {extra} not in the test)"
            )
        if not all(isinstance(a, bool) for a in answers.values()):
            raise QualificationError("qualification answers must be true or false")
        correct = sum(answers[g.gold_id] == g.answer for g in self._load_many(ids))
        passed = correct >= self.policy.qualification_pass * len(ids) - 1e-9
        outcome = "passed" if passed else "failed"
        if self.r.hsetnx(wkey, "qual_result", outcome):
            self.r.hset(wkey, "qual_correct", correct)
            log.info(
                "qualification decided",
                extra={"worker": worker, "result": outcome, "correct": correct, "of": len(ids)},
            )
        return self.state(worker)

    # ------------------------------------------------------------------ answers and times
    def score_gold(self, worker: str, gold_id: str, answer: bool, elapsed_ms: int) -> bool:
        """Whether ``answer`` matches gold item ``gold_id`` served to ``worker``.

        Updates the rolling gold window.  ``elapsed_ms`` is validated but not recorded here:
        the gateway calls :meth:`record_answer_time` for every answer, gold included, and
        recording it twice would weigh gold answers double in the speed check.  Idempotent: a
        retried submission of the same gold item returns the first result and changes nothing.
        Raises :class:`UnknownGold` for an item the worker was never served.
        """
        return self.score_golds(worker, [(gold_id, answer, elapsed_ms)])[0]

    def score_golds(self, worker: str, answers: list[tuple[str, bool, int]]) -> list[bool]:
        """:meth:`score_gold` for a submitted batch, in three round trips whatever its size
        (all checked before any is scored: an unknown item fails the batch unscored)."""
        for _, answer, elapsed_ms in answers:
            if not isinstance(answer, bool):
                raise QualityError("a gold answer must be true or false")
            self._check_elapsed(elapsed_ms)
        if not answers:
            return []
        ids = [g for g, _, _ in answers]
        pipe = self.r.pipeline(transaction=False)
        for g in ids:
            pipe.sismember(self._worker_key(worker, "seen"), g)
        pipe.hmget(self._gold_key(), ids)
        *served, raws = pipe.execute()
        if not all(served) or any(raw is None for raw in raws):
            raise UnknownGold("gold item not served to this worker")
        correct = [
            answer == _item_from_json(raw).answer
            for (_, answer, _), raw in zip(answers, raws, strict=True)
        ]
        scored = self._worker_key(worker, "scored")
        pipe = self.r.pipeline(transaction=False)
        for g, ok in zip(ids, correct, strict=True):
            pipe.hsetnx(scored, g, int(ok))
        fresh = pipe.execute()
        new = [int(ok) for ok, f in zip(correct, fresh, strict=True) if f]
        if new:
            window = self._worker_key(worker, "gold")
            pipe = self.r.pipeline(transaction=True)
            pipe.lpush(window, *new)
            pipe.ltrim(window, 0, self.policy.window - 1)
            pipe.hincrby(self._worker_key(worker), "gold_total", len(new))
            pipe.execute()
        if all(fresh):
            return correct
        # a retried item: its first result stands
        first = self.r.hmget(scored, ids)
        return [ok if f else bool(int(v)) for ok, f, v in zip(correct, fresh, first, strict=True)]

    @staticmethod
    def _check_elapsed(elapsed_ms: int) -> None:
        if isinstance(elapsed_ms, bool) or not isinstance(elapsed_ms, int) or elapsed_ms < 0:
            raise QualityError("elapsed_ms must be an int >= 0")

    def record_answer_time(self, worker: str, elapsed_ms: int) -> None:
        """Record the time a worker took for one answer (ms, from serving to submission)."""
        self.record_answer_times(worker, [elapsed_ms])

    def record_answer_times(self, worker: str, elapsed_ms: list[int]) -> None:
        """Record several answer times of one worker in one round trip (a submitted batch)."""
        if not elapsed_ms:
            return
        for e in elapsed_ms:
            self._check_elapsed(e)
        times = self._worker_key(worker, "times")
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(times, *elapsed_ms)
        pipe.ltrim(times, 0, self.policy.window - 1)
        pipe.lrange(times, 0, -1)
        recent = pipe.execute()[2]
        self.r.hset(self._medians_key(), worker, float(np.median([float(t) for t in recent])))

    # ------------------------------------------------------------------ state and review
    #: Crowds of at least this many workers have their median answer time cached this long.
    CROWD_MEDIAN_CACHE_FROM = 200
    CROWD_MEDIAN_TTL_S = 5.0

    def _crowd_median_ms(self) -> float | None:
        """Median over workers of each worker's median answer time.

        One value per worker, so a prolific bot (it answers many times faster) cannot drag
        the reference time down the way it would in a median over all answers.
        """
        cached = self._median_cache
        if cached is not None and time.monotonic() - cached[0] < self.CROWD_MEDIAN_TTL_S:
            return cached[1]
        values = [float(v) for v in self.r.hvals(self._medians_key())]
        median = float(np.median(values)) if values else None
        # A large crowd's median moves slowly and costs O(workers) to read: reuse it for a
        # few seconds.  A small one is read every time (cheap, and it moves fast).
        self._median_cache = (
            (time.monotonic(), median) if len(values) >= self.CROWD_MEDIAN_CACHE_FROM else None
        )
        return median

    def _states(self, workers: list[str], *, timing: bool) -> dict[str, WorkerState]:
        pipe = self.r.pipeline(transaction=False)
        for w in workers:
            pipe.hgetall(self._worker_key(w))
            pipe.lrange(self._worker_key(w, "gold"), 0, -1)
            if timing:
                pipe.lrange(self._worker_key(w, "times"), 0, -1)
        replies = iter(pipe.execute())
        median = self._crowd_median_ms() if timing else None
        p = self.policy
        out: dict[str, WorkerState] = {}
        for w in workers:
            h = {_s(k): _s(v) for k, v in next(replies).items()}
            window = [int(x) for x in next(replies)]
            times = [float(x) for x in next(replies)] if timing else []
            if "qual_result" in h:
                qualification: Qualification = (
                    "passed" if h["qual_result"] == "passed" else "failed"
                )
            elif "qual_ids" in h:
                qualification = "in_progress"
            else:
                qualification = "passed" if p.qualification_size == 0 else "required"
            right = sum(window)
            fast_share = None
            if times and median is not None:
                fast_share = sum(t < p.fast_fraction * median for t in times) / len(times)
            suspended_at = float(h["suspended_at"]) if "suspended_at" in h else None
            out[w] = WorkerState(
                worker=w,
                qualification=qualification,
                gold_answers=int(h.get("gold_total", 0)),
                gold_accuracy=right / len(window) if window else None,
                fast_share=fast_share,
                suspended=suspended_at is not None,
                reliability=(right + p.prior_correct)
                / (len(window) + p.prior_correct + p.prior_wrong),
                suspended_at=suspended_at,
                suspension_reason=h.get("suspended_reason"),
                recent_times=len(times),
            )
        return out

    def state(self, worker: str) -> WorkerState:
        return self._states([worker], timing=True)[worker]

    def standing(self, worker: str) -> WorkerState:
        """:meth:`state` without the speed check (``fast_share`` is ``None``): qualification
        and suspension, at a fraction of the cost (no answer times, no crowd median)."""
        return self._states([worker], timing=False)[worker]

    def can_work(self, worker: str) -> bool:
        """Qualified and not suspended (see :attr:`WorkerState.can_work`)."""
        return self.standing(worker).can_work

    def review(self, worker: str) -> WorkerState:
        """Apply the suspension rules and return the worker's state.

        Suspended (for good) when, over the rolling window, gold accuracy is below
        ``min_accuracy`` after ``min_gold`` gold answers, or more than ``max_fast_share`` of
        the answers are too fast after ``min_gold`` answer times.
        """
        return self.review_suspends(worker)[0]

    def review_suspends(self, worker: str) -> tuple[WorkerState, bool]:
        """:meth:`review`, and whether this call is the one that suspended the worker."""
        st = self.state(worker)
        if st.suspended:
            return st, False
        p = self.policy
        n_gold = min(st.gold_answers, p.window)  # the rolling window's length
        n_times = st.recent_times
        reasons = []
        if n_gold >= p.min_gold and st.gold_accuracy is not None:
            if st.gold_accuracy < p.min_accuracy:
                reasons.append("accuracy")
        if n_times >= p.min_gold and st.fast_share is not None:
            if st.fast_share > p.max_fast_share:
                reasons.append("too_fast")
        if not reasons:
            return st, False
        wkey = self._worker_key(worker)
        newly = bool(self.r.hsetnx(wkey, "suspended_at", repr(float(self.clock()))))
        if newly:
            self.r.hset(wkey, "suspended_reason", ",".join(reasons))
            log.warning(
                "worker suspended",
                extra={
                    "worker": worker,
                    "reason": ",".join(reasons),
                    "gold_accuracy": st.gold_accuracy,
                    "fast_share": st.fast_share,
                    "gold_window": n_gold,
                },
            )
        return self.state(worker), newly

    # ------------------------------------------------------------------ votes
    def add_vote(self, question_id: str, worker: str, label: bool) -> bool:
        """Record ``worker``'s answer to a real question; returns ``False`` (and changes
        nothing) when the worker already voted on it."""
        return self.add_votes(worker, [(question_id, label)])[0]

    def add_votes(self, worker: str, votes: list[tuple[str, bool]]) -> list[bool]:
        """:meth:`add_vote` for a batch of one worker's votes, in one round trip."""
        return [new for new, _ in self.cast_votes(worker, votes).values()]

    def cast_votes(
        self, worker: str, votes: list[tuple[str, bool]]
    ) -> dict[str, tuple[bool, dict[str, tuple[bool, float]]]]:
        """Record a batch of one worker's votes and read back every vote on those questions,
        in one Lua call: question id -> (this vote is new, all votes) for :meth:`tally`."""
        if any(not isinstance(label, bool) for _, label in votes):
            raise QualityError("a vote must be true or false")
        if not votes:
            return {}
        args: list[Any] = [self._votes_key(""), worker, repr(self.clock()), self.policy.vote_ttl_s]
        for qid, label in votes:
            args += (qid, int(label))
        flat = self._cast(args=args)
        out: dict[str, tuple[bool, dict[str, tuple[bool, float]]]] = {}
        for k, (qid, _) in enumerate(votes):
            pairs = flat[2 * k + 1]
            raw = {pairs[j]: pairs[j + 1] for j in range(0, len(pairs), 2)}
            out[qid] = (bool(flat[2 * k]), self._parse_votes(raw))
        return out

    def tally_many(self, question_ids: list[str]) -> dict[str, tuple[int, bool | None]]:
        """Per question: (:meth:`needs_more_votes`, :meth:`aggregate`), from one read of the
        votes and one of the voters' states."""
        if not question_ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for qid in question_ids:
            pipe.hgetall(self._votes_key(qid))
        return self.tally(
            {
                qid: self._parse_votes(raw)
                for qid, raw in zip(question_ids, pipe.execute(), strict=True)
            }
        )

    def tally(
        self,
        votes: dict[str, dict[str, tuple[bool, float]]],
        known: dict[str, WorkerState] | None = None,
    ) -> dict[str, tuple[int, bool | None]]:
        """:meth:`tally_many` of votes already read (:meth:`cast_votes`); ``known`` states
        (read after the last review) are not read again."""
        known = known or {}
        workers = sorted({w for vs in votes.values() for w in vs} - set(known))
        states = {**known, **(self._states(workers, timing=False) if workers else {})}
        out: dict[str, tuple[int, bool | None]] = {}
        for qid, vs in votes.items():
            counted = self._count(vs, states)
            out[qid] = (self._missing(counted), self._decide(qid, counted, states))
        return out

    @staticmethod
    def _parse_votes(raw: dict[Any, Any]) -> dict[str, tuple[bool, float]]:
        votes: dict[str, tuple[bool, float]] = {}
        for w, v in raw.items():
            bit, _, cast_at = _s(v).partition(":")
            votes[_s(w)] = (bit == "1", float(cast_at))
        return votes

    def _counted_votes(self, question_id: str) -> tuple[dict[str, bool], dict[str, WorkerState]]:
        votes = self._parse_votes(self.r.hgetall(self._votes_key(question_id)))
        states = self._states(sorted(votes), timing=False)
        return self._count(votes, states), states

    def _count(
        self, votes: dict[str, tuple[bool, float]], states: dict[str, WorkerState]
    ) -> dict[str, bool]:
        counted: dict[str, bool] = {}
        for w, (label, at) in votes.items():
            st = states[w]
            if st.qualification == "failed":
                continue
            if (
                st.suspended_at is not None
                and at >= st.suspended_at - self.policy.discount_window_s
            ):
                continue  # cast while the worker was already going wrong, or after
            counted[w] = label
        return counted

    def needs_more_votes(self, question_id: str) -> int:
        """Votes still missing before :meth:`aggregate` decides (after discounting)."""
        counted, _ = self._counted_votes(question_id)
        return self._missing(counted)

    def _missing(self, counted: dict[str, bool]) -> int:
        if len(counted) < self.policy.redundancy:
            return self.policy.redundancy - len(counted)
        if len(set(counted.values())) <= 1:
            return 0
        return max(0, self.policy.vote_cap - len(counted))

    def aggregate(self, question_id: str) -> bool | None:
        """The reliability-weighted answer, or ``None`` until ``redundancy`` counted votes
        agree, or, when they disagree, until ``vote_cap`` counted votes.

        Not counted: votes of workers who failed qualification, and votes of suspended workers
        cast at most ``discount_window_s`` before their suspension (or after it).

        The decision is crowd-kit's ``MajorityVote`` with skills = the log-odds
        ``log(r / (1 - r))`` of each worker's reliability ``r`` (Beta-smoothed gold accuracy),
        floored at ``1e-3``.  Log-odds are the optimal weights of a weighted majority for
        independent binary voters of known accuracy (Nitzan & Paroush 1982): a 50 % clicker
        weighs ~0, so one reliable worker outvotes two random ones, which raw accuracies
        (0.95 vs 0.5 + 0.5) would not.  Gold-based skills rather than skills learnt from
        agreement (Wawa, Dawid-Skene, GLAD): the gateway decides one question at a time with
        2-5 votes, too little agreement data to learn skills from, while gold measures each
        worker directly (crowd-kit's ``GoldMajorityVote`` does the same with unsmoothed gold
        accuracy).  Exact ties go to ``False`` (crowd-kit's ``idxmax`` takes the first label),
        so a tie never accepts a mask.
        """
        counted, states = self._counted_votes(question_id)
        return self._decide(question_id, counted, states)

    def _decide(
        self, question_id: str, counted: dict[str, bool], states: dict[str, WorkerState]
    ) -> bool | None:
        if len(counted) < self.policy.redundancy:
            return None
        if len(set(counted.values())) == 1:
            # Unanimous: every weight is positive, so the weighted vote is that label; skip
            # building a DataFrame (the common case, and the only one at redundancy 1).
            return next(iter(counted.values()))
        if len(counted) < self.policy.vote_cap:
            return None  # a disagreement: ask more workers first (dynamic overlap)
        workers = sorted(counted)
        data = pd.DataFrame(
            {"task": question_id, "worker": workers, "label": [counted[w] for w in workers]}
        )
        skills = pd.Series({w: _vote_weight(states[w].reliability) for w in workers})
        labels = MajorityVote().fit_predict(data, skills)
        return bool(labels.loc[question_id])
