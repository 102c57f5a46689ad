"""``campaign export`` over the sink's gRPC ``Dataset`` service (a real gRPC server on
127.0.0.1): the file equals the local export, chunked, checked by sha256, authenticated, and
every refusal is one clear error with no file left behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from maskprop_sink import grpc_api
from maskprop_sink.campaign_export import export_campaign
from maskprop_sink.client import export_over_grpc
from maskprop_sink.grpc_api import DatasetServicer
from typer.testing import CliRunner

from maskprop.errors import MaskpropError
from maskprop_app.cli import app
from maskprop_runtime.pb.maskprop.sink.v1 import sink_pb2, sink_pb2_grpc
from maskprop_runtime.server import build_server, free_port, listen

TOKEN = "t" * 24


@pytest.fixture
def serve(dataset: Any) -> Iterator[Any]:
    """start(servicer=None) -> host:port of a sink Dataset server on the fixture's dataset."""
    servers: list[grpc.Server] = []

    def start(servicer: DatasetServicer | None = None) -> str:
        servicer = servicer or DatasetServicer(dataset[0], admin_token=TOKEN)
        server, _ = build_server(
            lambda s: sink_pb2_grpc.add_DatasetServicer_to_server(servicer, s),
            [grpc_api.SERVICE_NAME],
            workers=2,
        )
        port = listen(server, "127.0.0.1", free_port())
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def _doc(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    doc["info"].pop("date_created")
    return doc


@pytest.mark.parametrize("keep_duplicates", [False, True])
def test_grpc_export_equals_the_local_export(
    tmp_path: Path, dataset: Any, serve: Any, monkeypatch: pytest.MonkeyPatch,
    keep_duplicates: bool,
) -> None:  # fmt: skip
    monkeypatch.setattr(grpc_api, "CHUNK_BYTES", 97)  # many chunks, a short last one
    target = serve()
    local = export_campaign(
        dataset[0], "shapes", tmp_path / "local.json", deduplicate_rounds=not keep_duplicates
    )
    remote = export_over_grpc(
        target, "shapes", tmp_path / "remote.json", admin_token=TOKEN,
        keep_duplicates=keep_duplicates,
    )  # fmt: skip
    assert remote == local
    assert (tmp_path / "remote.json").stat().st_size > 5 * 97
    assert _doc(tmp_path / "remote.json") == _doc(tmp_path / "local.json")


def test_the_cli_exports_through_the_sink_when_its_address_is_set(
    tmp_path: Path, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = serve()
    monkeypatch.setenv("MASKPROP_SINK_ADDR", target)
    monkeypatch.setenv("MASKPROP_SINK_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("MASKPROP_DATASET_DIR", str(tmp_path / "nowhere"))  # not read
    out = tmp_path / "cli.json"
    res = CliRunner().invoke(app, ["campaign", "export", "shapes", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["annotations"] == 5
    assert len(json.loads(out.read_text())["annotations"]) == 5
    res = CliRunner().invoke(app, ["campaign", "export", "ghost", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: sink at {target}: NOT_FOUND: no labels of campaign 'ghost' under "
        f"{tmp_path / 'dataset'} (the sink's MASKPROP_DATASET_DIR)"
    ]
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    ("name", "token", "code"),
    [
        ("shapes", None, "UNAUTHENTICATED"),
        ("shapes", "x" * 24, "UNAUTHENTICATED"),
        ("ghost", TOKEN, "NOT_FOUND"),
        ("../etc", TOKEN, "INVALID_ARGUMENT"),
    ],
)
def test_refusals_leave_no_file(
    tmp_path: Path, serve: Any, name: str, token: str | None, code: str
) -> None:
    target = serve()
    out = tmp_path / "out" / "x.json"
    with pytest.raises(MaskpropError, match=f"sink at {target}: {code}: "):
        export_over_grpc(target, name, out, admin_token=token)
    assert list(out.parent.iterdir()) == []


def test_a_busy_sink_says_so(tmp_path: Path, dataset: Any, serve: Any) -> None:
    servicer = DatasetServicer(dataset[0], admin_token=None, max_exports=1)
    target = serve(servicer)
    assert servicer._slots.acquire(blocking=False)  # an export in flight
    with pytest.raises(MaskpropError, match="RESOURCE_EXHAUSTED: the sink is running an export"):
        export_over_grpc(target, "shapes", tmp_path / "x.json")
    servicer._slots.release()
    assert export_over_grpc(target, "shapes", tmp_path / "x.json")["annotations"] == 5


def test_a_damaged_stream_is_refused(tmp_path: Path, dataset: Any, serve: Any) -> None:
    class Damaging(DatasetServicer):
        def ExportCampaign(self, request: Any, context: Any) -> Iterator[Any]:
            for chunk in super().ExportCampaign(request, context):
                if chunk.data:
                    chunk = sink_pb2.ExportChunk(data=chunk.data[:-1] + b"?")
                yield chunk

    target = serve(Damaging(dataset[0], admin_token=None))
    out = tmp_path / "out" / "x.json"
    with pytest.raises(MaskpropError, match="arrived damaged"):
        export_over_grpc(target, "shapes", out)
    assert list(out.parent.iterdir()) == []


def test_prod_needs_a_sink_token_to_serve_but_not_to_read_the_dataset(tmp_path: Path) -> None:
    from maskprop_sink.service import ServingSinkSettings, SinkSettings

    base = {"env": "prod", "kafka_bootstrap": "k:9092", "redis_url": "redis://r:6379/0"}
    with pytest.raises(ValueError, match="MASKPROP_SINK_ADMIN_TOKEN"):
        ServingSinkSettings(**base)
    with pytest.raises(ValueError, match="at least 16 characters"):
        ServingSinkSettings(**base, sink_admin_token="short")
    assert ServingSinkSettings(**base, sink_admin_token=TOKEN).sink_admin_token is not None
    # The CLI (`campaign export --out F` on the volume, the autopilot) serves nothing.
    assert SinkSettings(**base, dataset_dir=tmp_path).dataset_dir == tmp_path


def test_an_export_too_large_for_its_memory_cap_fails_alone(
    tmp_path: Path, dataset: Any, serve: Any
) -> None:
    """The export runs in a child process under MASKPROP_SINK_EXPORT_MEMORY_LIMIT_MB: past it
    the call fails RESOURCE_EXHAUSTED, no file is left, and the same sink serves the next
    export (the sink process itself never grew)."""
    servicer = DatasetServicer(dataset[0], admin_token=None, memory_limit_mb=64)
    target = serve(servicer)
    out = tmp_path / "out" / "x.json"
    with pytest.raises(MaskpropError, match="RESOURCE_EXHAUSTED: the export needs more than 64 MB"):
        export_over_grpc(target, "shapes", out)
    assert list(out.parent.iterdir()) == []
    servicer.memory_limit_mb = None
    assert export_over_grpc(target, "shapes", out)["annotations"] == 5


def test_a_caller_that_leaves_stops_the_export_and_frees_the_slot(
    dataset: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing

    class Gone:  # a call cancelled (or past its deadline) while the export runs
        def is_active(self) -> bool:
            return False

        def abort(self, code: Any, details: str) -> None:
            raise AssertionError(f"aborted {code}: {details}")

    monkeypatch.setattr(grpc_api, "POLL_S", 0.001)  # the child cannot finish in 1 ms
    servicer = DatasetServicer(dataset[0], admin_token=None)
    request = sink_pb2.ExportCampaignRequest(name="shapes")
    # other tests in this process may leave pool workers alive: only the export child counts
    before = {p.pid for p in multiprocessing.active_children()}
    assert list(servicer.ExportCampaign(request, Gone())) == []  # nothing streamed
    after = {p.pid for p in multiprocessing.active_children()}
    assert after <= before  # the export child was killed and reaped
    assert servicer._slots.acquire(blocking=False)  # the slot is free again
