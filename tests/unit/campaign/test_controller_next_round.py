"""``NextRound`` through the campaign controller (a real gRPC port over fakeredis and the
in-memory bus): the CLI's ``next-round`` with ``MASKPROP_CONTROLLER_ADDR`` publishes round 2
from the controller, with the same refusals as without it, kinds kept, nothing published by a
refused call, and nothing at all without the admin token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from maskprop_controller.client import ControllerClient
from maskprop_controller.service import ControllerSettings, build_controller

from maskprop.errors import MaskpropError
from maskprop_runtime.bus import InMemoryBus
from maskprop_runtime.campaigns import CampaignConflict, CampaignNotFound
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2_grpc
from maskprop_runtime.server import build_server

from .test_cli_campaign import cli, one_error_line, servers  # noqa: F401 (fixture)
from .test_cli_next_round import SPEC, _batches

TOKEN = "an-admin-token-of-some-length"


@pytest.fixture
def controller(
    servers: tuple[Any, InMemoryBus],  # noqa: F811 (the imported fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """A controller on a free port over the test's Redis and bus; the CLI goes through it."""
    redis, bus = servers
    servicer = build_controller(ControllerSettings(controller_admin_token=TOKEN), redis, bus)
    server, _ = build_server(
        lambda s: campaign_pb2_grpc.add_CampaignControllerServicer_to_server(servicer, s),
        ["maskprop.campaign.v1.CampaignController"],
        workers=2,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("MASKPROP_CONTROLLER_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("MASKPROP_CONTROLLER_ADMIN_TOKEN", TOKEN)
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_next_round_through_the_controller(
    tmp_path: Path,
    pool: Path,
    servers: Any,  # noqa: F811 (the imported fixture)
    controller: str,
) -> None:
    _, bus = servers
    (tmp_path / "detector.pt").write_bytes(b"weights")
    spec = tmp_path / "shapes.toml"
    spec.write_text(SPEC.format(images=pool))
    assert cli("create", "--spec", str(spec)).exit_code == 0
    client = ControllerClient(controller, admin_token=TOKEN)
    with pytest.raises(CampaignConflict, match="round 1 of campaign 'shapes' is not published"):
        client.next_round("shapes", 2, "r2.pt")
    assert cli("add-images", "shapes", "--no-progress").exit_code == 0
    round1 = _batches(bus)
    with pytest.raises(MaskpropError, match=r"has rounds 1..2 \(\[budget\] rounds\): round 3"):
        client.next_round("shapes", 3, "r3.pt")
    with pytest.raises(CampaignNotFound):
        client.next_round("ghost", 2, "r2.pt")
    with pytest.raises(MaskpropError, match="admin token"):
        ControllerClient(controller, admin_token="wrong-token-of-some-length").next_round(
            "shapes", 2, "r2.pt"
        )
    assert "--weights must name" in one_error_line(cli("next-round", "shapes", "--weights", " "))
    assert len(_batches(bus)) == len(round1)  # nothing published by a refused call

    res = cli("next-round", "shapes", "--weights", "r2.pt", "--no-progress")
    assert res.exit_code == 0, res.output
    assert '"travels_as": "shapes.r2"' in res.output
    round2 = _batches(bus)[len(round1) :]
    assert len(round2) == len(round1) > 0
    assert {b.weights for b in round2} == {"r2.pt"}
    assert {b.campaign for b in round2} == {"shapes.r2"}
    assert [ref.uri for b in round2 for ref in b.images] == [
        ref.uri for b in round1 for ref in b.images
    ]
    again = client.next_round("shapes", 2, "r2.pt")  # a rerun resumes: nothing left to send
    assert again.done and again.published == again.batches == len(round1)
    assert len(_batches(bus)) == 2 * len(round1)
