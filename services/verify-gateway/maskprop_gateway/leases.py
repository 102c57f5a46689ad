"""Leases in Redis: which questions a worker was handed, under which opaque ids, until when,
and which it answered.

Keys (:mod:`maskprop_gateway.keys`):

* ``lease:{id}`` hash: vendor, worker, campaign, kind (``work``/``qualification``), created
  and expires (unix s), ``refs``: JSON opaque id -> [code, gold or question id], code ``q``
  qualification gold, ``g`` hidden gold, ``r`` real question;
* ``lease:{id}:views`` hash opaque id -> view (:mod:`maskprop_gateway.views`) of its gold
  questions, for the image and overlay routes during the lease (and ``VIEW_GRACE_S`` after);
  a real question's view is read from the question pool (``{c}:items``), never copied;
* ``lease:{id}:answered`` hash opaque id -> tag of the request that answered it (its
  Idempotency-Key, or ""): one answer per (lease, question);
* ``lease:{id}:qual`` hash gold id -> ``"1"``/``"0"``: a qualification lease's answers so far;
* ``leases`` zset lease id -> deadline: the expiry index; a lease being expired stays in it
  with its score pushed ``EXPIRY_CLAIM_S`` ahead (claimed) until :meth:`Leases.finish_expired`
  removes it, so an expiry cut off by a crash runs again (issue #18);
* ``stats:{campaign}`` hash of counters (``answers``, counted when an answer is marked, and
  ``gold_answers``, counted by quality control when it scores a gold answer).

Questions handed to vendors carry opaque ids (``q_<random>``) so a hidden gold question looks
exactly like a real one; the refs (gold ids) never leave the gateway.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

from maskprop_gateway import keys, views
from maskprop_gateway.errors import NotFound
from maskprop_gateway.qc_rules import GoldQuestion

# KEYS: answered hash, stats hash, the worker's answer-times list, the answer inbox (stream).
# ARGV: ttl, the request's tag ("" or its Idempotency-Key), the times window, then the inbox
# entry's lease id, vendor, worker, campaign and time (unix s), then (lease question id, answer
# 0|1, elapsed ms) triples.  One answer per (lease, question): per answer 1 if it is new (counted
# in the campaign's stats, its time recorded and the answer appended to the inbox in the same
# step, so a crash never separates them), 2 if an earlier attempt with the same non-empty tag
# made it (a dead request of the same Idempotency-Key), else 0.  The new answers of the call go
# into one inbox entry (none without new answers); the settler (gateway.Gateway.settle_pending)
# applies them.  Nothing here depends on the kind of a question (gold or real): the arguments
# carry none, so every answer request costs the same work (issue #18).  Returns {the codes,
# the entry's id or false}.  One HMGET, HSET and LPUSH for all the call's answers (a
# HSETNX and LPUSH an answer were ~1.1 us each of Redis's one core, ~0.45 ms a 95-answer call).
_ANSWERED = """
local tag = ARGV[2]
local ids = {}
for i = 9, #ARGV, 3 do ids[#ids + 1] = ARGV[i] end
local fresh, out, entry, fields, times, here = 0, {}, {}, {}, {}, {}
if #ids > 0 then
  local before = redis.call('hmget', KEYS[1], unpack(ids))
  for k, id in ipairs(ids) do
    local i = 6 + 3 * k
    local was = before[k]
    if here[id] then was = tag end
    if not was then
      here[id] = true
      fresh = fresh + 1
      fields[#fields + 1] = id
      fields[#fields + 1] = tag
      times[#times + 1] = ARGV[i + 2]
      entry[#entry + 1] = id .. ':' .. ARGV[i + 1] .. ':' .. ARGV[i + 2]
      out[#out + 1] = 1
    elseif tag ~= '' and was == tag then
      out[#out + 1] = 2
    else
      out[#out + 1] = 0
    end
  end
end
if fresh > 0 then
  redis.call('hset', KEYS[1], unpack(fields))
  redis.call('lpush', KEYS[3], unpack(times))
end
redis.call('expire', KEYS[1], ARGV[1])
redis.call('hincrby', KEYS[2], 'answers', fresh)
local id = false
if fresh > 0 then
  redis.call('ltrim', KEYS[3], 0, tonumber(ARGV[3]) - 1)
  id = redis.call('xadd', KEYS[4], '*', 'l', ARGV[4], 'v', ARGV[5], 'w', ARGV[6], 'c', ARGV[7],
    't', ARGV[8], 'a', table.concat(entry, ','))
end
return {out, id}
"""

# Claim the due leases: push their score to ARGV[2] so no other replica takes them while this
# one frees their questions and queues their callbacks (a crash leaves them due again).
_CLAIM_EXPIRED = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""

#: Seconds a claimed expiry may take before another pass (any replica) takes it over.
EXPIRY_CLAIM_S = 60.0

_FIELDS = ("vendor", "worker", "campaign", "kind", "expires", "created", "refs")


#: Seconds after its deadline that a lease's images and overlays are still served.
VIEW_GRACE_S = 60


class Leases:
    """Lease records: written once at creation, read by every later call on the lease.

    ``lease_ttl_s``: seconds a lease runs; ``retention_s``: how long its record outlives its
    deadline (status queries and late answers get 410 until then, 404 after)."""

    def __init__(self, redis: Any, *, lease_ttl_s: float, retention_s: float) -> None:
        self.r = redis
        self.lease_ttl_s = lease_ttl_s
        self.retention_s = retention_s
        self._answered = redis.register_script(_ANSWERED)
        self._claim_expired = redis.register_script(_CLAIM_EXPIRED)

    @property
    def record_ttl_s(self) -> int:
        """Seconds a lease's record lives from its creation (``retention_s`` after its
        deadline)."""
        return int(self.lease_ttl_s + self.retention_s) + 1

    def create(
        self,
        vendor_id: str,
        worker_id: str,
        campaign: str,
        kind: str,
        refs: dict[str, tuple[str, str]],
        shown: dict[str, str],
        now: float,
        expires: float,
    ) -> str:
        """Record a new lease of ``refs`` (opaque id -> (code, gold or question id)), created
        ``now`` and running until ``expires`` (unix s); of ``shown`` (opaque id -> view) the
        gold questions' views are kept (real ones are in the question pool); returns its id."""
        gold = {oid: v for oid, v in shown.items() if refs[oid][0] != "r"}
        lease_id = "l_" + secrets.token_urlsafe(12)
        key, ttl = keys.lease(lease_id), self.record_ttl_s
        pipe = self.r.pipeline(transaction=True)  # a lease exists with its expiry or not at all
        pipe.hset(
            key,
            mapping={
                "vendor": vendor_id,
                "worker": worker_id,
                "campaign": campaign,
                "kind": kind,
                "created": now,
                "expires": expires,
                "refs": json.dumps(refs, separators=(",", ":")),
            },
        )
        pipe.expire(key, ttl)
        # For the image and overlay routes, during the lease only.  Written for every lease,
        # gold or not (the field "" is no opaque id): what creating a lease costs must not tell
        # whether it holds gold (issue #18).
        views_key = keys.lease_views(lease_id)
        pipe.hset(views_key, mapping={"": "", **gold})
        pipe.expire(views_key, int(self.lease_ttl_s) + VIEW_GRACE_S)
        pipe.zadd(keys.LEASES, {lease_id: expires})
        pipe.execute()
        return lease_id

    def get(self, vendor_id: str, lease_id: str) -> dict[str, Any]:
        """A lease's stored record (without its views); only its own vendor may see it
        (others get NotFound).  ``refs``: opaque id -> (code, gold or question id)."""
        rec = self.record(lease_id)
        if rec is None or rec["vendor"] != vendor_id:
            raise NotFound("no such lease")
        return rec

    def record(self, lease_id: str) -> dict[str, Any] | None:
        """A lease's stored record, whoever's it is (None once gone)."""
        values = self.r.hmget(keys.lease(lease_id), _FIELDS)
        rec: dict[str, Any] = {
            k: _s(v) for k, v in zip(_FIELDS, values, strict=True) if v is not None
        }
        if "vendor" not in rec:
            return None
        rec["refs"] = json.loads(rec["refs"])
        return rec

    def answered(self, lease_id: str) -> set[str]:
        """Opaque ids of the lease's questions answered so far."""
        return {_s(m) for m in self.r.hkeys(keys.lease_answered(lease_id))}

    def answered_count(self, lease_id: str) -> int:
        return int(self.r.hlen(keys.lease_answered(lease_id)))

    def gold_view(self, lease_id: str, oid: str) -> str | None:
        """The JSON view of gold question ``oid`` of the lease (during it only)."""
        view = self.r.hget(keys.lease_views(lease_id), oid)
        return None if view is None else _s(view)

    def mark_answered(
        self,
        lease: dict[str, Any],
        lease_id: str,
        answers: Iterable[tuple[str, bool, int]],
        *,
        now: float,
        tag: str = "",
        times_key: str,
        window: int,
    ) -> tuple[list[int], str | None]:
        """Record answers (opaque id, answer, elapsed ms) to ``lease`` (its record) in one
        step: per answer 1 if it is the first to that question of the lease, 2 if an earlier
        attempt tagged ``tag`` (the same Idempotency-Key) answered it, else 0.  New answers
        are counted in the campaign's stats, their times pushed on the worker's ``times_key``
        list (QC's, trimmed to ``window``) and appended, together, as one entry to the answer
        inbox (:data:`keys.ANSWER_INBOX`, read by :mod:`~maskprop_gateway.settler`) in the
        same step: an answer marked is an answer the settler will apply.  Returns (codes, the
        inbox entry's id or None when nothing was new)."""
        args: list[Any] = [
            self.record_ttl_s,
            tag,
            int(window),
            lease_id,
            lease["vendor"],
            lease["worker"],
            lease["campaign"],
            repr(float(now)),
        ]
        for oid, label, ms in answers:
            args += (oid, int(bool(label)), int(ms))
        codes, entry_id = self._answered(
            keys=[
                keys.lease_answered(lease_id),
                keys.stats(lease["campaign"]),
                times_key,
                keys.ANSWER_INBOX,
            ],
            args=args,
        )
        return [int(c) for c in codes], (_s(entry_id) if entry_id else None)

    def keep_qualification_answers(self, lease_id: str, answers: dict[str, bool]) -> None:
        """Keep a qualification lease's answers (gold id -> answer) until all are in, without
        replacing an answer already kept (a re-run after a crash: the first answer to a
        question is the one that counts)."""
        if not answers:
            return
        pipe = self.r.pipeline(transaction=False)
        for g, v in answers.items():
            pipe.hsetnx(keys.lease_qualification(lease_id), g, "1" if v else "0")
        pipe.execute()

    def qualification_answers(self, lease_id: str) -> dict[str, bool]:
        stored = self.r.hgetall(keys.lease_qualification(lease_id))
        return {_s(k): v == b"1" for k, v in stored.items()}

    def take_expired(
        self, now: float, *, limit: int = 1000
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Leases past their deadline at ``now`` (up to ``limit``), each claimed for
        :data:`EXPIRY_CLAIM_S` seconds: (lease id, record) of those whose record still exists.
        Call :meth:`finish_expired` once their questions are free and their callbacks queued;
        a lease whose expiry was cut off (a killed gateway) is due again when its claim lapses,
        and every step of an expiry is idempotent (a release drops a hold once, the callback
        has a once-marker), so it completes exactly once."""
        for _ in range(limit):
            # one lease a claim: replicas expiring at the same time share the due leases
            taken = self._claim_expired(
                keys=[keys.LEASES], args=[repr(now), repr(now + EXPIRY_CLAIM_S), 1]
            )
            if not taken:
                return
            lease_id = _s(taken[0])
            rec = self.record(lease_id)
            if rec is None:  # its record outlived its retention: nothing left to free
                self.finish_expired([lease_id])
            else:
                yield lease_id, rec

    def finish_expired(self, lease_ids: Iterable[str]) -> None:
        """Take leases whose expiry completed out of the expiry index."""
        ids = list(lease_ids)
        if ids:
            self.r.zrem(keys.LEASES, *ids)

    def stats(self, campaign: str) -> dict[str, int]:
        """The campaign's answer counters (``answers``, ``gold_answers``)."""
        return {_s(k): int(v) for k, v in self.r.hgetall(keys.stats(campaign)).items()}


def opaque_ids(n: int) -> Iterator[str]:
    """``n`` random question ids (``q_`` + 72 bits, URL-safe): a lease's from one read of the
    OS's random source (one syscall per id was ~1 % of the gateway's CPU)."""
    raw = secrets.token_bytes(9 * n)
    for i in range(0, 9 * n, 9):
        yield "q_" + base64.urlsafe_b64encode(raw[i : i + 9]).decode()


def gold_view(g: GoldQuestion) -> str:
    """A gold question's view, indistinguishable from a real question's."""
    # A gold item's image_id is its file path under the image store root.
    counts = g.rle_counts.decode("ascii") if isinstance(g.rle_counts, bytes) else str(g.rle_counts)
    return views.render(g.class_name, g.image_id, g.rle_h, g.rle_w, counts)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
