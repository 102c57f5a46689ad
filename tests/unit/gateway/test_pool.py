"""The gateway's question pool (maskprop_gateway.pool): atomic claims over Redis (fakeredis runs
the same Lua scripts)."""

from __future__ import annotations

import threading

import fakeredis
from maskprop_gateway import keys
from maskprop_gateway.pool import QuestionPool

NOW = 1_000_000.0
C = "c1"


def filled(n: int) -> tuple[fakeredis.FakeRedis, QuestionPool, list[str]]:
    r = fakeredis.FakeRedis()
    pool = QuestionPool(r)
    qids = [f"{C}:0:1:{i}" for i in range(n)]
    pool.add(C, {q: f'{{"i": {i}}}' for i, q in enumerate(qids)}, NOW)
    return r, pool, qids


def test_concurrent_claims_never_hand_a_question_to_two_workers():
    _, pool, qids = filled(400)
    got: dict[str, list[str]] = {}

    def lease(w: str) -> None:
        for _ in range(5):
            got.setdefault(w, []).extend(
                q for q, _ in pool.claim(C, w, 10, NOW + 60, NOW, redundancy=1)
            )

    threads = [threading.Thread(target=lease, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = [q for qs in got.values() for q in qs]
    assert len(served) == len(set(served)) == 400  # every question once, none twice
    assert set(served) == set(qids)


def test_redundancy_serves_distinct_workers_oldest_first():
    r, pool, qids = filled(3)
    a = [q for q, _ in pool.claim(C, "a", 2, NOW + 60, NOW, redundancy=2)]
    assert a == qids[:2]
    b = [q for q, _ in pool.claim(C, "b", 3, NOW + 60, NOW, redundancy=2)]
    assert b == qids  # a second slot on the first two, then the third
    assert [q for q, _ in pool.claim(C, "a", 3, NOW + 60, NOW, redundancy=2)] == [qids[2]]
    assert pool.claim(C, "c", 3, NOW + 60, NOW, redundancy=2) == []  # all slots held
    assert r.zcard(keys.ready(C)) == 0


def test_expired_holds_and_released_leases_free_the_slot():
    _, pool, qids = filled(2)
    pool.claim(C, "a", 2, NOW + 60, NOW, redundancy=1)
    assert pool.claim(C, "b", 2, NOW + 60, NOW, redundancy=1) == []
    pool.release(C, "a", [qids[1]])  # a's lease expired with qids[1] unanswered
    assert [q for q, _ in pool.claim(C, "b", 2, NOW + 60, NOW, redundancy=1)] == [qids[1]]
    # a hold past its deadline does not count even before the expiry pass removes it
    pool.settle("", {qids[0]: (1, None)})  # (a sweep re-queues it)
    later = NOW + 120
    assert [q for q, _ in pool.claim(C, "c", 2, later + 60, later, redundancy=1)] == [qids[0]]
    assert pool.claim(C, "a", 2, later + 60, later, redundancy=1) == []  # a saw both already


def outbox(r: fakeredis.FakeRedis) -> dict[str, str]:
    """The labels queued for search: question id -> "0"/"1"."""
    return {f[b"k"].decode(): f[b"v"].decode() for _, f in r.xrange(keys.LABEL_OUTBOX)}


def test_settle_queues_decisions_and_done_forgets_the_question():
    r, pool, qids = filled(2)
    pool.claim(C, "a", 2, NOW + 60, NOW, redundancy=1)
    # a voted on both: the first is decided, the second still misses a vote (disagreement)
    pool.settle("a", {qids[0]: (0, True), qids[1]: (1, None)})
    assert outbox(r).get(qids[0]) == "1"
    assert outbox(r).get(qids[1]) is None
    assert r.hgetall(keys.workers(qids[0])) == {b"a": b"0"}  # the hold went with the vote
    assert [q for q, _ in pool.claim(C, "b", 2, NOW + 60, NOW, redundancy=1)] == [qids[1]]
    r.hset(keys.votes(qids[0]), "a", "1:0")
    legacy = [f"{keys.ITEM}{qids[0]}:holders", f"{keys.ITEM}{qids[0]}:seen"]
    r.hset(legacy[0], "a", "1")  # keys of the layout before `:workers` (an upgrade) go too
    r.sadd(legacy[1], "a")
    pool.done([qids[0]])
    assert not r.exists(*legacy)
    assert not r.exists(keys.votes(qids[0]))
    assert r.hget(keys.WANT, qids[0]) is None
    assert r.zscore(keys.open_questions(C), qids[0]) is None
    assert pool.purge() == 1 and pool.view(C, qids[0]) is None  # keep_views_s = 0
    assert not r.exists(keys.workers(qids[0]))
    assert r.zscore(keys.open_questions(C), qids[1]) is not None


def test_a_decided_questions_view_stays_while_a_lease_may_show_it():
    """The question pool holds the one copy of a real question's view (a lease keeps none):
    after search acknowledged the label it stays ``keep_views_s`` more, then goes; a question
    search sent again meanwhile keeps its view."""
    r = fakeredis.FakeRedis()
    now = [NOW]
    pool = QuestionPool(r, keep_views_s=660, clock=lambda: now[0])
    qids = [f"{C}:0:1:{i}" for i in range(3)]
    pool.add(C, {q: f'{{"i": {i}}}' for i, q in enumerate(qids)}, NOW)
    pool.done(qids[:2])
    now[0] += 600
    assert pool.purge() == 0 and pool.view(C, qids[0]) == '{"i": 0}'
    pool.add(C, {qids[1]: '{"i": 1}'}, now[0])  # sent again: open once more
    now[0] += 61
    assert pool.purge() == 2
    assert pool.view(C, qids[0]) is None
    assert pool.view(C, qids[1]) == '{"i": 1}' and pool.view(C, qids[2]) == '{"i": 2}'
    assert r.zcard(keys.retired(C)) == 0


def test_a_decided_question_is_queued_for_search_once():
    r, pool, qids = filled(1)
    pool.claim(C, "a", 1, NOW + 60, NOW, redundancy=1)
    pool.settle("a", {qids[0]: (0, True)})
    pool.settle("", {qids[0]: (0, True)})  # a sweep re-tallies it before search has it
    assert r.xlen(keys.LABEL_OUTBOX) == 1
    pool.done(qids)
    pool.settle("", {qids[0]: (0, False)})  # acknowledged: no longer in the pool
    assert r.xlen(keys.LABEL_OUTBOX) == 1


def test_unheld_lists_what_a_sweep_must_retally():
    _, pool, qids = filled(3)
    pool.claim(C, "a", 1, NOW + 60, NOW, redundancy=1)  # qids[0] held
    pool.claim(C, "b", 1, NOW + 60, NOW, redundancy=1)  # qids[1] held
    pool.settle("b", {qids[1]: (0, True)})  # decided, out of ready, unheld
    assert [q for chunk in pool.unheld(C, NOW) for q in chunk] == [qids[1]]
    assert pool.campaigns() == [C]


def test_unheld_reads_open_a_chunk_at_a_time_and_ignores_lapsed_holds():
    """The sweep's one Lua call a chunk: every chunk of ``open`` is read, questions in
    ``ready`` are never listed, and a hold past its deadline no longer holds."""
    _, pool, _ = filled(7)
    got = pool.claim(C, "a", 5, NOW + 60, NOW, redundancy=1)
    held = [q for q, _ in got]
    pool.settle("a", {held[0]: (0, True), held[1]: (0, False)})  # decided: unheld
    for chunk in (1, 2, 3, 500):
        found = [q for c in pool.unheld(C, NOW, chunk=chunk) for q in c]
        assert found == [held[0], held[1]]  # held[2:] still held, qids[5:] ready
        later = [q for c in pool.unheld(C, NOW + 61, chunk=chunk) for q in c]
        assert later == held  # the other holds lapsed
