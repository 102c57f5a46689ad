"""``maskprop campaign`` as a user meets it (typer's CliRunner), on fakeredis and the in-memory
bus standing in for MASKPROP_REDIS_URL and MASKPROP_KAFKA_BOOTSTRAP: outputs, and one
``error:`` line for every bad input with nothing half-created."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from typer.testing import CliRunner

from maskprop_app import cmd_campaign
from maskprop_app.cli import app
from maskprop_runtime import topics
from maskprop_runtime.bus import InMemoryBus
from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2

from .conftest import GOOD_IMAGES

SPEC = """
[campaign]
name = "{name}"
classes = ["circle", "square"]
images = "{images}"
[detector]
weights = "detector.pt"
[annotation]
accept_threshold = {k_a}
[budget]
questions = 500
"""


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, InMemoryBus]:
    """One Redis and one bus shared by every command of a test."""
    redis, bus = fakeredis.FakeRedis(), InMemoryBus()
    monkeypatch.setattr(cmd_campaign, "open_redis", lambda settings: redis)
    monkeypatch.setattr(cmd_campaign, "open_bus", lambda settings: bus)
    monkeypatch.setenv("MASKPROP_INGEST_MAX_IMAGE_BYTES", "200000")
    monkeypatch.setenv("MASKPROP_INGEST_MAX_IMAGE_PIXELS", "1000000")
    monkeypatch.setenv("MASKPROP_INGEST_BATCH_SIZE", "4")
    return redis, bus


def write_spec(folder: Path, images: Path, name: str = "shapes", k_a: float = 0.85) -> Path:
    (folder / "detector.pt").write_bytes(b"weights")
    path = folder / f"{name}.toml"
    path.write_text(SPEC.format(name=name, images=images, k_a=k_a))
    return path


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["campaign", *args])


def one_error_line(res: Any) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_create_list_status_and_states(tmp_path: Path, pool: Path, servers: Any) -> None:
    redis, _ = servers
    res = cli("create", "--spec", str(write_spec(tmp_path, pool)))
    assert res.exit_code == 0, res.output
    made = json.loads(res.output)
    assert (made["name"], made["version"], made["state"]) == ("shapes", 1, "created")
    assert made["annotation"]["K_a"] == 0.85 and made["budget"]["questions"] == 500
    cli("create", "--spec", str(write_spec(tmp_path, pool, name="other", k_a=0.95)))
    res = cli("list")
    assert res.output.splitlines() == [
        "shapes\tv1\tcreated\tcircle,square",
        "other\tv1\tcreated\tcircle,square",
    ]
    assert cli("pause", "shapes").output.strip() == "shapes: paused"
    assert cli("resume", "shapes").output.strip() == "shapes: running"
    assert cli("stop", "shapes").output.strip() == "shapes: stopped"
    assert "cannot become running" in one_error_line(cli("resume", "shapes"))
    status = json.loads(cli("status", "other").output)
    assert status["annotation"]["K_a"] == 0.95 and status["state"] == "created"
    assert status["stages"]["batches published"] == {"done": 0, "total": 0}
    assert CampaignRegistry(redis).spec("other").params.accept_threshold == 0.95


def test_add_images_reports_refusals_and_publishes(tmp_path: Path, pool: Path, servers: Any):
    _, bus = servers
    cli("create", "--spec", str(write_spec(tmp_path, pool)))
    res = cli("add-images", "shapes", "--no-progress")
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert result["accepted"] == GOOD_IMAGES and result["published"] == result["batches"] == 2
    assert result["refused"] == {
        "duplicate content": 1,
        "not a readable image": 2,
        "too many pixels": 1,
        "file too large": 1,
        "outside the images folder": 1,
    }
    assert "refused 1 (outside the images folder): escape.png" in res.output
    sent = [detector_pb2.ImageBatch.FromString(r.value) for r in bus.read(topics.IMAGES)]
    assert sum(len(b.images) for b in sent) == GOOD_IMAGES
    status = json.loads(cli("status", "shapes").output)
    assert status["state"] == "running"
    assert status["stages"]["images accepted"] == {"done": GOOD_IMAGES, "total": GOOD_IMAGES}
    assert status["refused"]["file too large"] == 1
    assert "already published its 6 images" in one_error_line(cli("add-images", "shapes"))


def test_all_or_nothing_adds_nothing(tmp_path: Path, pool: Path, servers: Any) -> None:
    redis, bus = servers
    cli("create", "--spec", str(write_spec(tmp_path, pool)))
    res = cli("add-images", "shapes", "--all-or-nothing", "--no-progress")
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (
        "error: 6 image(s) refused and --all-or-nothing: nothing was added"
    )
    assert bus.read(topics.IMAGES) == []
    assert redis.keys("maskprop:campaign:shapes:*") == []
    assert CampaignRegistry(redis).state("shapes") == "created"


def test_bad_inputs_are_one_line_and_create_nothing(
    tmp_path: Path, pool: Path, servers: Any
) -> None:
    redis, _ = servers
    assert "K_a" in one_error_line(
        cli("create", "--spec", str(write_spec(tmp_path, pool, k_a=0.4)))
    )
    assert "images folder" in one_error_line(
        cli("create", "--spec", str(write_spec(tmp_path, tmp_path / "missing")))
    )
    assert redis.keys("*") == []
    cli("create", "--spec", str(write_spec(tmp_path, pool)))
    taken = one_error_line(cli("create", "--spec", str(write_spec(tmp_path, pool, k_a=0.9))))
    assert "'shapes' exists" in taken
    assert "no campaign named 'ghost'" in one_error_line(cli("status", "ghost"))
    assert "no campaign named 'ghost'" in one_error_line(cli("add-images", "ghost"))
    assert "must be 1-64 characters" in one_error_line(cli("pause", "../x"))


def test_revise_needs_the_next_version(tmp_path: Path, pool: Path, servers: Any) -> None:
    cli("create", "--spec", str(write_spec(tmp_path, pool)))
    changed = write_spec(tmp_path, pool, k_a=0.9)
    assert "must say version = 2" in one_error_line(cli("revise", "--spec", str(changed)))
    changed.write_text(changed.read_text().replace("[detector]", "version = 2\n[detector]"))
    res = cli("revise", "--spec", str(changed))
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["version"] == 2


def test_without_redis_the_commands_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASKPROP_REDIS_URL", raising=False)
    assert "need MASKPROP_REDIS_URL" in one_error_line(cli("list"))
