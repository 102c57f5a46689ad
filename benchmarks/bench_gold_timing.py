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
"""

from __future__ import annotations

import os
import time

import numpy as np
import redis
from maskprop_gateway import views
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


def main() -> None:
    server = os.environ.get("REDIS_URL", "redis://127.0.0.1:6390/0").rsplit("/", 1)[0]
    r = redis.Redis.from_url(server + "/7")
    r.flushdb()
    policy = QualityPolicy(qualification_size=0, gold_share=0.3, gold_exposure=WORKERS)
    qc = QualityControl(r, policy)
    gw = Gateway(r, StubSearch(), qc, GatewaySettings(key_pepper="p" * 20))
    view = views.render("cat", "i.png", 4, 4, "0g0")
    gw.pool.add("c", {f"c:0:{i}:{i}": view for i in range(QUESTIONS)}, time.time())
    qc.import_gold(
        GoldItem(f"g{i}", "c", "cat", "i.png", 4, 4, b"0g0", answer=True) for i in range(GOLD)
    )
    ms: dict[str, list[float]] = {"g": [], "r": []}
    for w in range(WORKERS):
        offer = gw.create_lease("v", f"w{w}", "c", LEASE, refill=False)
        refs = gw.lease("v", offer.lease_id)["refs"]
        for oid, _ in offer.questions:
            t0 = time.perf_counter_ns()
            gw.submit("v", offer.lease_id, f"w{w}", [(oid, True, 1500)])
            ms[refs[oid][0]].append((time.perf_counter_ns() - t0) / 1e6)
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
