"""Service commands of the ``maskprop`` CLI, registered on :data:`maskprop.cli.app`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from maskprop.cli import _Bars, _fail, app
from maskprop.errors import MaskpropError

export_app = typer.Typer(help="Export a propagated-label dataset.", no_args_is_help=True)
app.add_typer(export_app, name="export")


class Service(StrEnum):
    detector = "detector"
    clusterer = "clusterer"
    search = "search"
    sink = "sink"


@contextmanager
def user_errors(bars: _Bars | None = None) -> Iterator[None]:
    """Bad input, settings or connections, or a missing optional package, end a command in
    one ``error:`` line (exit 2), never a traceback; progress bars are closed first."""
    try:
        yield
    except (MaskpropError, ConnectionError) as exc:
        _fail(str(exc))
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"bad setting {'.'.join(str(x) for x in first['loc'])}: {first['msg']}")
    except ModuleNotFoundError as exc:
        _fail(f"{exc.name} is not installed: pip install -e '.[detector]'")
    finally:
        if bars is not None:
            bars.close()


@app.command()
def serve(name: Annotated[Service, typer.Argument(help="Which service to run.")]) -> None:
    """Run one service as its own process (settings from MASKPROP_* environment variables)."""
    import importlib

    with user_errors():
        importlib.import_module(f"maskprop_{name.value}.service").main()


@app.command()
def run(
    config: Annotated[
        Path, typer.Option(help="TOML file: [campaign] [pool] [annotator] [search].")
    ],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/run"),
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Run the whole pipeline in one process (embedded unless MASKPROP_KAFKA_BOOTSTRAP and
    MASKPROP_REDIS_URL point at real servers) and check it against the library."""
    from maskprop_runtime.embedded import RunConfig, run_pipeline
    from maskprop_runtime.settings import RuntimeSettings

    bars = _Bars(progress)
    with user_errors(bars):
        report = run_pipeline(RunConfig.load(config), out, RuntimeSettings(), progress=bars)
    typer.echo(json.dumps(report, indent=2))
    if report["matches_in_process_library"] is False or report["duplicate_labels"]:
        typer.echo("error: the pipeline's labels differ from the library's", err=True)
        sys.exit(1)


@export_app.command("coco")
def export_coco_cmd(
    dataset: Annotated[Path, typer.Option(help="The sink's dataset directory.")],
    campaign: Annotated[str, typer.Option(help="Campaign name.")],
    out: Annotated[Path, typer.Option(help="COCO instances JSON to write.")],
    include_rejected: Annotated[bool, typer.Option(help="Also export rejected masks.")] = False,
) -> None:
    """Stream a campaign's accepted labels into one COCO instances file (RLE masks)."""
    from maskprop_sink.coco import export_coco

    try:
        summary = export_coco(dataset, campaign, out, accepted_only=not include_rejected)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps(summary))


@app.command("feed-simulated")
def feed_simulated(
    campaign: Annotated[str, typer.Option(help="Campaign name.")],
    masks: Annotated[int, typer.Option(help="Masks in the simulated pool.")] = 20_000,
    classes: Annotated[int, typer.Option(help="Object classes.")] = 10,
    seed: Annotated[int, typer.Option(help="Pool seed.")] = 0,
    dim: Annotated[int, typer.Option(help="Feature dimension.")] = 32,
) -> None:
    """Publish a simulated detector's masks to the real broker (MASKPROP_KAFKA_BOOTSTRAP)."""
    from maskprop_detector.simulated import pool_events

    from maskprop.simulate.generator import ade_like_pool
    from maskprop_runtime import topics
    from maskprop_runtime.bus import make_bus
    from maskprop_runtime.settings import RuntimeSettings
    from maskprop_runtime.treestore import check_name

    try:
        check_name("campaign", campaign)
        settings = RuntimeSettings()
        if not settings.distributed:
            raise MaskpropError("feed-simulated needs MASKPROP_KAFKA_BOOTSTRAP (a real broker)")
        pool = ade_like_pool(masks, classes, seed=seed, dim=dim)
        bus = make_bus(settings.kafka_bootstrap, **settings.bus_options())
        producer = bus.producer()
        n = 0
        for key, ev in pool_events(pool, campaign):
            producer.send(topics.MASKS, key, ev.SerializeToString())
            n += 1
        producer.close()
    except (MaskpropError, ValueError, ConnectionError) as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps({"campaign": campaign, "masks": len(pool), "events": n}))


vendor_app = typer.Typer(help="Crowd vendors of the verify gateway.", no_args_is_help=True)
app.add_typer(vendor_app, name="vendor")
gold_app = typer.Typer(help="Hidden gold questions of the verify gateway.", no_args_is_help=True)
app.add_typer(gold_app, name="gold")


def _gateway_redis() -> tuple[Any, Any]:
    from maskprop_gateway.settings import GatewaySettings

    from maskprop_runtime.store import make_redis

    settings = GatewaySettings()
    if settings.redis_url is None:
        raise MaskpropError("set MASKPROP_REDIS_URL to the gateway's Redis")
    return settings, make_redis(settings.redis_url.get_secret_value(), connect_timeout_s=10)


@vendor_app.command("create")
def vendor_create(
    vendor_id: Annotated[str, typer.Argument(help="Short id: a-z 0-9 -")],
    name: Annotated[str, typer.Option(help="Display name.")] = "",
) -> None:
    """Register a vendor and print its API key once (only a hash is stored)."""
    from maskprop_gateway.auth import KeyStore

    try:
        settings, r = _gateway_redis()
        key = KeyStore(r, settings.key_pepper.get_secret_value()).create(
            vendor_id, name or vendor_id
        )
    except (MaskpropError, ValueError, ConnectionError, ValidationError) as exc:
        _fail(str(exc))
        return
    typer.echo(key)
    typer.echo("store this key now: it cannot be shown again (rotate it if lost)", err=True)


@vendor_app.command("rotate")
def vendor_rotate(vendor_id: Annotated[str, typer.Argument()]) -> None:
    """Replace a vendor's key; the old key stops working at once."""
    from maskprop_gateway.auth import KeyStore

    try:
        settings, r = _gateway_redis()
        key = KeyStore(r, settings.key_pepper.get_secret_value()).rotate(vendor_id)
    except (MaskpropError, ValueError, ConnectionError, ValidationError) as exc:
        _fail(str(exc))
        return
    typer.echo(key)


@vendor_app.command("webhook")
def vendor_webhook(
    vendor_id: Annotated[str, typer.Argument()],
    url: Annotated[str, typer.Argument(help="https URL that receives signed callbacks")],
    rotate_secret: Annotated[bool, typer.Option(help="Issue a new signing secret.")] = False,
) -> None:
    """Set where a vendor's callbacks (lease.expired, batch.finished) go; prints the signing
    secret (Standard Webhooks).  Only admins run this: the gateway never takes a URL from an
    API caller."""
    from maskprop_gateway.webhooks import set_webhook

    try:
        _settings, r = _gateway_redis()
        secret = set_webhook(vendor_id, url, rotate_secret=rotate_secret, redis=r)
    except (MaskpropError, ValueError, ConnectionError, ValidationError) as exc:
        _fail(str(exc))
        return
    typer.echo(secret)


@gold_app.command("import")
def gold_import(
    path: Annotated[
        Path,
        typer.Argument(
            help="JSONL: gold_id, campaign, class_name, image, mask {size, counts}, answer"
        ),
    ],
) -> None:
    """Load hidden gold questions (their answers never leave the gateway)."""
    from maskprop_gateway.app import policy_from
    from maskprop_gateway.goldfile import read_gold
    from maskprop_gateway.quality import QualityControl

    try:
        settings, r = _gateway_redis()
        items = read_gold(path)
        n = QualityControl(r, policy_from(settings)).import_gold(items)
    except (MaskpropError, ValueError, OSError, ValidationError) as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps({"imported": n}))
