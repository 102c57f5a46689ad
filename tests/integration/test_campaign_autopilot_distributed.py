"""A campaign's second round starts by itself (issue #16 item 5): ``maskprop campaign
autopilot`` as its own process beside detector, clusterer, search and sink on the real broker
and Redis.  Once the crowd has decided round 1 and the sink holds its labels, the autopilot
exports the accepted masks, retrains the detector into ``<models>/<campaign>/round2.pt``,
learns K_pr/K_pa on a held-out set with them (revising the spec) and publishes round 2, which
the detector detects with those weights; after round 2 it stops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

pytest.importorskip("torch", reason="the detector needs torch")

from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.ingest import round_progress
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2_grpc
from tests.integration.conftest import Deployment, wait_for
from tests.integration.test_campaign_rounds_distributed import (
    CLASSES,
    SPEC,
    add_detector,
    answer,
    maskprop,
)
from tests.unit.detector.conftest import untrained_pool

pytestmark = pytest.mark.integration


def test_the_next_round_starts_by_itself(infra, tmp_path: Path) -> None:
    weights = untrained_pool(tmp_path, 6, max_detections=8, classes=CLASSES)
    root = tmp_path / "synth" / "images" / "pool"
    labelled = tmp_path / "synth" / "annotations" / "pool.json"  # its ground truth, as labels
    models = tmp_path / "models"
    models.mkdir()
    dep = Deployment(infra, tmp_path)
    add_detector(dep, weights, root, models)
    env = {**dep.env, "MASKPROP_INGEST_BATCH_SIZE": "4"}
    name = dep.campaign
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(name=name, images=root, weights=weights, budget=10_000))
    dataset = dep.data / "dataset"
    dep.start()
    pilot = None
    try:
        made = maskprop(env, "create", "--spec", str(spec))
        assert made.returncode == 0, made.stderr
        early = maskprop(
            env, "autopilot", name, "--labelled", str(labelled), "--labelled-images", str(root),
            "--models-root", str(models), "--dataset", str(dataset), "--no-progress",
        )  # fmt: skip
        assert early.returncode == 2 and "no images published yet" in early.stderr
        added = maskprop(env, "add-images", name, "--no-progress")
        assert added.returncode == 0, added.stderr
        pilot = subprocess.Popen(
            [sys.executable, "-m", "maskprop", "campaign", "autopilot", name,
             "--labelled", str(labelled), "--labelled-images", str(root),
             "--models-root", str(models), "--dataset", str(dataset), "--poll-s", "0.5",
             "--heldout", str(labelled), "--heldout-images", str(root),
             "--timeout-s", "400", "--steps", "2", "--batch-size", "2", "--device", "cpu",
             "--no-progress"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        stub = search_pb2_grpc.SearchServiceStub(dep.channel())

        def status() -> dict[str, object]:
            got = maskprop(env, "status", name)
            return json.loads(got.stdout) if got.returncode == 0 else {}

        def has(stage: str) -> dict[str, object] | None:
            done = status().get("stages", {}).get(stage, {})
            return done if done and done["done"] == done["total"] == 2 else None

        wait_for(lambda: has("classes in search"), 240, "round 1's trees in search", dep)
        assert answer(stub, dep, name, None)[1]  # the crowd decides round 1 whole
        # nobody runs retrain or next-round: the autopilot does
        registry = CampaignRegistry(redis.Redis.from_url(env["MASKPROP_REDIS_URL"]))

        def round_2_in_search() -> bool:
            # the retrained detector may find masks of fewer classes: every class it found
            return round_progress(registry, name, 2).stage in ("annotating", "decided")

        wait_for(round_2_in_search, 400, "round 2 by itself", dep)
        assert (models / name / "round2.pt").is_file()
        assert (models / name / "accepted-r1.json").is_file()
        assert has("round 2 batches detected")
        # round 2's sessions opened with the K_pr/K_pa the autopilot learned on the held-out
        # set with round 2's weights: every held-out mask wrong (an untrained detector), so
        # K_pr = 1 rejects every cluster unasked
        assert answer(stub, dep, f"{name}.r2", None) == (0, True)
        out, err = pilot.communicate(timeout=400)
        assert pilot.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report["stopped"] == "last round"
        r1, r2 = report["rounds"]
        assert r1["round"] == 1 and r1["decided"] == r1["masks"] > 0
        assert r1["retrain"]["accepted_masks"] >= 0 and r2["decided"] == r2["masks"]
        priors = r1["priors"]
        assert priors["heldout_correct_share"] == 0.0 and priors["prior_reject_threshold"] == 1.0
        assert priors["version"] == registry.spec(name).version == 2
        assert registry.spec(name).params.prior_reject_threshold == 1.0
        assert json.loads((models / name / "priors-r2.json").read_text()) == priors
        exported = maskprop(env, "export", name, "--out", str(tmp_path / "x.json"),
                            "--dataset", str(dataset))  # fmt: skip
        assert set(json.loads(exported.stdout)["rounds"]) == {"1", "2"}, exported.stderr
    finally:
        if pilot is not None and pilot.poll() is None:
            pilot.kill()
        dep.stop()
