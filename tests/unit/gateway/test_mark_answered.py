"""Leases.mark_answered's script: one HMGET/HSET/LPUSH for a call, the same codes as one
HSETNX an answer (first answer 1, a replay of the same Idempotency-Key 2, anything else 0)."""

from __future__ import annotations

import fakeredis
from maskprop_gateway import keys
from maskprop_gateway.leases import Leases

LEASE = {"vendor": "v1", "worker": "w1", "campaign": "c1"}


def _mark(leases: Leases, answers, tag: str = ""):
    return leases.mark_answered(
        LEASE, "L1", answers, now=100.0, tag=tag, times_key="times:w1", window=5
    )


def test_codes_times_and_the_inbox_entry() -> None:
    r = fakeredis.FakeRedis()
    leases = Leases(r, lease_ttl_s=60, retention_s=60)
    codes, entry = _mark(
        leases, [("q1", True, 1500), ("q2", False, 900), ("q1", False, 10)], tag="k1"
    )
    # the second answer to q1 in the same call is the key's own: 2, and q1 keeps its first
    assert codes == [1, 1, 2] and entry is not None
    assert [t.decode() for t in r.lrange("times:w1", 0, -1)] == ["900", "1500"]
    ((_id, fields),) = r.xrange(keys.ANSWER_INBOX)
    assert fields[b"a"] == b"q1:1:1500,q2:0:900" and fields[b"w"] == b"w1"
    assert int(r.hget(keys.stats("c1"), "answers")) == 2
    assert r.ttl(keys.lease_answered("L1")) > 0
    # a replay with the same key: all 2, nothing new; another key or none: 0 (duplicates)
    assert _mark(leases, [("q1", True, 5), ("q2", True, 5)], tag="k1") == ([2, 2], None)
    assert _mark(leases, [("q1", True, 5), ("q3", True, 7)], tag="k2")[0] == [0, 1]
    assert _mark(leases, [("q3", True, 5), ("q3", True, 5)])[0] == [0, 0]
    assert _mark(leases, [("q4", True, 5), ("q4", True, 5)])[0] == [1, 0]  # untagged: 0
    assert int(r.hget(keys.stats("c1"), "answers")) == 4
    assert r.llen("times:w1") == 4 and len(r.xrange(keys.ANSWER_INBOX)) == 3
