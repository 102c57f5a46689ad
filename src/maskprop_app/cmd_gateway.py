"""Admin commands of the verify gateway: ``vendor create|rotate|webhook`` and ``gold import``,
run against the gateway's Redis (MASKPROP_REDIS_URL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from maskprop.errors import MaskpropError
from maskprop_app.console import fail

vendor_app = typer.Typer(help="Crowd vendors of the verify gateway.", no_args_is_help=True)
gold_app = typer.Typer(help="Hidden gold questions of the verify gateway.", no_args_is_help=True)


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
        fail(str(exc))
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
        fail(str(exc))
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
        fail(str(exc))
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
        fail(str(exc))
    typer.echo(json.dumps({"imported": n}))
