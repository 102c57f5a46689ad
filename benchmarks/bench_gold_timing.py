"""Issue #18, the timing class: can one answer's latency tell hidden gold from a real question?

``Gateway.submit`` on the real Redis (database 7 of REDIS_URL's server, flushed first), one
answer a request, relay forwarding (the service's default), a stub search; 300 workers x
leases of 20 with 30 % gold (more gold samples than production's 5 %).  Prints per kind the
p50/mean/p99 over every request but the first 10 % (warm-up), the p50 ratio, and the AUC
P(real > gold) of a single answer's time: 0.5 means one answer's time tells nothing.  A worker
gets one timing sample per question (a retry is a duplicate and takes another path), so the
AUC bounds what a bot could exploit.  ``tests/unit/gateway/test_side_channels.py`` checks the
deterministic part: the same Redis calls, in the same order, for both kinds.

    source .cache/dev-infra/env && .venv/bin/python benchmarks/bench_gold_timing.py
    .venv/bin/python benchmarks/bench_gold_timing.py http   # whole requests through the app

``http`` times whole ``POST /v1/answers`` requests through the app (FastAPI's TestClient, auth
and rate limit included).
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


def over_http() -> dict[str, list[float]]:
    """Milliseconds of whole answer requests by kind, through the app."""
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
    ms: dict[str, list[float]] = {"g": [], "r": []}
    with TestClient(app) as client:
        gw = app.state.gateway
        fill(gw)
        for w in range(WORKERS):
            for _ in range(2):  # the qualification lease (not timed), then work
                ask = {"worker_id": f"w{w}", "campaign": "c", "max_questions": LEASE}
                lease = client.post("/v1/leases", json=ask, headers=auth).json()
                refs = gw.lease("v", lease["lease_id"])["refs"]
                for q in lease["questions"]:
                    one = {"question_id": q["question_id"], "answer": True, "elapsed_ms": 1500}
                    body = {"lease_id": lease["lease_id"], "worker_id": f"w{w}", "answers": [one]}
                    t0 = time.perf_counter_ns()
                    assert client.post("/v1/answers", json=body, headers=auth).status_code == 200
                    kind = refs[q["question_id"]][0]
                    if kind in ms:
                        ms[kind].append((time.perf_counter_ns() - t0) / 1e6)
    return ms


def direct() -> dict[str, list[float]]:
    """Milliseconds of ``Gateway.submit`` by kind."""
    r = fresh_redis()
    policy = QualityPolicy(qualification_size=0, gold_share=0.3, gold_exposure=WORKERS)
    gw = Gateway(r, StubSearch(), QualityControl(r, policy), GatewaySettings(key_pepper="p" * 20))
    fill(gw)
    ms: dict[str, list[float]] = {"g": [], "r": []}
    for w in range(WORKERS):
        offer = gw.create_lease("v", f"w{w}", "c", LEASE, refill=False)
        refs = gw.lease("v", offer.lease_id)["refs"]
        for oid, _ in offer.questions:
            t0 = time.perf_counter_ns()
            gw.submit("v", offer.lease_id, f"w{w}", [(oid, True, 1500)])
            ms[refs[oid][0]].append((time.perf_counter_ns() - t0) / 1e6)
    return ms


def main() -> None:
    ms = over_http() if sys.argv[1:2] == ["http"] else direct()
    kept = {k: np.array(v[len(v) // 10 :]) for k, v in ms.items()}
    for kind, v in kept.items():
        p50, p99 = np.percentile(v, [50, 99])
        print(f"{kind}: {len(v)} answers  p50 {p50:.3f} ms  mean {v.mean():.3f}  p99 {p99:.3f}")
    g, real = kept["g"], kept["r"]
    print(f"p50 ratio real/gold {np.median(real) / np.median(g):.3f}")
    auc = mannwhitneyu(real, g).statistic / (len(real) * len(g))
    print(f"AUC P(real > gold) {auc:.3f}  (0.5: one answer's time tells nothing)")


if __name__ == "__main__":
    main()
