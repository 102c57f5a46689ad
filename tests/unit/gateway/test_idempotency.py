"""Idempotency-Key under a crash (issue #18): a running key is a short lease a retry takes
over once it lapses, and the re-run applies the dead request's answers exactly once."""

from __future__ import annotations

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maskprop_gateway import keys, views
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.idempotency import Held, IdempotencyConflict, IdempotencyStore, Stored
from maskprop_gateway.qc_rules import QualityPolicy
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.search_client import Submitted
from maskprop_gateway.settings import GatewaySettings


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class Search:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []

    def submit(self, answers, top_ups=None, owner=""):
        answers = list(answers)
        self.sent += answers
        return Submitted(len(answers), 0, 0, [])

    def lease(self, campaign, n, owner):
        return [], False


class Killed(BaseException):
    """The process dies here: no except/finally of the request's own code runs usefully."""


def store(clock: Clock) -> IdempotencyStore:
    return IdempotencyStore(fakeredis.FakeRedis(), running_lease_s=10.0, clock=clock)


def test_replay_conflict_and_busy():
    clock = Clock()
    s = store(clock)
    held = s.begin("v", "k1", "fp")
    assert isinstance(held, Held) and not held.recovering
    with pytest.raises(IdempotencyConflict) as busy:
        s.begin("v", "k1", "fp")
    assert busy.value.status == 409
    with pytest.raises(IdempotencyConflict) as other:
        s.begin("v", "k1", "fp2")
    assert other.value.status == 422
    assert s.finish("v", "k1", "fp", 200, {"a": 1.5, "b": "x"}, held.owner)
    clock.t += 3600  # long after: still the same response
    assert s.begin("v", "k1", "fp") == Stored(200, {"a": 1.5, "b": "x"})
    assert isinstance(s.begin("w", "k1", "fp"), Held)  # keys are per vendor


def test_a_lapsed_running_key_is_taken_over_and_the_dead_owner_cannot_write():
    clock = Clock()
    s = store(clock)
    dead = s.begin("v", "k", "fp")
    assert isinstance(dead, Held)
    clock.t += 9.9
    with pytest.raises(IdempotencyConflict):
        s.begin("v", "k", "fp")
    clock.t += 0.2
    retry = s.begin("v", "k", "fp")
    assert isinstance(retry, Held) and retry.recovering
    # the first request, had it only been slow, finds its key taken and writes nothing
    assert not s.finish("v", "k", "fp", 200, {"stale": True}, dead.owner)
    assert not s.renew("v", "k", dead.owner)
    s.abandon("v", "k", dead.owner)
    assert s.finish("v", "k", "fp", 200, {"ok": True}, retry.owner)
    assert s.begin("v", "k", "fp") == Stored(200, {"ok": True})


def test_renewal_keeps_a_slow_request_its_key():
    clock = Clock()
    s = store(clock)
    held = s.begin("v", "k", "fp")
    assert isinstance(held, Held)
    for _ in range(5):  # a request running 5 x 8 s, renewed in between
        clock.t += 8
        assert s.renew("v", "k", held.owner)
        with pytest.raises(IdempotencyConflict):
            s.begin("v", "k", "fp")


def test_a_record_from_before_the_lease_field_is_taken_over():
    clock = Clock()
    s = store(clock)
    s.r.set(keys.idempotency("v", "old"), '{"fp": "fp", "state": "running"}', ex=86400)
    held = s.begin("v", "old", "fp")
    assert isinstance(held, Held) and held.recovering


def world(n_questions: int, clock: Clock):
    r = fakeredis.FakeRedis()
    settings = GatewaySettings(key_pepper="p" * 20, forward_linger_s=0)
    search = Search()
    qc = QualityControl(r, QualityPolicy(qualification_size=0, gold_share=0.0), clock=clock)
    gw = Gateway(r, search, qc, settings, clock=clock)
    qids = [f"c:0:{i}:{i}" for i in range(n_questions)]
    gw.pool.add("c", {q: views.render("cat", "i.png", 4, 4, "0g0") for q in qids}, clock())
    return r, search, gw


def replica(gw: Gateway, clock: Clock) -> Gateway:
    """Another gateway process on the same Redis (its own settler consumer), which takes
    over what a dead one left at once (``settle_reclaim_s`` 0)."""
    settings = gw.settings.model_copy(update={"settle_reclaim_s": 0.0})
    return Gateway(gw.r, gw.search, gw.qc, settings, clock=clock)


#: Where a process dies: on the request path once the answers are marked (before it could
#: answer), or in its settler part-way through applying them (the entry stays unacknowledged).
DEATHS = {
    "after_mark": lambda gw: (gw.qc, "status"),
    "before_votes": lambda gw: (gw.qc, "cast_votes"),
    "after_votes": lambda gw: (gw.pool, "settle"),
    "after_settle": lambda gw: (gw.forwarder, "forward"),
}


def dies(gw: Gateway, die_at: str, then: object) -> None:
    """Run ``then()`` with ``gw``'s process dying at ``die_at``."""
    owner, name = DEATHS[die_at](gw)
    real = getattr(owner, name)

    def die(*a, **k):
        if die_at == "after_settle":
            real(*a, **k)  # the labels are in the outbox, not yet sent
        raise Killed

    setattr(owner, name, die)
    try:
        with pytest.raises(Killed):
            then()  # type: ignore[operator]
    finally:
        setattr(owner, name, real)


@settings(max_examples=12, deadline=None)
@given(
    labels=st.lists(st.booleans(), min_size=1, max_size=12),
    die_at=st.sampled_from(sorted(DEATHS)),
)
def test_death_between_begin_and_completion_then_retry_applies_answers_exactly_once(labels, die_at):
    clock = Clock()
    _, search, gw = world(len(labels), clock)
    offer = gw.create_lease("v", "w1", "c", len(labels), refill=False)
    assert len(offer.questions) == len(labels)
    answers = [(oid, lab, 1500) for (oid, _), lab in zip(offer.questions, labels, strict=True)]
    truth = {gw.lease("v", offer.lease_id)["refs"][oid][1]: lab for oid, lab, _ in answers}
    idem = gw.idempotency
    fp = idem.fingerprint([list(a) for a in answers])

    # the first request: holds the key, then its process dies part-way (on the request path,
    # or in the settler applying what the request marked, before the key was finished)
    first = idem.begin("v", "key-1", fp)
    assert isinstance(first, Held)

    def request_then_settle() -> None:
        gw.submit("v", offer.lease_id, "w1", answers, request_key="key-1")
        gw.settle_pending()

    dies(gw, die_at, request_then_settle)
    assert search.sent == [] or die_at == "after_settle"

    # a retry at once is told to wait; once the lease lapses it takes the key over, on
    # another gateway process
    other = replica(gw, clock)
    with pytest.raises(IdempotencyConflict):
        idem.begin("v", "key-1", fp)
    clock.t += idem.running_lease_s + 0.1
    retry = idem.begin("v", "key-1", fp)
    assert isinstance(retry, Held) and retry.recovering
    out = other.submit("v", offer.lease_id, "w1", answers, request_key="key-1")
    assert idem.finish("v", "key-1", fp, 200, out, retry.owner)
    assert out["accepted"] == len(labels) and out["duplicates"] == 0
    # the other process's settler applies what the dead one marked (or took and dropped)
    other.settle_pending()

    # exactly once: every question decided with the worker's label and sent to search once
    assert gw.forwarder.outbox.pending() == 0 and other.settler.backlog() == 0
    assert sorted(search.sent) == sorted(truth.items())
    assert gw.answered_count(offer.lease_id) == len(labels)
    # a further retry replays the stored response
    assert idem.begin("v", "key-1", fp) == Stored(200, out)
    # and a plain duplicate request changes nothing, nor does settling again anywhere
    again = other.submit("v", offer.lease_id, "w1", answers)
    assert again["accepted"] == 0 and again["duplicates"] == len(labels)
    other.settle_pending()
    gw.settle_pending()
    assert sorted(search.sent) == sorted(truth.items())


@pytest.mark.parametrize("die_at", sorted(DEATHS))
def test_a_plain_retry_without_a_key_also_completes_a_dead_request(die_at):
    """The annotator page's route has no Idempotency-Key: after the gateway died between
    marking the answers and applying them, a worker's retry is told they are in, and another
    process's settler applies them, once."""
    clock = Clock()
    _, search, gw = world(6, clock)
    offer = gw.create_lease("v", "w1", "c", 6, refill=False)
    answers = [(oid, i % 2 == 0, 1500) for i, (oid, _) in enumerate(offer.questions)]
    refs = gw.lease("v", offer.lease_id)["refs"]
    truth = {refs[oid][1]: lab for oid, lab, _ in answers}

    def request_then_settle() -> None:
        gw.submit("v", offer.lease_id, "w1", answers)
        gw.settle_pending()

    dies(gw, die_at, request_then_settle)
    other = replica(gw, clock)
    out = other.submit("v", offer.lease_id, "w1", answers)
    assert out["accepted"] == 0 and out["duplicates"] == 6  # as answered before
    other.settle_pending()
    assert sorted(search.sent) == sorted(truth.items())
    other.submit("v", offer.lease_id, "w1", [(oid, not lab, ms) for oid, lab, ms in answers])
    other.settle_pending()
    assert sorted(search.sent) == sorted(truth.items())  # a changed retry changes nothing


def test_answers_marked_by_a_gateway_killed_before_its_settler_ran_are_applied_once():
    """Issue #18, kill -9 between the mark and the settler: one process marks answers (the
    inbox entry is written in the same step) and dies before its settler reads them; another
    has its settler read them after the first took them and died too.  A third process's
    settler takes both over after the idle time and applies every answer exactly once: votes,
    labels, the gold score and its counters."""
    clock = Clock()
    r = fakeredis.FakeRedis()
    settings = GatewaySettings(key_pepper="p" * 20, forward_linger_s=0, settle_reclaim_s=30)
    search = Search()
    policy = QualityPolicy(qualification_size=0, gold_share=0.5, gold_exposure=5)
    qc = QualityControl(r, policy, clock=clock)
    from maskprop_gateway.qc_rules import GoldItem

    qc.import_gold(GoldItem(f"g{i}", "c", "cat", "i.png", 4, 4, b"0g0", True) for i in range(9))
    dead_a = Gateway(r, search, qc, settings, clock=clock)
    dead_b = Gateway(r, search, qc, settings, clock=clock)
    qids = [f"c:0:{i}:{i}" for i in range(8)]
    dead_a.pool.add("c", {q: views.render("cat", "i.png", 4, 4, "0g0") for q in qids}, clock())
    truth, golds, marked = {}, 0, 0
    for w, gw in (("w1", dead_a), ("w2", dead_b)):
        offer = gw.create_lease("v", w, "c", 8, refill=False)
        refs = gw.lease("v", offer.lease_id)["refs"]
        answers = [(oid, w == "w1", 1500) for oid, _ in offer.questions]
        out = gw.submit("v", offer.lease_id, w, answers)
        assert out["accepted"] == len(answers)
        marked += len(answers)
        truth.update({ref: w == "w1" for code, ref in refs.values() if code == "r"})
        golds += sum(code == "g" for code, _ in refs.values())
    assert golds and truth
    # dead_b's settler took the inbox's entries (its consumer holds them) and died unapplied
    dead_b.settler.ensure_group()
    taken = r.xreadgroup(keys.SETTLERS, dead_b.settler.consumer, {keys.ANSWER_INBOX: ">"})
    assert len(taken[0][1]) == 2
    assert search.sent == [] and not r.hgetall(keys.votes(qids[0]))

    survivor = Gateway(r, search, qc, settings, clock=clock)
    assert survivor.settle_pending() == 0  # not idle long enough: the holder may be alive
    survivor.settler.reclaim_idle_s = 0.0  # (as if settle_reclaim_s had passed)
    assert survivor.settle_pending() == 2
    assert sorted(search.sent) == sorted(truth.items())
    assert survivor.settler.backlog() == 0
    assert r.xpending(keys.ANSWER_INBOX, keys.SETTLERS)["pending"] == 0
    stats = survivor.leases.stats("c")
    assert stats == {"answers": marked, "gold_answers": golds}
    gold_total = sum(int(qc.state(f"v:{w}").gold_answers) for w in ("w1", "w2"))
    assert gold_total == golds
    # applying them again (a settler that died after applying, before acknowledging) is a no-op
    for gw in (dead_a, dead_b, survivor):
        assert gw.settle_pending() == 0
    assert sorted(search.sent) == sorted(truth.items())
    assert survivor.leases.stats("c") == stats


def test_two_replicas_expiring_leases_take_each_lease_once():
    clock = Clock()
    r, _, gw = world(4, clock)
    other = Gateway(r, Search(), gw.qc, gw.settings, clock=clock)  # a second replica
    for w in ("w1", "w2"):
        gw.create_lease("v", w, "c", 2, refill=False)
    clock.t += gw.settings.lease_ttl_s + 1
    first = gw.leases.take_expired(clock())
    second = other.leases.take_expired(clock())
    taken = [next(first)[0], next(second)[0], *[x[0] for x in first], *[x[0] for x in second]]
    assert len(taken) == len(set(taken)) == 2


def test_the_renewal_thread_keeps_a_running_request_its_key_and_stops_after():
    import time

    s = IdempotencyStore(fakeredis.FakeRedis(), running_lease_s=1.0)
    held = s.begin("v", "k", "fp")
    assert isinstance(held, Held)
    with s.holding("v", "k", held.owner):
        for _ in range(7):  # 2.1 s: two leases long
            time.sleep(0.3)
            with pytest.raises(IdempotencyConflict):
                s.begin("v", "k", "fp")
    time.sleep(1.2)  # no longer renewed: a retry takes it over
    retry = s.begin("v", "k", "fp")
    assert isinstance(retry, Held) and retry.recovering


def test_an_expiry_cut_off_by_a_crash_runs_again_and_queues_one_callback():
    """Issue #18: a gateway killed between taking a lease off the expiry index and queuing its
    ``lease.expired`` lost the callback for good (and left its questions held).  The claim
    lapses, another pass completes the expiry, and the callback is queued exactly once."""
    from maskprop_gateway.auth import KeyStore
    from maskprop_gateway.leases import EXPIRY_CLAIM_S
    from maskprop_gateway.webhooks import Webhooks, set_webhook

    clock = Clock()
    r, _, gw = world(3, clock)
    KeyStore(r, "p" * 20).create("v", "Vendor")
    set_webhook("v", "https://hooks.example.com/mp", redis=r)
    hooks = Webhooks(r, clock=clock, threads=1, post_fn=lambda *a, **k: 204)
    offer = gw.create_lease("v", "w1", "c", 3, refill=False)
    assert gw.create_lease("v", "w2", "c", 3, refill=False).questions == []  # all held by w1
    clock.t += gw.settings.lease_ttl_s + 1

    dead = gw.expire_leases()  # the first pass frees the questions, then its process dies
    assert offer.lease_id in {e["lease_id"] for e in dead} and len(dead) == 2  # w1's and w2's
    assert gw.expire_leases() == []  # claimed: a second replica does not take it meanwhile
    clock.t += EXPIRY_CLAIM_S + 1
    again = gw.expire_leases()
    assert again == dead
    hooks.on_expired(again)
    hooks.on_expired(again)  # a pass that died after queuing, run once more
    gw.finish_expired(again)
    assert hooks.pending() == len(dead)  # one callback a lease
    clock.t += EXPIRY_CLAIM_S + 1
    assert gw.expire_leases() == []  # finished: never again
    assert len(gw.create_lease("v", "w3", "c", 3, refill=False).questions) == 3


def test_a_taken_over_key_counts_only_its_own_answers_and_records_each_time_once():
    """Issue #18: the re-run of a taken-over key reported as accepted every answer of the
    request, also those an earlier request without the key had applied; and the answer times
    the dead attempt marked were never recorded for QC.  Marks carry the request's key and
    the time is pushed in the step that marks, so both are exact."""
    clock = Clock()
    r, _, gw = world(6, clock)
    offer = gw.create_lease("v", "w1", "c", 6, refill=False)
    answers = [(oid, True, 1000 + i) for i, (oid, _) in enumerate(offer.questions)]
    gw.submit("v", offer.lease_id, "w1", answers[:2])  # an earlier request, no key
    # the keyed request marks all six, then dies before it answers
    dies(
        gw, "after_mark", lambda: gw.submit("v", offer.lease_id, "w1", answers, request_key="key-2")
    )
    out = gw.submit("v", offer.lease_id, "w1", answers, request_key="key-2")
    assert out["accepted"] == 4 and out["duplicates"] == 2  # what the first response said
    times = [int(t) for t in r.lrange(gw.qc.times_key("v:w1"), 0, -1)]
    assert sorted(times) == [ms for _, _, ms in answers]  # each answer's time once
    again = gw.submit("v", offer.lease_id, "w1", answers, request_key="key-3")
    assert again["accepted"] == 0 and again["duplicates"] == 6  # another key: none its own
    gw.settle_pending()
    assert gw.leases.stats("c")["answers"] == 6
