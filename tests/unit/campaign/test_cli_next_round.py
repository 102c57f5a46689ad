"""``maskprop campaign next-round`` as a user meets it (CliRunner, fakeredis, in-memory bus):
round 2 published as ``<name>.r2`` with its weights, and one ``error:`` line for each bad call
with nothing published."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maskprop_runtime import topics
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2

from .test_cli_campaign import cli, one_error_line, servers  # noqa: F401 (fixture)

SPEC = """
[campaign]
name = "shapes"
classes = ["circle", "square"]
images = "{images}"
[detector]
weights = "detector.pt"
[budget]
questions = 50
rounds = 2
"""


def _batches(bus: Any) -> list[detector_pb2.ImageBatch]:
    return [detector_pb2.ImageBatch.FromString(r.value) for r in bus.read(topics.IMAGES)]


def test_next_round_publishes_the_pool_again_with_its_weights(
    tmp_path: Path,
    pool: Path,
    servers: Any,  # noqa: F811 (the imported fixture)
) -> None:
    _, bus = servers
    (tmp_path / "detector.pt").write_bytes(b"weights")
    spec = tmp_path / "shapes.toml"
    spec.write_text(SPEC.format(images=pool))
    assert cli("create", "--spec", str(spec)).exit_code == 0
    assert "round 1 of campaign 'shapes' is not published whole yet (add-images first)" in (
        one_error_line(cli("next-round", "shapes", "--weights", "r2.pt"))
    )
    assert cli("add-images", "shapes", "--no-progress").exit_code == 0
    round1 = _batches(bus)
    assert "has rounds 1..2 ([budget] rounds): round 3" in one_error_line(
        cli("next-round", "shapes", "--weights", "r3.pt", "--round", "3")
    )
    assert "--weights must name" in one_error_line(cli("next-round", "shapes", "--weights", " "))
    assert "no campaign named 'ghost'" in one_error_line(
        cli("next-round", "ghost", "--weights", "r2.pt")
    )
    assert cli("pause", "shapes").exit_code == 0
    assert "is paused: only a running one gets a round" in one_error_line(
        cli("next-round", "shapes", "--weights", "r2.pt")
    )
    assert len(_batches(bus)) == len(round1)  # nothing published by a refused call
    assert cli("resume", "shapes").exit_code == 0

    res = cli("next-round", "shapes", "--weights", "shapes/r2.pt", "--no-progress")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out == {
        "campaign": "shapes", "round": 2, "travels_as": "shapes.r2", "weights": "shapes/r2.pt",
        "batches": 2, "published": 2,
    }  # fmt: skip
    round2 = _batches(bus)[len(round1) :]
    assert [b.event_id for b in round2] == ["images.shapes.r2.0", "images.shapes.r2.1"]
    assert {(b.campaign, b.weights) for b in round2} == {("shapes.r2", "shapes/r2.pt")}
    assert [[(i.image_id, i.uri) for i in b.images] for b in round2] == [
        [(i.image_id, i.uri) for i in b.images] for b in round1
    ]
    # a rerun resumes: everything is published, nothing is sent again
    again = cli("next-round", "shapes", "--weights", "shapes/r2.pt", "--no-progress")
    assert again.exit_code == 0 and len(_batches(bus)) == len(round1) + 2
