"""The gateway's calls to search (maskprop_gateway.forwarder): a backlog of decided labels larger
than one search call is sent in several calls, each acknowledged part removed from the label
outbox; a lease never asks search for more than one call may carry."""

from __future__ import annotations

import fakeredis
from maskprop_gateway import keys, views
from maskprop_gateway.app import policy_from
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.qc_rules import QualityPolicy
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.search_client import SearchNotFound, SearchUnavailable, Submitted
from maskprop_gateway.settings import GatewaySettings
from maskprop_gateway.topups import SEARCH_MAX_ANSWERS

from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2


class RecordingSearch:
    """Accepts up to SEARCH_MAX_ANSWERS answers a call, like the search service."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, bool]]] = []

    def submit(self, answers, top_ups=None, owner=""):
        answers = list(answers)
        assert 1 <= len(answers) <= SEARCH_MAX_ANSWERS
        self.calls.append(answers)
        return Submitted(len(answers), 0, 0, [])

    def lease(self, campaign, n, owner):
        assert 1 <= n <= SEARCH_MAX_ANSWERS  # search refuses larger leases
        self.leased = n
        return [], False


def gateway(linger: float) -> tuple[fakeredis.FakeRedis, RecordingSearch, Gateway]:
    r = fakeredis.FakeRedis()
    settings = GatewaySettings(key_pepper="p" * 20, forward_linger_s=linger)
    search = RecordingSearch()
    return r, search, Gateway(r, search, QualityControl(r, policy_from(settings)), settings)


def test_a_stale_backlog_over_one_call_is_sent_in_chunks():
    _, search, gw = gateway(0.0)
    n = 2 * SEARCH_MAX_ANSWERS + 345  # e.g. what piled up while search was down
    gw.forwarder.outbox.append((f"c:0:{i}:{i}", f"{i % 2}") for i in range(n))
    assert gw.forwarder.retry() == n
    assert [len(c) for c in search.calls] == [SEARCH_MAX_ANSWERS, SEARCH_MAX_ANSWERS, 345]
    sent = dict(a for c in search.calls for a in c)
    assert sent == {f"c:0:{i}:{i}": bool(i % 2) for i in range(n)}
    assert gw.forwarder.outbox.pending() == 0


def test_the_forwarder_sends_what_requests_queued_and_drains_on_stop():
    _, search, gw = gateway(0.05)
    halt = gw.start_forwarder()
    qids = [f"c:1:{i}:{i}" for i in range(1500)]
    for lo in range(0, 1500, 100):  # fifteen requests' labels
        gw.forwarder.outbox.append((q, "1") for q in qids[lo : lo + 100])
        assert gw.forwarder.forward(100) == 100
    halt()
    assert sorted(q for c in search.calls for q, _ in c) == sorted(qids)
    assert len(search.calls) < 15  # batched, at most 1000 a call
    assert gw.forwarder.outbox.pending() == 0


def test_a_large_lease_asks_search_for_at_most_one_call():
    _, search, gw = gateway(0.0)
    assert gw._take("c", "v:w", 900, expires=2e9) == []  # 2 x 900 would be refused
    assert search.leased == SEARCH_MAX_ANSWERS


class Down(RecordingSearch):
    down = True

    def submit(self, answers, top_ups=None, owner=""):
        if self.down:
            raise SearchUnavailable("search is down")
        return super().submit(answers, top_ups, owner)


def test_inline_a_request_sends_its_labels_and_a_failed_send_is_retried():
    r = fakeredis.FakeRedis()
    settings = GatewaySettings(key_pepper="p" * 20, forward_linger_s=0)
    qc = QualityControl(r, QualityPolicy(qualification_size=0, gold_share=0.0))
    search = Down()
    gw = Gateway(r, search, qc, settings)
    qids = ["c:0:1:1", "c:0:2:2"]
    gw.pool.add("c", {q: views.render("cat", "i.png", 4, 4, "0g0") for q in qids}, 1.0)
    offer = gw.create_lease("v", "w1", "c", 1, refill=False)
    gw.submit("v", offer.lease_id, "w1", [(offer.questions[0][0], True, 1500)])
    assert gw.forwarder.outbox.pending() == 0  # applied off the request path
    assert gw.settle_pending() == 1 and gw.forwarder.outbox.pending() == 1
    search.down = False
    offer = gw.create_lease("v", "w2", "c", 1, refill=False)
    gw.submit("v", offer.lease_id, "w2", [(offer.questions[0][0], False, 1500)])
    gw.settle_pending()
    # the next answers' send carries the label the first one could not send
    assert gw.forwarder.outbox.pending() == 0
    assert search.calls == [[(qids[0], True), (qids[1], False)]]
    assert gw.retry_forward() == 0  # nothing left to retry
    assert gw.pool.ready_count("c") == 0 and not r.exists(keys.open_questions("c"))


class RefusingSearch(RecordingSearch):
    """Refuses a whole call when any answer names a campaign it does not know, as search does."""

    def submit(self, answers, top_ups=None, owner=""):
        answers = list(answers)
        if any(q.startswith("gone:") for q, _ in answers):
            raise SearchNotFound("campaign 'gone' has no class 0")
        return super().submit(answers, top_ups, owner)


def test_a_label_search_refuses_is_dead_lettered_and_the_labels_behind_it_are_delivered():
    r = fakeredis.FakeRedis()
    settings = GatewaySettings(key_pepper="p" * 20, forward_linger_s=0.0)
    search = RefusingSearch()
    gw = Gateway(r, search, QualityControl(r, policy_from(settings)), settings)
    poison = "gone:0:1:1"
    good = [f"c:0:{i}:{i}" for i in range(40)]
    gw.forwarder.outbox.append([(poison, "1"), *((q, "1") for q in good)])
    gw.forwarder.retry()
    assert gw.forwarder.outbox.pending() == 0
    assert {q for c in search.calls for q, _ in c} == set(good)
    dead = r.xrange(keys.LABEL_DEAD)
    assert [f[b"k"] for _id, f in dead] == [poison.encode()]
    assert b"has no class" in dead[0][1][b"reason"]
    # and the queue keeps moving for labels appended afterwards
    gw.forwarder.outbox.append([("c:0:99:99", "0")])
    assert gw.forwarder.retry() == 1
    assert search.calls[-1] == [("c:0:99:99", False)]


class ToppingUpSearch(RecordingSearch):
    """Answers each top-up with a question of its campaign, as search leases them."""

    def submit(self, answers, top_ups=None, owner=""):
        done = super().submit(answers, top_ups, owner)
        self.top_ups = dict(top_ups or {})
        questions = [
            search_pb2.Question(
                question_id=f"{c}:0:9:9{i}",
                campaign=c,
                class_name="cat",
                image_file="i.png",
                rle=common_pb2.RleMask(height=2, width=2, counts=b"4"),
            )
            for c in self.top_ups
            for i in range(3)
        ]
        return done._replace(questions=questions)


def test_answers_carry_top_ups_for_short_campaigns_and_their_questions_join_the_pool():
    r = fakeredis.FakeRedis()
    settings = GatewaySettings(key_pepper="p" * 20, refill_questions=2)
    search = ToppingUpSearch()
    gw = Gateway(r, search, QualityControl(r, policy_from(settings)), settings)
    gw.pool.add(
        "full", {f"full:0:{i}:{i}": views.render("cat", "i.png", 2, 2, "4") for i in (1, 2)}, 0
    )
    gw.forwarder.outbox.append([("short:0:1:1", "1"), ("full:0:3:3", "0")])
    assert gw.forwarder.retry() == 2
    assert search.top_ups == {"short": 2}  # "full" holds 2 ready: not short
    assert gw.pool.ready_count("short") == 3


def test_questions_that_fail_to_join_the_pool_do_not_send_the_answers_again(caplog):
    r = fakeredis.FakeRedis()
    settings = GatewaySettings(key_pepper="p" * 20)
    search = ToppingUpSearch()
    gw = Gateway(r, search, QualityControl(r, policy_from(settings)), settings)

    def broken(*_a, **_k):
        raise ConnectionError("Redis went away")

    gw.pool.add = broken  # type: ignore[method-assign]
    gw.forwarder.outbox.append([("c:0:1:1", "1")])
    assert gw.forwarder.retry() == 1
    assert gw.forwarder.outbox.pending() == 0 and len(search.calls) == 1
    assert "go back to its pool when their lease expires" in caplog.text
