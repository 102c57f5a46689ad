"""A campaign on the real broker and Redis, every part its own process: the controller, the
detector (a tiny untrained model), clusterer, search and sink; the user's side is the
``maskprop campaign`` CLI (create through the controller, add-images straight to Redis and the
broker).  Bad inputs end as one ``error:`` line and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the detector needs torch")

from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.ingest import read_plan
from tests.integration.conftest import Deployment, Service, free_port, wait_for
from tests.unit.detector.conftest import untrained_pool

pytestmark = pytest.mark.integration
CLASSES = ("disc", "square")
TOKEN = "integration-admin-token"

SPEC = """
[campaign]
name = "{name}"
classes = ["disc", "square"]
images = "{images}"
[detector]
weights = "{weights}"
[annotation]
samples_per_cluster = 5
accept_threshold = {k_a}
strategy = "bfs"
[budget]
questions = 300
"""


def maskprop(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maskprop", "campaign", *args],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def test_campaign_over_a_folder_on_the_real_services(infra, tmp_path: Path) -> None:
    weights = untrained_pool(tmp_path, 8, max_detections=10, classes=CLASSES)
    root = tmp_path / "synth" / "images" / "pool"
    shutil.copy(root / "000001.png", root / "dup.png")
    (root / "broken.png").write_bytes(b"not a png")
    dep = Deployment(infra, tmp_path)
    controller_port = free_port()
    dep.services["controller"] = Service(
        "maskprop_controller",
        {**dep.env, "MASKPROP_GRPC_PORT": str(controller_port),
         "MASKPROP_CONTROLLER_ADMIN_TOKEN": TOKEN},
        dep.logs,
    )  # fmt: skip
    dep.services["detector"] = Service(
        "maskprop_detector",
        {**dep.env, "MASKPROP_GRPC_PORT": str(free_port()),
         "MASKPROP_DETECTOR_WEIGHTS": str(weights), "MASKPROP_IMAGE_ROOT": str(root),
         "MASKPROP_DEVICE": "cpu"},
        dep.logs,
    )  # fmt: skip
    via_controller = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MASKPROP_")},
        "MASKPROP_CONTROLLER_ADDR": f"127.0.0.1:{controller_port}",
        "MASKPROP_CONTROLLER_ADMIN_TOKEN": TOKEN,
    }
    direct = {**dep.env, "MASKPROP_INGEST_BATCH_SIZE": "3"}
    spec = tmp_path / "spec.toml"
    name = dep.campaign
    dep.start()
    try:
        import redis as redis_client

        registry = CampaignRegistry(redis_client.Redis.from_url(dep.env["MASKPROP_REDIS_URL"]))
        spec.write_text(SPEC.format(name=name, images=root, weights=weights, k_a=0.4))
        bad = maskprop(via_controller, "create", "--spec", str(spec))
        assert bad.returncode == 2 and bad.stderr.startswith("error: [annotation] accept_thr")
        spec.write_text(SPEC.format(name=name, images=root, weights=weights, k_a=0.9))
        made = wait_for(
            lambda: (r := maskprop(via_controller, "create", "--spec", str(spec))).returncode
            == 0 and r,
            60, "the controller to create the campaign", dep, poll=2,
        )  # fmt: skip
        assert json.loads(made.stdout)["annotation"]["K_a"] == 0.9
        taken = maskprop(via_controller, "create", "--spec", str(spec))
        assert taken.returncode == 2 and f"campaign '{name}' exists" in taken.stderr
        assert len(taken.stderr.strip().splitlines()) == 1

        added = maskprop(direct, "add-images", name, "--no-progress")
        assert added.returncode == 0, added.stderr
        result = json.loads(added.stdout.strip().splitlines()[-1])
        assert result["accepted"] == 8 and result["batches"] == result["published"] == 3
        assert result["refused"] == {"duplicate content": 1, "not a readable image": 1}
        plan = read_plan(registry.redis, name)
        assert plan is not None and plan.done

        def in_search() -> dict[str, object] | None:
            status = maskprop(via_controller, "status", name)
            out = json.loads(status.stdout) if status.returncode == 0 else {}
            stages = out.get("stages", {})
            done = stages.get("classes in search", {})
            return out if done and done["done"] == done["total"] == 2 else None

        status = wait_for(in_search, 240, "both classes' trees to reach search", dep, poll=2)
        assert status["stages"]["batches detected"] == {"done": 3, "total": 3}
        assert status["state"] == "running"
        paused = maskprop(via_controller, "pause", name)
        assert paused.stdout.strip() == f"{name}: paused"
        assert registry.state(name) == "paused"
    finally:
        dep.stop()
