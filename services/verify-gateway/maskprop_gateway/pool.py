"""The gateway's pool of real questions in Redis: which question goes to which worker.

Keys (:mod:`maskprop_gateway.keys`; ``{c}`` campaign, ``{q}`` search question id, which starts
with the campaign):

* ``campaigns``  set  campaigns that ever had questions here (the repair sweep walks them)
* ``{c}:items``  hash  question id -> JSON view (class name, image file, RLE): the one copy of
  a real question's view, which the lease routes read (a lease stores gold views only)
* ``{c}:retired``  zset  question id -> unix s: a decided question's view stays in ``items``
  until then (``keep_views_s`` after search acknowledged its label, longer than any lease that
  showed it may still run), then :meth:`QuestionPool.purge` drops it
* ``{c}:open``  zset  question id -> arrival (unix s): every question search has not yet
  acknowledged a label for
* ``{c}:ready``  zset  the subset that may need another worker, same scores; a lease claims
  from its front (oldest first), so a lease costs O(questions it takes), never O(questions
  other workers hold)
* ``want``  hash  question id -> counted votes still missing (absent: the policy's
  redundancy; ``0``: decided, its label on its way to search)
* ``item:{q}:workers``  hash  every worker it was ever served to (a worker never sees a
  question twice) -> its lease deadline while it holds the question, ``0`` once it answered or
  its lease expired: one key and one read a question for a claim, which used to read a
  holders hash and a seen-by set

Two writes outside the pool's keys, each in the script that makes it necessary (listed in
:mod:`maskprop_gateway.keys`): :meth:`QuestionPool.settle` appends a decided label to the label
outbox (``outbox:labels``, the forwarder's) in the same step that decides it, so a crash cannot
lose or repeat it; :meth:`QuestionPool.done` deletes the question's votes (quality control's
``qc:votes:{q}``) with its other keys.

A claim is one Lua script: checking that a question still has a free slot and taking the slot
cannot interleave with another lease (two concurrent leases used to pick the same questions, so
the crowd answered most questions twice at redundancy 1).  The scripts build their per-question
keys from the prefixes :data:`keys.ITEM` and :data:`keys.VOTES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from maskprop_gateway import keys

# The scripts batch what they can: one HMGET/ZMSCORE/ZREM/HSET/DEL per batch instead of one
# call per question (each redis.call from Lua costs ~2 us of Redis's single core).

# KEYS: ready, items, want.  ARGV: item prefix, worker, n, expires, now, redundancy.
# Returns [qid, view, qid, view, ...] for up to n questions this worker never saw, each with a
# free slot (fewer unexpired holders than votes still wanted); full or gone ones leave `ready`.
# One HGETALL a question says both (seen: the worker is a field; holders: deadlines > now).
_CLAIM = """
local ready, items, want = KEYS[1], KEYS[2], KEYS[3]
local prefix, worker = ARGV[1], ARGV[2]
local n, expires, now = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local redundancy = tonumber(ARGV[6])
local out, drop = {}, {}
local got, start = 0, 0
local chunk = math.max(2 * n, 32)
while got < n do
  local ids = redis.call('zrange', ready, start, start + chunk - 1)
  if #ids == 0 then break end
  local wants = redis.call('hmget', want, unpack(ids))
  local cand, full = {}, {}
  local used = #ids
  for i, qid in ipairs(ids) do
    if got + #cand >= n then
      used = i - 1
      break
    end
    local seen, active = false, 0
    local held = redis.call('hgetall', prefix .. qid .. ':workers')
    for j = 1, #held, 2 do
      if held[j] == worker then
        seen = true
        break
      end
      if tonumber(held[j + 1]) > now then active = active + 1 end
    end
    if not seen then
      local w = redundancy
      if wants[i] then w = tonumber(wants[i]) end
      if active < w then
        cand[#cand + 1] = qid
        full[#full + 1] = active + 1 >= w
      else
        drop[#drop + 1] = qid
      end
    end
  end
  start = start + used  -- `drop` leaves `ready` after the loop: ranks do not shift before
  if #cand > 0 then  -- the views of the questions taken only (a view is ~1 KB)
    local views = redis.call('hmget', items, unpack(cand))
    for i, qid in ipairs(cand) do
      local view = views[i]
      if view then
        redis.call('hset', prefix .. qid .. ':workers', worker, expires)
        out[#out + 1] = qid
        out[#out + 1] = view
        got = got + 1
      end
      if not view or full[i] then drop[#drop + 1] = qid end
    end
  end
end
if #drop > 0 then redis.call('zrem', ready, unpack(drop)) end
return out
"""

# KEYS: ready, open, want, label outbox.  ARGV: item prefix, worker, then (qid, missing, label)
# triples.  After `worker` voted (or a sweep re-tallied): record the votes each question still
# misses and end the worker's hold (its deadline becomes 0: it saw the question) in the same
# step, so no claim sees a free slot in between; a question no longer open keeps no keys.
# A question decided now (missing 0, label "0"/"1", its `want` not already 0) has its label
# appended to the outbox for search, once: a second settle of a decided question appends
# nothing.  Decided questions leave `ready`; one still missing votes goes back to `ready` at its
# arrival score (a claim drops it again if its holders already cover it).
_SETTLE = """
local ready, open, want, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, worker = ARGV[1], ARGV[2]
local qids = {}
for i = 3, #ARGV, 3 do qids[#qids + 1] = ARGV[i] end
if #qids == 0 then return 0 end
local arrived = redis.call('zmscore', open, unpack(qids))
local before = redis.call('hmget', want, unpack(qids))
local wants, back, out = {}, {}, {}
for k, qid in ipairs(qids) do
  local w, label = tonumber(ARGV[3 * k + 1]), ARGV[3 * k + 2]
  local at = arrived[k]
  if at then
    if worker ~= '' then redis.call('hset', prefix .. qid .. ':workers', worker, '0') end
    wants[#wants + 1] = qid
    wants[#wants + 1] = w
    if w > 0 then
      back[#back + 1] = at
      back[#back + 1] = qid
    else
      out[#out + 1] = qid
      if label ~= '' and before[k] ~= '0' then
        redis.call('xadd', outbox, '*', 'k', qid, 'v', label)
      end
    end
  end
end
if #wants > 0 then redis.call('hset', want, unpack(wants)) end
if #back > 0 then redis.call('zadd', ready, unpack(back)) end
if #out > 0 then redis.call('zrem', ready, unpack(out)) end
return 0
"""

# KEYS: ready, open.  ARGV: item prefix, worker, qid, qid, ...  A worker's expired lease: its
# unanswered questions lose that holder (seen still) and may be claimed again.
_RELEASE = """
local ready, open = KEYS[1], KEYS[2]
for i = 3, #ARGV do
  local qid = ARGV[i]
  local at = redis.call('zscore', open, qid)
  if at then
    redis.call('hset', ARGV[1] .. qid .. ':workers', ARGV[2], '0')
    redis.call('zadd', ready, at, qid)
  end
end
return 0
"""

# KEYS: want, open, ready, retired (of one campaign).  ARGV: item prefix, votes prefix, purge
# at (unix s), qid, qid, ...  Search acknowledged these labels: the questions leave the pool,
# their per-question keys (workers, votes) go, their views are retired.  The seen-by set and
# holders hash of the layout before `:workers` go too (questions in flight across an upgrade;
# a DEL of a missing key costs Redis ~0.1 us).
_DONE = """
local want, open, ready, retired = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, votes, at = ARGV[1], ARGV[2], ARGV[3]
local qids, keys, when = {}, {}, {}
for i = 4, #ARGV do
  local qid = ARGV[i]
  qids[#qids + 1] = qid
  keys[#keys + 1] = prefix .. qid .. ':workers'
  keys[#keys + 1] = prefix .. qid .. ':holders'
  keys[#keys + 1] = prefix .. qid .. ':seen'
  keys[#keys + 1] = votes .. qid
  when[#when + 1] = at
  when[#when + 1] = qid
end
if #qids == 0 then return 0 end
redis.call('hdel', want, unpack(qids))
redis.call('zrem', open, unpack(qids))
redis.call('zrem', ready, unpack(qids))
redis.call('zadd', retired, unpack(when))
redis.call('del', unpack(keys))
return 0
"""

# KEYS: retired, items, open.  ARGV: now, limit.  Retired views past their time leave items,
# unless search sent the question again meanwhile (it is open then).
_PURGE = """
local retired, items, open = KEYS[1], KEYS[2], KEYS[3]
local due = redis.call('zrangebyscore', retired, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due == 0 then return 0 end
local gone = {}
for _, qid in ipairs(due) do
  if not redis.call('zscore', open, qid) then gone[#gone + 1] = qid end
end
if #gone > 0 then redis.call('hdel', items, unpack(gone)) end
redis.call('zrem', retired, unpack(due))
return #due
"""

# KEYS: open, ready.  ARGV: item prefix, now, start, count.  The repair sweep's read of one
# chunk of `open` (ranks start .. start + count - 1): returns [questions read, then those of them
# outside `ready` with no unexpired holder].  One call a chunk; holders are read only for the
# questions outside `ready` (the sweep used to pipeline a ZSCORE and an HVALS a question).
_UNHELD = """
local first = tonumber(ARGV[3])
local ids = redis.call('zrange', KEYS[1], first, first + tonumber(ARGV[4]) - 1)
local out = {#ids}
if #ids == 0 then return out end
local prefix, now = ARGV[1], tonumber(ARGV[2])
local ready = redis.call('zmscore', KEYS[2], unpack(ids))
for i, qid in ipairs(ids) do
  if not ready[i] then
    local held = false
    for _, t in ipairs(redis.call('hvals', prefix .. qid .. ':workers')) do
      if tonumber(t) > now then
        held = true
        break
      end
    end
    if not held then out[#out + 1] = qid end
  end
end
return out
"""

#: Questions per script call where a script unpacks them into one command's arguments (Lua's
#: C stack takes a few thousand).
BATCH = 500


class QuestionPool:
    """Claims, releases and retires the real questions a gateway hands to workers.

    ``outbox_key``: the stream :meth:`settle` appends decided labels to (entry ``k`` question
    id, ``v`` ``"0"``/``"1"``; :data:`keys.LABEL_OUTBOX`, relayed by
    :mod:`maskprop_gateway.forwarder`)."""

    def __init__(
        self,
        redis: Any,
        *,
        outbox_key: str = keys.LABEL_OUTBOX,
        keep_views_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.r = redis
        self.outbox_key = outbox_key
        self.keep_views_s = keep_views_s
        self.clock = clock
        # Script objects reload themselves after a Redis restart (NOSCRIPT).
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._release = redis.register_script(_RELEASE)
        self._done = redis.register_script(_DONE)
        self._purge = redis.register_script(_PURGE)
        self._unheld = redis.register_script(_UNHELD)

    @staticmethod
    def campaign_of(qid: str) -> str:
        return qid.split(":", 1)[0]

    def add(self, campaign: str, views: dict[str, str], now: float) -> None:
        """New questions from search (``views``: question id -> JSON view)."""
        if not views:
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(keys.CAMPAIGNS, campaign)
        # One HSET for all (search sends the same view for a question id, so overwriting is
        # harmless; an HSETNX per question was 8 % of the gateway's CPU under load).
        pipe.hset(keys.items(campaign), mapping=views)
        arrivals = {qid: now for qid in views}
        pipe.zadd(keys.open_questions(campaign), arrivals, nx=True)
        pipe.zadd(keys.ready(campaign), arrivals, nx=True)
        pipe.execute()

    def ready_count(self, campaign: str) -> int:
        """Questions of ``campaign`` that may need another worker (claimable, seen-by aside)."""
        return int(self.r.zcard(keys.ready(campaign)))

    def ready_counts(self, campaigns: Iterable[str]) -> dict[str, int]:
        """:meth:`ready_count` of each of ``campaigns``, in one round trip."""
        names = sorted(set(campaigns))
        pipe = self.r.pipeline(transaction=False)
        for campaign in names:
            pipe.zcard(keys.ready(campaign))
        return {c: int(n) for c, n in zip(names, pipe.execute(), strict=True)}

    def claim(
        self, campaign: str, worker: str, n: int, expires: float, now: float, redundancy: int
    ) -> list[tuple[str, str]]:
        """Up to ``n`` (question id, JSON view) for ``worker``, atomically held by it."""
        flat = self._claim(
            keys=[keys.ready(campaign), keys.items(campaign), keys.WANT],
            args=[keys.ITEM, worker, n, repr(expires), repr(now), redundancy],
        )
        return [(_s(flat[i]), _s(flat[i + 1])) for i in range(0, len(flat), 2)]

    def settle(
        self, worker: str, tally: dict[str, tuple[int, bool | None]], campaign: str | None = None
    ) -> None:
        """After ``worker``'s votes (``""``: a sweep): per question, (votes still missing,
        decided label or ``None``).  A question decided now has its label appended to the
        outbox in the same step (once per question, however often it is settled).  With
        ``campaign`` the call costs its round trip even for an empty tally: an answer request
        settles whether or not it held real questions (no timing side channel, issue #18)."""
        by_campaign: dict[str, list[Any]] = {} if campaign is None else {campaign: []}
        for qid, (missing, label) in tally.items():
            bit = "" if label is None else ("1" if label else "0")
            by_campaign.setdefault(self.campaign_of(qid), []).extend((qid, int(missing), bit))
        for name, args in by_campaign.items():
            for lo in range(0, max(len(args), 1), 3 * BATCH):
                self._settle(
                    keys=[
                        keys.ready(name),
                        keys.open_questions(name),
                        keys.WANT,
                        self.outbox_key,
                    ],
                    args=[keys.ITEM, worker, *args[lo : lo + 3 * BATCH]],
                )

    def release(self, campaign: str, worker: str, qids: Iterable[str]) -> None:
        """Drop ``worker``'s hold on ``qids`` (an expired lease); they may be claimed again."""
        qids = list(qids)
        if qids:
            self._release(
                keys=[keys.ready(campaign), keys.open_questions(campaign)],
                args=[keys.ITEM, worker, *qids],
            )

    def view(self, campaign: str, qid: str) -> str | None:
        """The JSON view of question ``qid`` (open, or retired less than ``keep_views_s`` ago)."""
        raw = self.r.hget(keys.items(campaign), qid)
        return None if raw is None else _s(raw)

    def done(self, qids: Iterable[str]) -> None:
        """Search acknowledged the labels of ``qids``: remove them and their keys (their
        votes included); their views stay ``keep_views_s`` more (:meth:`purge`)."""
        purge_at = repr(self.clock() + self.keep_views_s)
        by_campaign: dict[str, list[str]] = {}
        for qid in qids:
            by_campaign.setdefault(self.campaign_of(qid), []).append(qid)
        for c, group in by_campaign.items():
            for lo in range(0, len(group), BATCH):
                self._done(
                    keys=[
                        keys.WANT,
                        keys.open_questions(c),
                        keys.ready(c),
                        keys.retired(c),
                    ],
                    args=[keys.ITEM, keys.VOTES, purge_at, *group[lo : lo + BATCH]],
                )

    def purge(self) -> int:
        """Drop the views retired long enough ago (:meth:`done`), every campaign's; returns how
        many left.  The gateway's expiry loop calls it."""
        now, n = repr(self.clock()), 0
        for c in self.campaigns():
            while True:
                got = int(
                    self._purge(
                        keys=[keys.retired(c), keys.items(c), keys.open_questions(c)],
                        args=[now, BATCH],
                    )
                )
                n += got
                if got < BATCH:
                    break
        return n

    def campaigns(self) -> list[str]:
        return sorted(_s(c) for c in self.r.smembers(keys.CAMPAIGNS))

    def unheld(self, campaign: str, now: float, chunk: int = BATCH) -> Iterable[list[str]]:
        """Open questions outside ``ready`` with no unexpired holder, a chunk at a time: those
        a repair sweep re-tallies (a suspended voter's discounted vote, an interrupted call).
        One Lua call a chunk of ``open``."""
        start = 0
        open_key, ready_key = keys.open_questions(campaign), keys.ready(campaign)
        while True:
            got = self._unheld(
                keys=[open_key, ready_key], args=[keys.ITEM, repr(now), start, chunk]
            )
            if not int(got[0]):
                return
            start += int(got[0])
            if len(got) > 1:
                yield [_s(q) for q in got[1:]]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
