"""A campaign's two rounds through every service as its own process (detector, clusterer,
search, sink, controller, verify gateway) on the real broker and Redis, a noise-free crowd
answering over the gateway's HTTP API (``scripts/campaign_demo_distributed.py``, small): the
budget is met exactly and every round's accepted masks equal those of the same spec run
embedded (``maskprop campaign run``)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the detector needs torch")

from scripts.campaign_demo_distributed import (
    GroundTruthCrowd,
    Stack,
    accepted_keys,
    compare,
    compare_decided,
    run_distributed,
    write_spec,
)
from tests.unit.detector.conftest import untrained_pool

pytestmark = pytest.mark.integration
CLASSES = ("disc", "square")
K_IOU = 0.3  # an untrained detector's masks: a low K_iou so some are accepted
# "split": an untrained detector's rejected clusters are asked on inside, so 6 images give
# the rounds questions enough (as tests/inprocess/test_campaign_run.py)
EXTRA = 'reject_action = "split"\nstrategy = "bfs"\n'


def embedded(spec: Path, out: Path, gt: Path) -> dict:
    res = subprocess.run(
        [sys.executable, "-m", "maskprop", "campaign", "run", "--spec", str(spec), "--out",
         str(out), "--simulated-crowd", str(gt), "--device", "cpu", "--retrain-steps", "2",
         "--batch-size", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_crowd_over_http_two_rounds_budget_met_labels_equal_embedded(infra, tmp_path) -> None:
    weights = untrained_pool(tmp_path, 6, max_detections=8, classes=CLASSES)
    pool = tmp_path / "synth" / "images" / "pool"
    gt = tmp_path / "synth" / "annotations" / "pool.json"
    tag = uuid.uuid4().hex[:8]
    name = f"it-{tag}"
    kw = dict(
        name=name, classes=json.dumps(CLASSES), images=pool, weights=weights, labelled=gt,
        labelled_images=pool, samples=3, accept=0.9, iou=K_IOU, extra=EXTRA,
    )  # fmt: skip
    # The budget: the questions an embedded run without a binding budget asked; with it the
    # runs spend all of it, none beyond.
    free = embedded(write_spec(tmp_path / "free.toml", 10_000, **kw), tmp_path / "free", gt)
    cap = free["budget"]["spent_questions"]
    assert [r["round"] for r in free["rounds"]] == [1, 2] and cap > 0
    spec = write_spec(tmp_path / "spec.toml", cap, **kw)
    emb = embedded(spec, tmp_path / "embedded", gt)
    assert emb["budget"]["spent_questions"] == cap

    # A Redis database of its own, emptied first (as the other integration tests).
    db = 1 + int(tag, 16) % 15
    redis_url = infra["redis"].rsplit("/", 1)[0] + f"/{db}"
    import redis as redis_client

    redis_client.Redis.from_url(redis_url).flushdb()
    work = tmp_path / "distributed"
    models = tmp_path / "models"
    models.mkdir()
    stack = Stack(
        kafka=infra["kafka"], redis_url=redis_url, work=work, image_root=pool,
        weights=weights, models_root=models, tag=tag,
    )  # fmt: skip
    stack.env["MASKPROP_INGEST_BATCH_SIZE"] = "4"  # two batches a round
    stack.start()
    try:
        dist = run_distributed(
            stack=stack, spec=spec, name=name, crowd=GroundTruthCrowd(gt, pool, K_IOU),
            cap=cap, work=work, labelled=gt, labelled_images=pool, retrain_steps=2,
            retrain_batch=2, seconds_per_question=2.0, log=lambda _msg: None,
        )  # fmt: skip
    finally:
        stack.stop()

    # the budget met exactly: every question the budget buys handed out, none beyond it
    assert dist["budget"]["questions"] == dist["budget"]["of_questions"] == cap
    assert dist["leased_after_the_end"] == 0
    assert [r["questions"] for r in dist["rounds"]] == [r["questions"] for r in emb["rounds"]]
    assert all(r["crowd_answers_over_http"] >= r["questions"] for r in dist["rounds"])
    # the labels: every round's accepted masks (image, class, RLE) equal the embedded run's
    same = compare(tmp_path / "embedded", work / "export-rounds.json", work / "export.json")
    assert same["round1"]["equal"] and same["round2"]["equal"] and same["merged"]["equal"]
    accepted = accepted_keys(json.loads((work / "export-rounds.json").read_text()))
    assert len(accepted) > 0  # not two empty sets
    # and every decided mask (accepted or rejected), by mask id: the same masks decided, with
    # the same labels, in both rounds.  The budget is exactly the questions the campaign needs:
    # asking ends with the last of them, and what needs no question is still decided (search's
    # decide_without_asking), so round 2 leaves no mask undecided in either run.
    decided = compare_decided(tmp_path / "embedded", stack.data / "dataset", name)
    for r in ("round1", "round2"):
        assert decided[r]["decided_in_both"] > 0 and decided[r]["disagree"] == 0
        assert decided[r]["distributed_only"] == decided[r]["embedded_only"] == 0, decided[r]
    assert [r["undecided_masks"] for r in emb["rounds"]] == [0, 0]
