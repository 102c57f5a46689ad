"""Issue #18, the timing class: can one answer's latency tell hidden gold from a real question?

``Gateway.submit`` on the real Redis (database 7 of REDIS_URL's server, flushed first), one
answer a request, relay forwarding (the service's default), a stub search; 300 workers x
leases of 20 with 30 % gold (more gold samples than production's 5 %).  Prints per kind the
p50/mean/p99 over every request but the first 10 % (warm-up), the p50 ratio, and the AUC
P(real > gold) of a single answer's time: 0.5 means one answer's time tells nothing.  A worker
gets one timing sample per question (a retry is a duplicate and takes another path), so the
AUC bounds what a bot could exploit.  It also prints the AUC of a request's time against the
kind of the worker's previous answer ("lag 1"): the settler applies an answer after its
request, so its kind-dependent work could at most slow the worker's next request.
``tests/unit/gateway/test_side_channels.py`` checks the deterministic part: byte-identical
Redis commands for both kinds on the request path.

The request path only marks answers; the settler (``Gateway.settle_pending``) applies them.
Direct mode runs it after every request, outside the timed call, as the settler thread would,
and prints its cost per answer by kind (the work that moved off the request path).  ``http``
times whole ``POST /v1/answers`` requests through the app (FastAPI's TestClient, auth and rate
limit included) with the app's own settler thread running, and prints its mean delay from an
answer's mark to its application.

    source .cache/dev-infra/env && .venv/bin/python benchmarks/bench_gold_timing.py
    .venv/bin/python benchmarks/bench_gold_timing.py http   # whole requests through the app
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import redis
from fastapi.testclient import TestClient
from maskprop_gateway import views
from maskprop_gateway.app import create_app
from maskprop_gateway.auth import KeyStore
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.qc_rules import GoldItem, QualityPolicy
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.settings import GatewaySettings
from scipy.stats import mannwhitneyu

WORKERS, LEASE, QUESTIONS, GOLD = 300, 20, 6000, 4000


class StubSearch:
    def submit(self, answers):
        answers = list(answers)
        return len(answers), 0, 0

    def lease(self, campaign, n, owner):
        return [], False

    def progress(self, campaign):
        raise NotImplementedError

    def close(self) -> None:
        pass


def fresh_redis() -> redis.Redis:
    server = os.environ.get("REDIS_URL", "redis://127.0.0.1:6390/0").rsplit("/", 1)[0]
    r = redis.Redis.from_url(server + "/7")
    r.flushdb()
    return r


def fill(gw: Gateway) -> None:
    view = views.render("cat", "i.png", 4, 4, "0g0")
    gw.pool.add("c", {f"c:0:{i}:{i}": view for i in range(QUESTIONS)}, time.time())
    gw.qc.import_gold(
        GoldItem(f"g{i}", "c", "cat", "i.png", 4, 4, b"0g0", answer=True) for i in range(GOLD)
    )


Samples = list[tuple[str, str, float]]  # (kind, kind of the worker's previous answer, ms)


def over_http() -> tuple[Samples, Samples]:
    """Milliseconds of whole answer requests by kind, through the app (no settler samples:
    the app's thread applies the answers)."""
    r = fresh_redis()
    settings = GatewaySettings(
        key_pepper="p" * 20,
        gold_share=0.3,
        qualification_size=1,
        gold_exposure=WORKERS,
        rate_per_s=1e6,
        rate_burst=10**6,
    )
    app = create_app(settings, redis=r, search=StubSearch())  # type: ignore[arg-type]
    key = KeyStore(r, settings.key_pepper.get_secret_value()).create("v", "Vendor")
    auth = {"Authorization": f"Bearer {key}"}
    ms: Samples = []
    with TestClient(app) as client:
        gw = app.state.gateway
        fill(gw)
        for w in range(WORKERS):
            prev = ""
            for _ in range(2):  # the qualification lease (not timed), then work
                ask = {"worker_id": f"w{w}", "campaign": "c", "max_questions": LEASE}
                lease = client.post("/v1/leases", json=ask, headers=auth).json()
                refs = gw.lease("v", lease["lease_id"])["refs"]
                for q in lease["questions"]:
                    one = {"question_id": q["question_id"], "answer": True, "elapsed_ms": 1500}
                    body = {"lease_id": lease["lease_id"], "worker_id": f"w{w}", "answers": [one]}
                    t0 = time.perf_counter_ns()
                    assert client.post("/v1/answers", json=body, headers=auth).status_code == 200
                    took = (time.perf_counter_ns() - t0) / 1e6
                    kind = refs[q["question_id"]][0]
                    if kind in "gr":
                        ms.append((kind, prev, took))
                    prev = kind
    return ms, []


def direct() -> tuple[Samples, Samples]:
    """Milliseconds of ``Gateway.submit`` by kind, and of the settler applying each answer."""
    r = fresh_redis()
    policy = QualityPolicy(qualification_size=0, gold_share=0.3, gold_exposure=WORKERS)
    gw = Gateway(r, StubSearch(), QualityControl(r, policy), GatewaySettings(key_pepper="p" * 20))
    fill(gw)
    ms: Samples = []
    settle: Samples = []
    for w in range(WORKERS):
        offer = gw.create_lease("v", f"w{w}", "c", LEASE, refill=False)
        refs = gw.lease("v", offer.lease_id)["refs"]
        prev = ""
        for oid, _ in offer.questions:
            kind = refs[oid][0]
            t0 = time.perf_counter_ns()
            gw.submit("v", offer.lease_id, f"w{w}", [(oid, True, 1500)])
            t1 = time.perf_counter_ns()
            assert gw.settle_pending() == 1  # the settler thread's work, not timed above
            t2 = time.perf_counter_ns()
            ms.append((kind, prev, (t1 - t0) / 1e6))
            settle.append((kind, prev, (t2 - t1) / 1e6))
            prev = kind
    return ms, settle


def report(name: str, samples: Samples) -> None:
    kept = samples[len(samples) // 10 :]  # warm-up
    by = {k: np.array([t for kind, _, t in kept if kind == k]) for k in "gr"}
    for kind, v in by.items():
        p50, p99 = np.percentile(v, [50, 99])
        print(
            f"{name} {kind}: {len(v)} answers  p50 {p50:.3f} ms  mean {v.mean():.3f}  p99 {p99:.3f}"
        )
    g, real = by["g"], by["r"]
    print(f"{name} p50 ratio real/gold {np.median(real) / np.median(g):.3f}")
    auc = mannwhitneyu(real, g).statistic / (len(real) * len(g))
    print(f"{name} AUC P(real > gold) {auc:.3f}  (0.5: one answer's time tells nothing)")
    lag = {k: np.array([t for _, prev, t in kept if prev == k]) for k in "gr"}
    auc1 = mannwhitneyu(lag["r"], lag["g"]).statistic / (len(lag["r"]) * len(lag["g"]))
    print(
        f"{name} lag 1: AUC P(after real > after gold) {auc1:.3f}  "
        f"({len(lag['g'])} after gold, {len(lag['r'])} after real)"
    )


def main() -> None:
    http = sys.argv[1:2] == ["http"]
    requests, settles = over_http() if http else direct()
    report("request", requests)
    if settles:
        report("settler", settles)
    if http:
        from maskprop_gateway.metrics import SETTLE_DELAY

        got = {s.name: s.value for m in SETTLE_DELAY.collect() for s in m.samples}
        n, total = (
            got["maskprop_gateway_settle_delay_seconds_count"],
            got["maskprop_gateway_settle_delay_seconds_sum"],
        )
        print(f"settler thread: {n:.0f} requests applied, mean delay {1000 * total / n:.2f} ms")


if __name__ == "__main__":
    main()
