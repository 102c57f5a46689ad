"""The settler's delivery (maskprop_gateway.settler): entries applied once acknowledged and
deleted, a failing entry retried by the next pass, one that can never be applied (or keeps
failing) dead-lettered so the inbox moves on, and the backlog metrics."""

from __future__ import annotations

import fakeredis
from maskprop_gateway import keys
from maskprop_gateway.metrics import SETTLE_BACKLOG, SETTLE_DEAD
from maskprop_gateway.settler import InboxEntry, Poison, Settler


def append(r, lease: str, answers: str = "q_a:1:1500,q_b:0:900") -> None:
    r.xadd(
        keys.ANSWER_INBOX,
        {"l": lease, "v": "v", "w": "w1", "c": "c", "t": "1700000000.5", "a": answers},
    )


def test_entries_are_parsed_applied_once_and_deleted():
    r = fakeredis.FakeRedis()
    seen: list[InboxEntry] = []
    settled: list[set[str]] = []
    settler = Settler(r, seen.append, on_settled=settled.append)
    append(r, "l_1")
    append(r, "l_2", "q_c:1:3")
    assert settler.settle_pending() == 2
    assert [e.lease_id for e in seen] == ["l_1", "l_2"]
    assert seen[0].answers == (("q_a", True, 1500), ("q_b", False, 900))
    assert seen[0].worker == "v:w1" and seen[0].at == 1700000000.5
    assert settled == [{"c"}]
    assert r.xlen(keys.ANSWER_INBOX) == 0 and SETTLE_BACKLOG._value.get() == 0
    assert settler.settle_pending() == 0 and len(seen) == 2


def test_a_failing_entry_is_retried_and_the_others_go_on():
    r = fakeredis.FakeRedis()
    fails = {"l_1": 2}
    done: list[str] = []

    def apply(entry: InboxEntry) -> None:
        if fails.get(entry.lease_id, 0) > 0:
            fails[entry.lease_id] -= 1
            raise ConnectionError("redis blinked")
        done.append(entry.lease_id)

    settler = Settler(r, apply)
    append(r, "l_1")
    append(r, "l_2")
    assert settler.settle_pending() == 1 and done == ["l_2"]
    assert r.xlen(keys.ANSWER_INBOX) == 1  # still there, still this consumer's
    assert settler.settle_pending() == 0  # fails once more
    assert settler.settle_pending() == 1 and done == ["l_2", "l_1"]
    assert r.xlen(keys.ANSWER_INBOX) == 0


def test_poison_and_hopeless_entries_are_dead_lettered():
    r = fakeredis.FakeRedis()

    def apply(entry: InboxEntry) -> None:
        if entry.lease_id == "l_gone":
            raise Poison("the lease's record is gone")
        if entry.lease_id == "l_bad":
            raise RuntimeError("always")

    dead_before = SETTLE_DEAD._value.get()
    settler = Settler(r, apply, max_attempts=3)
    append(r, "l_gone")
    append(r, "l_bad")
    append(r, "l_odd", "not-an-answer")  # malformed
    append(r, "l_ok")
    for _ in range(3):
        settler.settle_pending()
    assert r.xlen(keys.ANSWER_INBOX) == 0
    dead = {f[b"l"]: f[b"reason"] for _, f in r.xrange(keys.ANSWER_DEAD)}
    assert set(dead) == {b"l_gone", b"l_bad", b"l_odd"}
    assert b"gone" in dead[b"l_gone"] and b"failed 3 times" in dead[b"l_bad"]
    assert SETTLE_DEAD._value.get() == dead_before + 3
    assert r.xpending(keys.ANSWER_INBOX, keys.SETTLERS)["pending"] == 0


def test_a_new_stream_after_a_flush_gets_its_group_again():
    r = fakeredis.FakeRedis()
    done: list[str] = []
    settler = Settler(r, lambda e: done.append(e.lease_id))
    append(r, "l_1")
    assert settler.settle_pending() == 1
    r.flushall()  # Redis lost everything (no persistence)
    append(r, "l_2")
    settler.settle_pending()  # finds no group: makes it (from the stream's start)
    settler.settle_pending()
    assert done == ["l_1", "l_2"]
