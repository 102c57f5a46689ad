"""Two rounds of a campaign on the real broker and Redis, every part its own process (detector,
clusterer, search, sink): round 1 from ``add-images``, round 2 from ``campaign next-round`` with
retrained weights the detector loads from its models root; a crowd answers over search's gRPC;
the one budget spans both rounds and is met exactly; ``campaign export`` merges both rounds'
labels from the sink's dataset with the round as provenance."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the detector needs torch")

from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc
from tests.integration.conftest import SINK_TOKEN, Deployment, Service, free_port, wait_for
from tests.integration.test_distributed import call
from tests.unit.detector.conftest import untrained_pool

pytestmark = pytest.mark.integration
CLASSES = ("disc", "square")
BUDGET, ROUND1 = 20, 8  # questions: the campaign's cap, and round 1's before round 2

SPEC = """
[campaign]
name = "{name}"
classes = ["disc", "square"]
images = "{images}"
[detector]
weights = "{weights}"
[annotation]
samples_per_cluster = 3
accept_threshold = 0.9
prior_reject_threshold = 0.0
prior_accept_threshold = 0.0
strategy = "bfs"
[budget]
questions = {budget}
rounds = 2
"""


def maskprop(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maskprop", "campaign", *args],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def says_yes(mask_id: str) -> bool:
    """A crowd's answer: "yes" for about two masks in three, fixed per mask (mixed clusters
    split, so a round has questions enough for the budget)."""
    return hashlib.sha256(mask_id.encode()).digest()[0] % 3 != 0


def answer(stub, dep: Deployment, campaign: str, most: int | None) -> tuple[int, bool]:
    """Lease and answer (:func:`says_yes`) ``campaign``'s questions, at most ``most`` (None: until
    search says the campaign is done); returns (questions handed out, done)."""
    handed = 0
    while most is None or handed < most:
        want = 4 if most is None else min(4, most - handed)
        resp = call(
            stub.LeaseQuestions,
            search_pb2.LeaseQuestionsRequest(
                campaign=campaign, max_questions=want, lease_owner="it"
            ),
            dep,
        )
        if resp.campaign_done:
            return handed, True
        if not resp.questions:
            time.sleep(0.2)  # questions may be out on leases not yet answered
            continue
        handed += len(resp.questions)
        answers = [search_pb2.AnswerItem(question_id=q.question_id, is_correct=says_yes(q.mask_id))
                   for q in resp.questions]  # fmt: skip
        call(stub.SubmitAnswers, search_pb2.SubmitAnswersRequest(answers=answers), dep)
    return handed, False


def add_detector(dep: Deployment, weights: Path, root: Path, models: Path) -> None:
    """The detector service as one more process of ``dep``: ``weights`` for round 1, images
    under ``root``, a round's retrained weights under ``models``."""
    dep.services["detector"] = Service(
        "maskprop_detector",
        {**dep.env, "MASKPROP_GRPC_PORT": str(free_port()),
         "MASKPROP_DETECTOR_WEIGHTS": str(weights), "MASKPROP_IMAGE_ROOT": str(root),
         "MASKPROP_MODELS_ROOT": str(models), "MASKPROP_DEVICE": "cpu"},
        dep.logs,
    )  # fmt: skip


def test_two_rounds_one_budget_and_one_export(infra, tmp_path: Path) -> None:
    weights = untrained_pool(tmp_path, 6, max_detections=8, classes=CLASSES)
    root = tmp_path / "synth" / "images" / "pool"
    models = tmp_path / "models"
    untrained_pool(tmp_path / "r2", 1, max_detections=6, classes=CLASSES)  # "retrained"
    models.mkdir()
    shutil.copy(tmp_path / "r2" / "w.pt", models / "r2.pt")
    dep = Deployment(infra, tmp_path)
    add_detector(dep, weights, root, models)
    env = {**dep.env, "MASKPROP_INGEST_BATCH_SIZE": "4"}
    name = dep.campaign
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(name=name, images=root, weights=weights, budget=BUDGET))
    dep.start()
    try:
        made = maskprop(env, "create", "--spec", str(spec))
        assert made.returncode == 0, made.stderr
        added = maskprop(env, "add-images", name, "--no-progress")
        assert added.returncode == 0, added.stderr

        def stage(key: str) -> dict[str, object] | None:
            status = maskprop(env, "status", name)
            out = json.loads(status.stdout) if status.returncode == 0 else {}
            done = out.get("stages", {}).get(key, {})
            return out if done and done["done"] == done["total"] == 2 else None

        wait_for(lambda: stage("classes in search"), 240, "round 1's trees in search", dep)
        stub = search_pb2_grpc.SearchServiceStub(dep.channel())
        assert answer(stub, dep, name, ROUND1) == (ROUND1, False)

        early = maskprop(env, "next-round", name, "--weights", "../w.pt", "--round", "3")
        assert early.returncode == 2 and "round 3 cannot be published" in early.stderr
        nxt = maskprop(env, "next-round", name, "--weights", "r2.pt", "--no-progress")
        assert nxt.returncode == 0, nxt.stderr
        assert json.loads(nxt.stdout.strip().splitlines()[-1])["travels_as"] == f"{name}.r2"
        status = wait_for(
            lambda: stage("round 2 classes in search"), 240, "round 2's trees in search", dep
        )
        assert status["stages"]["round 2 batches detected"] == {"done": 2, "total": 2}

        # round 2, then what is left of round 1, spend the one budget exactly
        second, done = answer(stub, dep, f"{name}.r2", None)
        assert done and 0 < second <= BUDGET - ROUND1
        rest, done = answer(stub, dep, name, None)
        assert done and ROUND1 + second + rest == BUDGET
        assert answer(stub, dep, f"{name}.r2", None) == (0, True)  # spent: nothing more
        spent = json.loads(maskprop(env, "status", name).stdout)["spent"]
        assert (spent["questions"], spent["of_questions"]) == (BUDGET, BUDGET)

        dataset = dep.data / "dataset"
        out = tmp_path / "export.json"

        def exported() -> dict[str, object] | None:
            res = maskprop(env, "export", name, "--out", str(out), "--dataset", str(dataset))
            got = json.loads(res.stdout) if res.returncode == 0 else {}
            rounds = got.get("rounds", {})
            return got if set(rounds) == {"1", "2"} else None

        summary = wait_for(exported, 120, "both rounds' labels in the sink", dep)
        doc = json.loads(out.read_text())
        by_round = {r: sum(a["maskprop_round"] == int(r) for a in doc["annotations"])
                    for r in ("1", "2")}  # fmt: skip
        assert sum(by_round.values()) == summary["annotations"] > 0
        assert by_round["1"] == summary["rounds"]["1"]  # the earliest round loses nothing
        assert by_round["2"] + summary["duplicates_dropped"] == summary["rounds"]["2"]

        # The same export streamed from the sink's gRPC Dataset service (no dataset mount).
        sink_port = dep.services["sink"].env["MASKPROP_GRPC_PORT"]
        remote_env = {**env, "MASKPROP_SINK_ADDR": f"127.0.0.1:{sink_port}",
                      "MASKPROP_SINK_ADMIN_TOKEN": SINK_TOKEN}  # fmt: skip
        remote = maskprop(remote_env, "export", name, "--out", str(tmp_path / "remote.json"))
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout) == summary
        got = json.loads((tmp_path / "remote.json").read_text())
        for d in (got, doc):
            d["info"].pop("date_created")
        assert got == doc
    finally:
        dep.stop()
