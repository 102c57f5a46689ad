"""Worker quality control's storage for the crowd-vendor gateway: the gold pool, per-worker
records and the votes on real questions, in Redis.  The rules it applies (vote weights, the
weighted tally with dynamic redundancy, gold scoring, suspension, qualification) are pure
functions in :mod:`maskprop_gateway.qc_rules`.

Redis keys (:mod:`maskprop_gateway.keys`; ``{w}`` worker id such as ``"<vendor>:<worker>"``,
``{c}`` campaign, ``{q}`` question id):

* ``qc:gold``  hash  gold id -> JSON of a :class:`GoldItem` (the only place answers live)
* ``qc:campaign:{c}:gold``  set  gold ids of a campaign
* ``qc:campaign:{c}:gold:hidden``  zset  hidden-gold candidates -> workers shown each: hidden
  gold is drawn least-shown first and at most ``policy.gold_cap`` times, so an item repeats
  across workers no more than a real question does (issue #18)
* ``qc:campaign:{c}:gold:qual``  set  items used in qualification tests: a qualification item
  is shown openly as gold, so it never becomes hidden gold (and an item once shown as hidden
  gold never goes into a qualification test)
* ``qc:worker:{w}``  hash  ``qual_ids`` (JSON list), ``qual_result`` (passed/failed, written
  once), ``qual_correct``, ``served`` (questions served, drives hidden gold),
  ``gold_total``, ``suspended_at`` (unix s, written once: suspension is sticky),
  ``suspended_reason``
* ``qc:worker:{w}:seen``  set  gold ids ever shown to the worker (qualification included)
* ``qc:worker:{w}:scored``  hash  gold id -> 1/0, so a retried gold submission counts once
* ``qc:worker:{w}:gold``  list  rolling 1/0 correctness of the last ``window`` gold answers
* ``qc:worker:{w}:times``  list  the last ``window`` answer times (ms), real and gold
* ``qc:medians``  hash  worker -> median of their recent answer times (ms)
* ``qc:votes:{q}``  hash  worker -> ``"<0|1>:<unix s>"`` (first vote wins; expires after
  ``vote_ttl_s``; the question pool deletes it once search has the question's label)

Call order in the gateway: :meth:`QualityControl.qualification_questions` ->
:meth:`~QualityControl.submit_qualification`; then per lease :meth:`~QualityControl.gold_due_many`
picks hidden gold (:meth:`~QualityControl.next_golds`) among the real work; per answer batch
the answer times are recorded (every answer, on the request path: the gateway's answered
script, or :meth:`~QualityControl.record_answer_times`), then, off the request path (the
gateway's settler), :meth:`~QualityControl.score_golds` (gold), :meth:`~QualityControl.cast_votes`
(real), :meth:`~QualityControl.review_suspends`, then :meth:`~QualityControl.tally` of the votes
cast.

Gold answers never leave this module: :meth:`QualityControl.next_golds` and
:meth:`QualityControl.qualification_questions` return :class:`GoldQuestion` (no answer), no
:class:`WorkerState` field depends on a single gold item, ``GoldItem``'s repr hides the answer,
and log records name neither gold ids nor answers.  The gateway must still keep gold ids
internal (serve gold under the same opaque question ids as real work) and must not tell a worker
whether a gold answer was right, or the gold is no longer hidden.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from redis.exceptions import ResponseError

from maskprop_gateway import keys, qc_rules
from maskprop_gateway.qc_rules import GoldItem, GoldQuestion, QualityPolicy, WorkerState

log = logging.getLogger(__name__)

# ARGV: votes-key prefix, worker, cast at (unix s), ttl, then (question id, 0|1) pairs.
# Per vote: whether it is new (first vote of the worker wins) and every vote on the question
# now, as HGETALL's flat list: one round trip for a submitted batch, whatever its size.
# KEYS: the hidden-gold zset, the worker's seen set.  ARGV: cap, k, scan.  Up to k items the
# worker has not seen, least shown first, each shown fewer than cap times; each is claimed for
# the worker (SADD) and counted (ZINCRBY) in the same step.
_DRAW_HIDDEN = """
local out, k, scan = {}, tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, scan)
for _, id in ipairs(ids) do
  if #out >= k then break end
  if redis.call('SADD', KEYS[2], id) == 1 then
    redis.call('ZINCRBY', KEYS[1], 1, id)
    out[#out + 1] = id
  end
end
return out
"""

# KEYS: the hidden-gold zset, the qualification set, the worker's seen set.  ARGV: size, then
# candidate ids in the worker's seeded order.  Takes the first ``size`` still eligible (a
# qualification item, or a hidden candidate nobody was shown yet: it moves to the
# qualification set) and marks them seen, or takes none when fewer are eligible.
_DRAW_QUALIFICATION = """
local size, picked = tonumber(ARGV[1]), {}
for i = 2, #ARGV do
  if #picked >= size then break end
  local id = ARGV[i]
  if redis.call('SISMEMBER', KEYS[3], id) == 0 then
    local shown = redis.call('ZSCORE', KEYS[1], id)
    if redis.call('SISMEMBER', KEYS[2], id) == 1 or (shown and tonumber(shown) == 0) then
      picked[#picked + 1] = id
    end
  end
end
if #picked < size then return {} end
for _, id in ipairs(picked) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('SADD', KEYS[2], id)
  redis.call('SADD', KEYS[3], id)
end
return picked
"""

# KEYS: the worker's seen set, the gold hash, the worker's scored hash, gold window list and
# worker hash, optionally the campaign's stats hash (leases' ``stats:{c}``: its ``gold_answers``
# counts the new ones).  ARGV: window, then (gold id, answer 0|1) pairs.  Refuses the whole
# batch ('UNKNOWN') unless every item was served to the worker; else per item 1/0: whether the
# answer matches the item's (qc_rules.gold_correct's rule: equality), its first result for an
# item scored before (HSETNX keeps it), and the new results go on the rolling window.  One
# round trip.
_SCORE = """
local items = {}
for i = 2, #ARGV, 2 do
  if redis.call('sismember', KEYS[1], ARGV[i]) == 0 then return redis.error_reply('UNKNOWN') end
  local raw = redis.call('hget', KEYS[2], ARGV[i])
  if not raw then return redis.error_reply('UNKNOWN') end
  items[#items + 1] = cjson.decode(raw)['answer']
end
local out, new = {}, 0
for k, answer in ipairs(items) do
  local ok = ((ARGV[2 * k + 1] == '1') == answer) and 1 or 0
  if redis.call('hsetnx', KEYS[3], ARGV[2 * k], ok) == 1 then
    redis.call('lpush', KEYS[4], ok)
    new = new + 1
  else
    ok = tonumber(redis.call('hget', KEYS[3], ARGV[2 * k]))
  end
  out[k] = ok
end
if new > 0 then
  redis.call('ltrim', KEYS[4], 0, tonumber(ARGV[1]) - 1)
  redis.call('hincrby', KEYS[5], 'gold_total', new)
  if KEYS[6] then redis.call('hincrby', KEYS[6], 'gold_answers', new) end
end
return out
"""

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
    """Worker quality control over Redis (see the module docstring for the keys and the call
    order).

    ``redis`` is a ``redis.Redis``-compatible client (fakeredis in tests), bytes or decoded
    responses; ``clock`` gives unix seconds; ``seed`` makes gold draws and hidden-gold slots
    reproducible per worker.
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
        self._median_cache: tuple[float, float | None] | None = None
        self._cast = redis.register_script(_CAST)
        self._score = redis.register_script(_SCORE)
        self._draw_hidden = redis.register_script(_DRAW_HIDDEN)
        self._draw_qualification = redis.register_script(_DRAW_QUALIFICATION)

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
        old = self.r.hmget(keys.GOLD, ids)
        pipe = self.r.pipeline(transaction=True)
        for gid, raw in zip(ids, old, strict=True):
            item = by_id[gid]
            if raw is not None:
                previous = json.loads(raw)["campaign"]
                if previous != item.campaign:
                    pipe.srem(keys.campaign_gold(previous), gid)
                    pipe.zrem(keys.gold_hidden(previous), gid)
                    pipe.srem(keys.gold_qualification(previous), gid)
            pipe.hset(keys.GOLD, gid, _item_to_json(item))
            pipe.sadd(keys.campaign_gold(item.campaign), gid)
        pipe.execute()
        for campaign in {item.campaign for item in by_id.values()}:
            # new ids become hidden-gold candidates unless a qualification test used them
            ids_here = [g for g in ids if by_id[g].campaign == campaign]
            used = self.r.smismember(keys.gold_qualification(campaign), ids_here)
            fresh = {g: 0 for g, u in zip(ids_here, used, strict=True) if not u}
            if fresh:
                self.r.zadd(keys.gold_hidden(campaign), fresh, nx=True)
        return sum(raw is None for raw in old)

    def _load_many(self, gold_ids: list[str]) -> list[GoldItem]:
        """Gold items by id, in one round trip (a qualification test reads ten)."""
        raws = self.r.hmget(keys.GOLD, gold_ids) if gold_ids else []
        if any(raw is None for raw in raws):
            raise UnknownGold("unknown gold item")
        return [_item_from_json(raw) for raw in raws]

    def _qualification_candidates(self, campaign: str, worker: str) -> list[str]:
        """Gold the worker has not seen that may go into a qualification test: items already
        used in one, and hidden candidates nobody was shown yet; sorted (O(gold) per call, once
        per worker)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(keys.gold_qualification(campaign))
        pipe.zrangebyscore(keys.gold_hidden(campaign), 0, 0)
        pipe.smembers(keys.worker(worker, "seen"))
        qual, unshown, seen = pipe.execute()
        return sorted({_s(g) for g in (*qual, *unshown)} - {_s(g) for g in seen})

    #: Hidden-gold candidates one draw looks at (least shown first).
    GOLD_SCAN = 4096

    def next_golds(self, campaign: str, worker: str, k: int) -> list[GoldQuestion]:
        """Up to ``k`` hidden gold questions the worker has never seen: the least shown
        first, each shown to at most ``policy.gold_cap`` workers, never a qualification item
        (fewer when the campaign's gold is exhausted for them: import more).  One script and
        one read, whatever ``k``."""
        if k <= 0:
            return []
        picked = [
            _s(g)
            for g in self._draw_hidden(
                keys=[keys.gold_hidden(campaign), keys.worker(worker, "seen")],
                args=[self.policy.gold_cap, k, self.GOLD_SCAN],
            )
        ]
        out = []
        for raw in self.r.hmget(keys.GOLD, picked) if picked else []:
            item = _item_from_json(raw) if raw is not None else None
            if item is not None and item.campaign == campaign:
                out.append(item.public_view())
        return out

    def gold_left(self, campaign: str) -> int:
        """Hidden-gold items that may still be shown (below ``policy.gold_cap``)."""
        return int(self.r.zcount(keys.gold_hidden(campaign), "-inf", f"({self.policy.gold_cap}"))

    def gold_due_many(self, worker: str, k: int) -> list[bool]:
        """Whether each of the next ``k`` questions served to ``worker`` is hidden gold
        (:func:`qc_rules.gold_due`), in one round trip: it counts them, so call it once per
        served batch."""
        if k <= 0:
            return []
        n = int(self.r.hincrby(keys.worker(worker), "served", k))
        return qc_rules.gold_due(self.seed, worker, range(n - k + 1, n + 1), self.policy.gold_share)

    # ------------------------------------------------------------------ qualification

    def qualification_questions(self, campaign: str, worker: str) -> list[GoldQuestion]:
        """Draw ``qualification_size`` unseen gold questions and mark the worker in progress;
        while in progress, the same questions again.  Raises :class:`QualificationError` once
        the test is decided and :class:`NotEnoughGold` when the campaign lacks unseen gold."""
        size = self.policy.qualification_size
        if size == 0:
            return []
        wkey = keys.worker(worker)
        ids_raw, result = self.r.hmget(wkey, ["qual_ids", "qual_result"])
        if result is not None:
            raise QualificationError(f"qualification already {_s(result)}")
        if ids_raw is None:
            eligible = self._qualification_candidates(campaign, worker)
            if len(eligible) < size:
                raise NotEnoughGold(
                    f"campaign {campaign!r} has {len(eligible)} unseen gold items for a "
                    f"qualification test, need {size}"
                )
            rng = random.Random(int(qc_rules.uniform(self.seed, "qualification", worker) * 2**53))
            rng.shuffle(eligible)
            ids = [
                _s(g)
                for g in self._draw_qualification(
                    keys=[
                        keys.gold_hidden(campaign),
                        keys.gold_qualification(campaign),
                        keys.worker(worker, "seen"),
                    ],
                    args=[size, *eligible],
                )
            ]
            if len(ids) < size:  # a concurrent hidden draw took some: they are hidden gold now
                raise NotEnoughGold(f"campaign {campaign!r} has too little gold left; retry")
            # HSETNX: of two concurrent first calls, one set wins and both return it.
            if not self.r.hsetnx(wkey, "qual_ids", json.dumps(ids)):
                ids_raw = self.r.hget(wkey, "qual_ids")
        if ids_raw is not None:
            ids = json.loads(ids_raw)
        return [item.public_view() for item in self._load_many(ids)]

    def submit_qualification(self, worker: str, answers: dict[str, bool]) -> WorkerState:
        """Score the qualification test: every drawn question answered, nothing else.

        ``passed`` or ``failed`` by :func:`qc_rules.qualification_outcome`; the result is
        written once (a retried submission returns it unchanged), so failed workers stay
        failed and never get real questions.
        """
        wkey = keys.worker(worker)
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
        outcome, correct = qc_rules.qualification_outcome(
            answers, self._load_many(ids), self.policy
        )
        if self.r.hsetnx(wkey, "qual_result", outcome):
            self.r.hset(wkey, "qual_correct", correct)
            log.info(
                "qualification decided",
                extra={"worker": worker, "result": outcome, "correct": correct, "of": len(ids)},
            )
        return self.state(worker)

    # ------------------------------------------------------------------ answers and times

    def score_golds(
        self,
        worker: str,
        answers: list[tuple[str, bool, int]],
        *,
        stats_key: str | None = None,
    ) -> list[bool]:
        """Score a submitted batch of ``worker``'s gold answers (gold id, answer, elapsed ms):
        whether each matches its gold item, in one round trip whatever the batch's size.  The
        gateway scores off the request path (its settler), so no request's time depends on
        whether it held gold (issue #18).  With ``stats_key`` (the campaign's answer counters)
        the newly scored answers are counted there as ``gold_answers`` in the same step.

        Updates the rolling gold window.  ``elapsed_ms`` is validated but not recorded here:
        the gateway records every answer's time when it marks the answer, gold included, and
        recording it twice would weigh gold answers double in the speed check.  Idempotent: a
        retried gold item returns its first result and changes nothing.  All are checked
        before any is scored: an item never served to the worker raises
        :class:`UnknownGold` and leaves the batch unscored."""
        args: list[Any] = [self.policy.window]
        for gold_id, answer, elapsed_ms in answers:
            if not isinstance(answer, bool):
                raise QualityError("a gold answer must be true or false")
            self._check_elapsed(elapsed_ms)
            args += (gold_id, int(answer))
        score_keys = [
            keys.worker(worker, "seen"),
            keys.GOLD,
            keys.worker(worker, "scored"),
            keys.worker(worker, "gold"),
            keys.worker(worker),
        ]
        if stats_key is not None:
            score_keys.append(stats_key)
        try:
            flat = self._score(keys=score_keys, args=args)
        except ResponseError as exc:
            if "UNKNOWN" in str(exc):
                raise UnknownGold("gold item not served to this worker") from None
            raise
        return [bool(int(v)) for v in flat]

    @staticmethod
    def _check_elapsed(elapsed_ms: int) -> None:
        if isinstance(elapsed_ms, bool) or not isinstance(elapsed_ms, int) or elapsed_ms < 0:
            raise QualityError("elapsed_ms must be an int >= 0")

    def times_key(self, worker: str) -> str:
        """The worker's recent answer times (a list, newest first, :attr:`policy.window` long):
        the gateway pushes each new answer's time in the step that marks it answered
        (:meth:`~maskprop_gateway.leases.Leases.mark_answered`), so a crash never separates
        them; :meth:`record_answer_times` does both for callers without a lease."""
        return keys.worker(worker, "times")

    def check_answer_times(self, elapsed_ms: Iterable[int]) -> None:
        for e in elapsed_ms:
            self._check_elapsed(e)

    def update_median(self, worker: str, recent: list[int]) -> None:
        """Cache the worker's median answer time from its recent times (after new ones)."""
        if recent:
            self.r.hset(keys.MEDIANS, worker, float(np.median([float(t) for t in recent])))

    def refresh_median(self, worker: str) -> None:
        """Cache the worker's median answer time from the times recorded so far (the gateway's
        settler, after the request path recorded new ones)."""
        self.update_median(worker, [int(t) for t in self.r.lrange(self.times_key(worker), 0, -1)])

    def record_answer_times(self, worker: str, elapsed_ms: list[int]) -> None:
        """Record several answer times of one worker in one round trip (a submitted batch)."""
        if not elapsed_ms:
            return
        self.check_answer_times(elapsed_ms)
        times = self.times_key(worker)
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(times, *elapsed_ms)
        pipe.ltrim(times, 0, self.policy.window - 1)
        pipe.lrange(times, 0, -1)
        self.update_median(worker, pipe.execute()[2])

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
        values = [float(v) for v in self.r.hvals(keys.MEDIANS)]
        median = float(np.median(values)) if values else None
        # A large crowd's median moves slowly and costs O(workers) to read: reuse it for a
        # few seconds.  A small one is read every time (cheap, and it moves fast).
        self._median_cache = (
            (time.monotonic(), median) if len(values) >= self.CROWD_MEDIAN_CACHE_FROM else None
        )
        return median

    def _states(self, workers: list[str], *, timing: bool) -> dict[str, WorkerState]:
        """The workers' states (:func:`qc_rules.worker_state`) in one round trip; without
        ``timing`` no answer times and no crowd median are read (``fast_share`` is None)."""
        pipe = self.r.pipeline(transaction=False)
        for w in workers:
            pipe.hgetall(keys.worker(w))
            pipe.lrange(keys.worker(w, "gold"), 0, -1)
            if timing:
                pipe.lrange(keys.worker(w, "times"), 0, -1)
        replies = iter(pipe.execute())
        median = self._crowd_median_ms() if timing else None
        out: dict[str, WorkerState] = {}
        for w in workers:
            record = {_s(k): _s(v) for k, v in next(replies).items()}
            window = [int(x) for x in next(replies)]
            times = [float(x) for x in next(replies)] if timing else []
            out[w] = qc_rules.worker_state(w, record, window, times, median, self.policy)
        return out

    def state(self, worker: str) -> WorkerState:
        return self._states([worker], timing=True)[worker]

    def standing(self, worker: str) -> WorkerState:
        """:meth:`state` without the speed check (``fast_share`` is ``None``): qualification
        and suspension, at a fraction of the cost (no answer times, no crowd median)."""
        return self._states([worker], timing=False)[worker]

    #: The fields of a worker's record :meth:`status` reads.
    _STATUS_FIELDS = ("qual_ids", "qual_result", "suspended_at")

    def status(self, worker: str) -> str:
        """The worker's standing in a word: ``suspended``, else its qualification
        (``passed``, ``failed``, ``in_progress``, ``required``), from one read of a fixed set
        of fields: what an answer's response says, so its cost must not depend on the worker's
        gold history (the gold window :meth:`standing` reads grows with each gold answer
        scored, issue #18)."""
        values = self.r.hmget(keys.worker(worker), self._STATUS_FIELDS)
        record = {
            k: _s(v) for k, v in zip(self._STATUS_FIELDS, values, strict=True) if v is not None
        }
        st = qc_rules.worker_state(worker, record, [], [], None, self.policy)
        return "suspended" if st.suspended else st.qualification

    def review_suspends(self, worker: str) -> tuple[WorkerState, bool]:
        """Apply the suspension rules (:func:`qc_rules.suspension_reasons`): the worker's state
        after them, and whether this call is the one that suspended it.  Suspension is for
        good (``suspended_at`` is written once)."""
        st = self.state(worker)
        if st.suspended:
            return st, False
        reasons = qc_rules.suspension_reasons(st, self.policy)
        if not reasons:
            return st, False
        wkey = keys.worker(worker)
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
                    "gold_window": min(st.gold_answers, self.policy.window),
                },
            )
        return self.state(worker), newly

    # ------------------------------------------------------------------ votes

    def cast_votes(
        self, worker: str, votes: list[tuple[str, bool]], *, at: float | None = None
    ) -> dict[str, tuple[bool, dict[str, tuple[bool, float]]]]:
        """Record a batch of one worker's votes, cast at ``at`` (unix s; default now: the
        gateway passes the time the answers were marked, as it applies them later), and read
        back every vote on those questions, in one Lua call: question id -> (this vote is
        new, all votes) for :meth:`tally`."""
        if any(not isinstance(label, bool) for _, label in votes):
            raise QualityError("a vote must be true or false")
        cast_at = self.clock() if at is None else at
        args: list[Any] = [keys.VOTES, worker, repr(float(cast_at)), self.policy.vote_ttl_s]
        for qid, label in votes:
            args += (qid, int(label))
        flat = self._cast(args=args)
        out: dict[str, tuple[bool, dict[str, tuple[bool, float]]]] = {}
        for k, (qid, _) in enumerate(votes):
            pairs = flat[2 * k + 1]
            raw = {pairs[j]: pairs[j + 1] for j in range(0, len(pairs), 2)}
            out[qid] = (bool(flat[2 * k]), self._parse_votes(raw))
        return out

    def tally_many(
        self, question_ids: list[str], policy: QualityPolicy | None = None
    ) -> dict[str, tuple[int, bool | None]]:
        """:meth:`tally` of the votes stored on ``question_ids``, from one read of the votes and
        one of the voters' states (the repair sweep)."""
        if not question_ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for qid in question_ids:
            pipe.hgetall(keys.votes(qid))
        return self.tally(
            {
                qid: self._parse_votes(raw)
                for qid, raw in zip(question_ids, pipe.execute(), strict=True)
            },
            policy=policy,
        )

    def tally(
        self,
        votes: dict[str, dict[str, tuple[bool, float]]],
        known: dict[str, WorkerState] | None = None,
        *,
        policy: QualityPolicy | None = None,
    ) -> dict[str, tuple[int, bool | None]]:
        """Per question of ``votes`` (question id -> worker -> (label, cast at unix s), as
        :meth:`cast_votes` read them): (counted votes still missing, decided label or None),
        by :func:`qc_rules.missing_votes` and :func:`qc_rules.decide` under ``policy`` (the
        campaign's; default this QC's).  ``known`` states (read after the last review) are not
        read again."""
        known = known or {}
        workers = sorted({w for vs in votes.values() for w in vs} - set(known))
        states = {**known, **(self._states(workers, timing=False) if workers else {})}
        out: dict[str, tuple[int, bool | None]] = {}
        p = policy or self.policy
        for qid, vs in votes.items():
            counted = qc_rules.counted_votes(vs, states, p)
            out[qid] = (
                qc_rules.missing_votes(counted, p),
                qc_rules.decide(qid, counted, states, p),
            )
        return out

    @staticmethod
    def _parse_votes(raw: dict[Any, Any]) -> dict[str, tuple[bool, float]]:
        votes: dict[str, tuple[bool, float]] = {}
        for w, v in raw.items():
            bit, _, cast_at = _s(v).partition(":")
            votes[_s(w)] = (bit == "1", float(cast_at))
        return votes
