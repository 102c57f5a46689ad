"""bench_gateway.py's pool with one large class and its whole-window figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maskprop.simulate.generator import ade_class_sizes, ade_like_class

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gateway.py"


@pytest.fixture(scope="module")
def bg() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gateway_under_test", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_pool_with_a_big_class_puts_it_first_and_the_long_tail_after(bg: Any) -> None:
    pool = bg.bench_pool(3000, 6, big=5000, seed=3, dim=4)
    sizes = np.bincount(pool.class_ids, minlength=6)
    assert len(pool) == 8000
    assert sizes[0] == 5000
    assert sizes[1:].tolist() == ade_class_sizes(3000, 5).tolist()
    # class 0 is the simulator's class 0 generated on its own, untouched
    features, scores, ious, _ = ade_like_class(0, 5000, 3, 4)
    np.testing.assert_array_equal(pool.scores[:5000], scores)
    np.testing.assert_array_equal(pool.features[:5000], features)
    np.testing.assert_array_equal(pool.ious[:5000], ious)
    np.testing.assert_array_equal(
        pool.scores[5000:5100], ade_like_class(1, sizes[1], 3, 4)[1][:100]
    )


def test_pool_without_a_big_class_is_the_ade_like_pool(bg: Any) -> None:
    from maskprop.simulate.generator import ade_like_pool

    pool = bg.bench_pool(2000, 5, seed=11, dim=4)
    ref = ade_like_pool(2000, 5, seed=11, dim=4)
    np.testing.assert_array_equal(pool.features, ref.features)
    np.testing.assert_array_equal(pool.class_ids, ref.class_ids)


def test_summary_rates_and_latency_percentiles(bg: Any) -> None:
    # 10 requests of 100 answers over 10 s, latencies 10..100 ms
    done = [(100.0 + i + 1, 100, 0.01 * (i + 1)) for i in range(10)]
    out = bg.summarize(done, 100.0, 110.0)
    assert out["answers"] == 1000
    assert out["answers_per_s"] == pytest.approx(100.0)
    assert out["p50_ms"] == pytest.approx(50.0)  # sorted index round(0.5 * 9) = 4
    assert out["p99_ms"] == pytest.approx(100.0)
    assert sum(out["series"]) == 1000
    # finished at 101..110 s: the first 10 s bucket holds 9 requests (50..90 ms: 4 over 50 ms),
    # the second the last one (100 ms)
    assert out["tail_series"] == [(pytest.approx(90.0), 4, 9), (pytest.approx(100.0), 1, 1)]


def test_tail_pool_is_the_big_pool_without_its_big_class(bg: Any) -> None:
    full = bg.bench_pool(3000, 6, big=5000, seed=3, dim=4)
    tail = bg.bench_pool(3000, 6, big=5000, seed=3, dim=4, tail=True)
    assert len(tail) == 3000 and 0 not in set(tail.class_ids.tolist())
    np.testing.assert_array_equal(tail.class_ids, full.class_ids[5000:])
    np.testing.assert_array_equal(tail.features, full.features[5000:])
    np.testing.assert_array_equal(tail.ious, full.ious[5000:])
    assert tail.class_names == full.class_names


def test_the_report_says_whether_the_crowd_ran_dry(bg: Any) -> None:
    ran_dry = {
        "window_s": 120.0,
        "seconds": 31.0,
        "campaign_done": True,
        "campaigns": 1,
        "campaigns_done": {"gw": 30.5},
    }
    assert bg.dry(ran_dry).startswith("YES: all 1 campaign(s) done at 31.0 s")
    busy = {
        "window_s": 120.0,
        "seconds": 120.2,
        "campaign_done": False,
        "campaigns": 4,
        "campaigns_done": {"gw1": 80.0},
        "lease_sizes": [100, 0, 100],
        "empty_series": [0, 0, 1],
    }
    text = bg.dry(busy)
    assert text.startswith("no: the load ran the whole window")
    assert "campaigns done 1/4 (at 80 s)" in text and "1 empty leases, the first at 1.0 s" in text


def test_the_open_loop_keeps_each_workers_schedule(bg: Any) -> None:
    """``--rate``: 4 workers offering 40 answers/s in leases of 10 lease once a second each,
    one worker a quarter second after the other, and answer half a second after leasing,
    however fast the server is."""
    import http.server
    import json
    import threading
    import time
    from argparse import Namespace

    seen: list[tuple[str, float]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, time.monotonic()))
            if self.path == "/v1/leases":
                qs = [{"question_id": f"q{i}", "mask": {"counts": "x"}} for i in range(10)]
                self._reply(201, {"lease_id": "l", "questions": qs})
            else:
                self._reply(200, {"accepted": len(body["answers"])})

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = Namespace(
            target=f"http://127.0.0.1:{server.server_address[1]}",
            key="k",
            campaign="c",
            seconds=2.0,
            workers=4,
            batch=10,
            rate=40.0,
        )
        out = bg.load_gateway(args, {})
    finally:
        server.shutdown()
    leases = [t for path, t in seen if path == "/v1/leases"]
    answers = [t for path, t in seen if path == "/v1/answers"]
    assert len(leases) == len(answers) == 8  # slots at 0, 0.25, ..., 1.75 s
    assert out["answers"] == 80 and out["rate"] == 40.0
    # no lease far behind its slot (a busy CI machine may put one past LATE_S = 10 ms)
    assert out["lag_p99_ms"] < 250 and out["late_leases"] <= 2
    gaps = np.diff(sorted(leases))
    assert 0.1 < gaps.min() and gaps.max() < 0.5  # a quarter second apart
    lag = np.array(sorted(answers)) - np.array(sorted(leases))
    assert (abs(lag - 0.5) < 0.25).all()  # each answered half a period after its lease
