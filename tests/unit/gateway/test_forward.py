"""The gateway's calls to search (maskprop_gateway.gateway): a backlog of decided labels larger
than one search call is sent in several calls, each acknowledged part removed from ``forward``;
a lease never asks search for more than one call may carry."""

from __future__ import annotations

import threading

import fakeredis
from maskprop_gateway.app import policy_from
from maskprop_gateway.gateway import SEARCH_MAX_ANSWERS, Gateway, P
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.settings import GatewaySettings


class RecordingSearch:
    """Accepts up to SEARCH_MAX_ANSWERS answers a call, like the search service."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, bool]]] = []

    def submit(self, answers):
        answers = list(answers)
        assert 1 <= len(answers) <= SEARCH_MAX_ANSWERS
        self.calls.append(answers)
        return len(answers), 0, 0

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
    r, search, gw = gateway(0.0)
    n = 2 * SEARCH_MAX_ANSWERS + 345  # e.g. what piled up while search was down
    r.hset(f"{P}forward", mapping={f"c:0:{i}:{i}": f"{i % 2}:0" for i in range(n)})
    assert gw.retry_forward() == n
    assert [len(c) for c in search.calls] == [SEARCH_MAX_ANSWERS, SEARCH_MAX_ANSWERS, 345]
    sent = dict(a for c in search.calls for a in c)
    assert sent == {f"c:0:{i}:{i}": bool(i % 2) for i in range(n)}
    assert r.hlen(f"{P}forward") == 0


def test_the_forwarder_sends_what_requests_queued_and_drains_on_stop():
    r, search, gw = gateway(0.05)
    stop = threading.Event()
    thread = threading.Thread(target=gw.run_forwarder, args=(stop,))
    thread.start()
    qids = [f"c:1:{i}:{i}" for i in range(1500)]
    r.hset(f"{P}forward", mapping={q: "1:0" for q in qids})
    for lo in range(0, 1500, 100):  # fifteen requests' labels
        assert gw._forward(qids[lo : lo + 100]) == 100
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert sorted(q for c in search.calls for q, _ in c) == sorted(qids)
    assert len(search.calls) < 15  # batched, at most 1000 a call
    assert r.hlen(f"{P}forward") == 0


def test_a_large_lease_asks_search_for_at_most_one_call():
    _, search, gw = gateway(0.0)
    assert gw._take("c", "v:w", 900, expires=2e9) == []  # 2 x 900 would be refused
    assert search.leased == SEARCH_MAX_ANSWERS
