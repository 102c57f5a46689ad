"""benchmarks/bench_scale.py at CI size (issue #15): a 60k-mask campaign whose largest class
holds 20k, fed by ``maskprop feed-simulated --big-class``, through clusterer, search, the
verify gateway with a crowd on its HTTP API, and the sink, all as processes on a real broker
and Redis.  The report's invariants are asserted, never a time: no label lost or duplicated
(the sink's per-mask ledger), every mask decided, labels equal to the library's for the
noise-free crowd; with ``--faults`` on a private broker and Redis (kill -9 of the clusterer
during the big class's build, of search while answers flow, of the sink while it writes, a
broker restart) the same."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "scale.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py")]
    argv += ["--masks", "60000", "--big-class", "20000", "--classes", "20"]
    argv += ["--workdir", str(tmp_path), "--json", str(out), *extra]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return dict(json.loads(out.read_text()))


def check_invariants(rep: dict) -> None:
    assert rep["campaign_done"] is True
    assert rep["labels_lost"] == 0
    assert rep["labels_duplicated"] == 0
    assert rep["ledger"]["labels"] == rep["ledger"]["unique_masks"] == 60000
    assert rep["labels_equal_library"] is True and rep["labels_differing"] == 0
    assert 0 < rep["ledger"]["accepted"] < 60000
    stages = rep["stages"]
    assert set(stages) == {"feed", "cluster", "answer", "sink_drain", "sink_restart"}
    assert stages["answer"]["answers"] > 0 and stages["answer"]["errors"].get("lease 403") is None
    assert stages["sink_restart"]["labels"] == 60000
    for name in ("clusterer", "search", "sink", "gateway"):
        assert stages["answer"]["peak_rss_mb"][name] > 0
    assert rep["kafka_bytes_per_label"] > 0 and stages["answer"]["redis_in_bytes_per_answer"] > 0


def test_bench_scale_small_campaign_keeps_its_invariants(infra, tmp_path):
    rep = bench(tmp_path)
    check_invariants(rep)
    assert rep["fault_events"] == []


def test_bench_scale_faults_lose_and_duplicate_nothing(infra, tmp_path):
    rep = bench(
        tmp_path,
        *("--faults", "--infra", "private", "--kill-search-after", "1000"),
        *("--kill-build-after", "0.5"),
    )
    check_invariants(rep)
    whats = [ev["what"] for ev in rep["fault_events"]]
    assert len(whats) == 4
    assert whats[0].startswith("kill -9 clusterer") and whats[-1] == "broker restart"
    assert rep["fault_events"][0]["tree_0_stored"] is False  # killed during class 0's build
    assert rep["fault_events"][1]["done"] is False  # search killed while answers flowed
