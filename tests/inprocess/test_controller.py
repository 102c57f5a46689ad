"""The campaign controller served on a real gRPC port over fakeredis: its client and the CLI
(``MASKPROP_CONTROLLER_ADDR``) create, list, inspect and pause campaigns; errors keep their
kind; without the admin token nothing happens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from maskprop_controller.client import ControllerClient
from maskprop_controller.service import ControllerSettings, build_controller
from pydantic import ValidationError
from typer.testing import CliRunner

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop_app.cli import app
from maskprop_runtime.campaigns import (
    CampaignConflict,
    CampaignExists,
    CampaignNotFound,
    CampaignRegistry,
)
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2, campaign_pb2_grpc
from maskprop_runtime.server import build_server

TOKEN = "an-admin-token-of-some-length"


def spec(name: str = "shapes", **kw: Any) -> CampaignSpec:
    return CampaignSpec(
        name=name,
        classes=("circle", "square"),
        images_root=Path("/data/pool"),
        detector_weights=Path("/models/d.pt"),
        budget=Budget(questions=100),
        **kw,
    )


@pytest.fixture
def controller() -> Iterator[tuple[str, Any]]:
    """(address, redis) of a controller on a free local port."""
    redis = fakeredis.FakeRedis()
    servicer = build_controller(ControllerSettings(controller_admin_token=TOKEN), redis)
    server, _ = build_server(
        lambda s: campaign_pb2_grpc.add_CampaignControllerServicer_to_server(servicer, s),
        ["maskprop.campaign.v1.CampaignController"],
        workers=2,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", redis
    server.stop(0)


def test_client_manages_campaigns_in_the_registry(controller: tuple[str, Any]) -> None:
    addr, redis = controller
    client = ControllerClient(addr, admin_token=TOKEN)
    made = client.create(spec(params=AnnotationParams(accept_threshold=0.9)))
    assert made.spec.version == 1 and made.state == campaign_pb2.CAMPAIGN_STATE_CREATED
    assert CampaignRegistry(redis).spec("shapes").params.accept_threshold == 0.9
    client.create(spec("other"))
    assert [c.spec.name for c in client.list()] == ["shapes", "other"]
    assert client.set_state("shapes", "paused").state == campaign_pb2.CAMPAIGN_STATE_PAUSED
    status = client.status("shapes")
    assert status.campaign.spec.name == "shapes"
    assert {s.stage for s in status.stages} >= {"batches published", "classes in search"}
    with pytest.raises(CampaignExists, match="'shapes' exists"):
        client.create(spec())
    with pytest.raises(CampaignNotFound, match="no campaign named 'ghost'"):
        client.status("ghost")
    with pytest.raises(CampaignConflict, match="must say version = 2"):
        client.revise(spec(params=AnnotationParams(accept_threshold=0.95)))
    client.set_state("shapes", "stopped")
    with pytest.raises(CampaignConflict, match="is stopped"):
        client.set_state("shapes", "running")
    with pytest.raises(MaskpropError, match="must be 1-64 characters"):
        client.status("../x")
    client.close()


def test_calls_without_the_admin_token_are_refused(controller: tuple[str, Any]) -> None:
    addr, redis = controller
    for token in (None, "wrong-token-wrong-token"):
        client = ControllerClient(addr, admin_token=token)
        with pytest.raises(MaskpropError, match="admin token"):
            client.create(spec())
        with pytest.raises(MaskpropError, match="admin token"):
            client.list()
    assert redis.keys("*") == []


def test_prod_needs_a_token() -> None:
    with pytest.raises(ValidationError, match="CONTROLLER_ADMIN_TOKEN"):
        ControllerSettings(env="prod", kafka_bootstrap="k:9092", redis_url="redis://r:6379/0")
    with pytest.raises(ValidationError, match="at least 16"):
        ControllerSettings(controller_admin_token="short")


def test_cli_goes_through_the_controller_when_told(
    controller: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    addr, redis = controller
    monkeypatch.setenv("MASKPROP_CONTROLLER_ADDR", addr)
    monkeypatch.setenv("MASKPROP_CONTROLLER_ADMIN_TOKEN", TOKEN)
    monkeypatch.delenv("MASKPROP_REDIS_URL", raising=False)  # the CLI needs no Redis for these
    (tmp_path / "images").mkdir()
    (tmp_path / "d.pt").write_bytes(b"w")
    path = tmp_path / "spec.toml"
    path.write_text(
        '[campaign]\nname = "cli"\nclasses = ["a"]\nimages = "images"\n'
        '[detector]\nweights = "d.pt"\n[budget]\ndollars = 50.0\n'
    )
    runner = CliRunner()
    res = runner.invoke(app, ["campaign", "create", "--spec", str(path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["budget"]["dollars"] == 50.0
    assert CampaignRegistry(redis).state("cli") == "created"
    assert runner.invoke(app, ["campaign", "pause", "cli"]).output.strip() == "cli: paused"
    res = runner.invoke(app, ["campaign", "create", "--spec", str(path)])
    assert res.exit_code == 2 and res.output.startswith("error: campaign 'cli' exists")
    monkeypatch.setenv("MASKPROP_CONTROLLER_ADMIN_TOKEN", "wrong-token-wrong-token")
    res = runner.invoke(app, ["campaign", "list"])
    assert res.exit_code == 2 and "admin token" in res.output
