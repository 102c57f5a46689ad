"""How the gateway tops up its question pool from search (maskprop_gateway.topups): one search
call at a time per campaign, large calls, early top-ups, and leases on the event loop that wait
for the questions answers in flight open instead of coming back empty."""

from __future__ import annotations

import asyncio
import threading
import time

import fakeredis
import pytest
from maskprop_gateway import keys
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.qc_rules import QualityPolicy
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.search_client import Submitted
from maskprop_gateway.settings import GatewaySettings
from maskprop_gateway.topups import SEARCH_MAX_ANSWERS
from maskprop_gateway.views import LeaseOffer

from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2

CAMPAIGN = "c"


def question(i: int) -> search_pb2.Question:
    return search_pb2.Question(
        question_id=f"{CAMPAIGN}:0:{i}:{i}",
        campaign=CAMPAIGN,
        class_name="cat",
        image_file=f"img{i}.png",
        rle=common_pb2.RleMask(height=4, width=4, counts=b"0g0"),
    )


class SlowSearch:
    """Hands out ``available`` questions, each call taking ``delay`` seconds."""

    def __init__(self, available: int, delay: float = 0.0) -> None:
        self.next = 0
        self.available = available
        self.delay = delay
        self.leases: list[int] = []
        self.submits: list[list[tuple[str, bool]]] = []
        self.top_ups: list[dict[str, int]] = []
        self.lock = threading.Lock()

    def lease(self, campaign, n, owner):
        assert 1 <= n <= SEARCH_MAX_ANSWERS
        time.sleep(self.delay)
        with self.lock:
            self.leases.append(n)
            return self._hand_out(n), False

    def _hand_out(self, n):
        k = min(n, self.available)
        out = [question(self.next + i) for i in range(k)]
        self.next += k
        self.available -= k
        return out

    def submit(self, answers, top_ups=None, owner=""):
        """Like search: the top-ups lease what the answers left available."""
        with self.lock:
            self.submits.append(list(answers))
            self.top_ups.append(dict(top_ups or {}))
            got = [q for n in (top_ups or {}).values() for q in self._hand_out(n)]
        return Submitted(len(self.submits[-1]), 0, 0, got)


def gateway(search: SlowSearch, **settings) -> Gateway:
    r = fakeredis.FakeRedis()
    gs = GatewaySettings(key_pepper="p" * 20, **settings)
    # no qualification and no hidden gold: every lease is real work
    qc = QualityControl(r, QualityPolicy(qualification_size=0, gold_share=0.0))
    return Gateway(r, search, qc, gs)


def real(lease: LeaseOffer) -> int:
    return len(lease.questions)


def test_concurrent_short_leases_share_one_search_call():
    search = SlowSearch(available=5000, delay=0.2)
    gw = gateway(search, refill_questions=500)
    leases: list[dict] = []

    def one(w: int) -> None:
        leases.append(gw.create_lease("v", f"w{w}", CAMPAIGN, 100))

    threads = [threading.Thread(target=one, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # One call for the four leases (it asks for the batch size, not each shortfall)...
    assert search.leases == [500]
    # ...and every lease is served from it; no question is handed out twice.
    assert sorted(real(x) for x in leases) == [100] * 4
    served = {q["question_id"] for x in leases for q in x.to_dict()["questions"]}
    assert len(served) == 400


def test_a_top_up_asks_for_at_least_the_batch_and_at_most_one_call():
    search = SlowSearch(available=10_000)
    gw = gateway(search, refill_questions=300)
    gw.create_lease("v", "w1", CAMPAIGN, 10)
    assert search.leases == [300]  # 2 x 10 would mean a search call every few leases
    gw.topups.refill(CAMPAIGN, 5000)
    assert search.leases[-1] == SEARCH_MAX_ANSWERS


def test_a_lease_on_the_loop_tops_up_off_the_loop_and_early():
    search = SlowSearch(available=10_000, delay=0.05)
    gw = gateway(search, refill_questions=250)

    async def main() -> list[int]:
        sizes = []
        for w in range(4):
            sizes.append(real(await gw.create_lease_on_loop("v", f"w{w}", CAMPAIGN, 100)))
            await asyncio.sleep(0.1)  # the early top-up started by the last lease lands
        return sizes

    assert asyncio.run(main()) == [100] * 4
    # 250 questions a call, started as soon as fewer than 250 are ready: only the first lease
    # had to wait for one; the second and fourth started one and took what was ready.
    assert search.leases == [250, 250, 250]


def test_an_empty_lease_waits_for_the_questions_answers_in_flight_open():
    search = SlowSearch(available=0)
    gw = gateway(search, lease_wait_s=5.0)

    async def main() -> tuple[int, float]:
        gw.forwarder._in_flight = 3  # the forwarder is sending three answers to search
        loop = asyncio.get_running_loop()

        def forwarder_done() -> None:
            time.sleep(0.3)
            search.available = 40  # the answers opened new clusters
            gw.topups.refill(CAMPAIGN, 1, fresh=True)
            gw.forwarder._in_flight = 0
            gw.topups.announce([CAMPAIGN])

        t0 = time.monotonic()
        waiting = loop.run_in_executor(None, forwarder_done)
        lease = await gw.create_lease_on_loop("v", "w1", CAMPAIGN, 100)
        await waiting
        return real(lease), time.monotonic() - t0

    n, waited = asyncio.run(main())
    assert n == 40
    assert 0.25 < waited < 3.0  # woken by the forwarder, not by the 5 s limit


def test_with_nothing_in_flight_an_empty_lease_answers_at_once():
    search = SlowSearch(available=0)
    gw = gateway(search, lease_wait_s=5.0)

    async def main() -> tuple[int, float]:
        t0 = time.monotonic()
        lease = await gw.create_lease_on_loop("v", "w1", CAMPAIGN, 100)
        return real(lease), time.monotonic() - t0

    n, waited = asyncio.run(main())
    assert n == 0 and waited < 1.0  # nothing can open new questions: no point waiting


def test_the_forwarder_tops_up_once_search_has_the_answers():
    search = SlowSearch(available=1000)
    gw = gateway(search, forward_linger_s=0.01, refill_questions=200)
    lease = gw.create_lease("v", "w1", CAMPAIGN, 50).to_dict()
    assert search.leases == [200]
    halt = gw.start_forwarder()
    halt_settler = gw.start_settler()
    try:
        gw.submit(
            "v",
            lease["lease_id"],
            "w1",
            [(q["question_id"], True, 1500) for q in lease["questions"]],
        )
        deadline = time.monotonic() + 5
        while gw.pool.ready_count(CAMPAIGN) < 350 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        halt_settler()
        halt()
    assert [len(c) for c in search.submits] == [50]
    # 150 were left ready, fewer than a batch: the forwarder asked for new questions in the
    # call that delivered the answers, which may have opened new clusters; no lease of its own
    assert search.top_ups == [{CAMPAIGN: 200}]
    assert search.leases == [200]
    assert gw.pool.ready_count(CAMPAIGN) == 150 + 200


def test_an_empty_lease_waits_for_answers_the_settler_has_not_applied_yet():
    """Answers are applied off the request path (issue #18): between a request marking them
    and the settler deciding their labels, they are in flight too, so a lease that finds the
    pool empty meanwhile waits for the questions they open rather than come back empty."""
    search = SlowSearch(available=5)
    gw = gateway(search, forward_linger_s=0.01, refill_questions=5, lease_wait_s=5.0)
    first = gw.create_lease("v", "w1", CAMPAIGN, 5).to_dict()
    assert len(first["questions"]) == 5 and search.available == 0
    answers = [(q["question_id"], True, 1500) for q in first["questions"]]

    async def main() -> int:
        gw.submit("v", first["lease_id"], "w1", answers)  # marked, not applied
        assert gw.answers_in_flight()
        search.available = 40  # what the answers will open once search has them
        loop = asyncio.get_running_loop()

        def settle_later() -> None:
            time.sleep(0.3)
            gw.settle_pending()  # decides the labels: the forwarder sends them, then tops up

        waiting = loop.run_in_executor(None, settle_later)
        lease = await gw.create_lease_on_loop("v", "w2", CAMPAIGN, 100)
        await waiting
        return real(lease)

    halt = gw.start_forwarder()
    try:
        n = asyncio.run(main())
    finally:
        halt()
    assert n == 40  # it waited: the pool was empty when it asked
    assert [len(c) for c in search.submits] == [5]


def test_with_a_background_process_an_empty_lease_waits_for_its_arrivals():
    """MASKPROP_BACKGROUND=process: the settler and forwarder run in another process (here
    another Gateway on the same Redis, as background.py builds it) and share nothing with the
    HTTP process but Redis: answers in flight are the inbox's and outbox's lengths, and the
    leases waiting for questions are woken by its message on keys.ARRIVALS."""
    from maskprop_gateway import background

    search = SlowSearch(available=5)
    http = gateway(
        search,
        background="process",
        redis_url="redis://127.0.0.1:1/0",  # named, not used: both share one fakeredis here
        forward_linger_s=0.01,
        refill_questions=5,
        lease_wait_s=5.0,
    )
    bg = Gateway(http.r, search, http.qc, http.settings)
    bg.topups.broadcast = lambda cs: http.r.publish(keys.ARRIVALS, "\n".join(cs))
    first = http.create_lease("v", "w1", CAMPAIGN, 5).to_dict()
    assert len(first["questions"]) == 5 and search.available == 0
    assert not http.answers_in_flight()  # nothing marked, nothing queued
    http.submit(
        "v", first["lease_id"], "w1", [(q["question_id"], True, 1500) for q in first["questions"]]
    )
    assert http.answers_in_flight()  # marked in the inbox, not applied by anyone yet
    search.available = 40  # what the answers will open once search has them
    heard = threading.Event()
    background.listen(http.r, http.topups, heard)
    halts: list = []

    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()

        def start_later() -> None:
            time.sleep(0.3)
            halts.append(bg.start_forwarder())
            halts.insert(0, bg.settler.start(idle_s=0.0, wait_s=background.WAIT_S))

        t0 = time.monotonic()
        waiting = loop.run_in_executor(None, start_later)
        lease = await http.create_lease_on_loop("v", "w2", CAMPAIGN, 100)
        await waiting
        return real(lease), time.monotonic() - t0

    try:
        n, waited = asyncio.run(main())
    finally:
        for halt in halts:
            halt()
        heard.set()
    assert n == 40  # the background applied and forwarded the answers, then topped up
    assert 0.25 < waited < 3.0  # woken by the background's message, not by the 5 s limit
    assert [len(c) for c in search.submits] == [5]
    assert not http.answers_in_flight()


def test_a_background_process_needs_redis_over_the_network(monkeypatch):
    monkeypatch.delenv("MASKPROP_REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="MASKPROP_BACKGROUND=process needs MASKPROP_REDIS_URL"):
        GatewaySettings(key_pepper="p" * 20, background="process")
