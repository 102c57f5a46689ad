"""The campaign controller process: the campaign registry (specs, versions, states, status)
served on gRPC ``maskprop.campaign.v1.CampaignController``, state in Redis.

It holds no state of its own (any number of replicas), and nothing else needs it: every
service reads the registry in Redis directly.  It exists so people and tools manage campaigns
with an admin token instead of Redis credentials."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, SecretStr, model_validator

from maskprop_controller.grpc_api import ControllerServicer
from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2_grpc
from maskprop_runtime.server import (
    build_server,
    entrypoint,
    listen,
    serve_until,
    start_service,
)
from maskprop_runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "maskprop.campaign.v1.CampaignController"


class ControllerSettings(RuntimeSettings):
    # Bearer token every call must carry; required in prod (MASKPROP_CONTROLLER_ADMIN_TOKEN).
    controller_admin_token: SecretStr | None = None
    controller_grpc_workers: int = Field(default=2, ge=1)
    # NextRound's pace: image batches published a second at most (as add-images').
    ingest_batches_per_s: float = Field(default=20.0, gt=0)

    @model_validator(mode="after")
    def _token_in_prod(self) -> ControllerSettings:
        if self.env == "prod" and self.controller_admin_token is None:
            raise ValueError(
                "MASKPROP_ENV=prod needs MASKPROP_CONTROLLER_ADMIN_TOKEN: the controller "
                "creates and stops campaigns"
            )
        token = self.controller_admin_token
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("MASKPROP_CONTROLLER_ADMIN_TOKEN must be at least 16 characters")
        return self


def build_controller(
    settings: ControllerSettings, redis: Any, bus: Any = None
) -> ControllerServicer:
    """The servicer; with ``bus`` its ``NextRound`` publishes rounds on it."""
    token = settings.controller_admin_token
    return ControllerServicer(
        CampaignRegistry(redis),
        admin_token=token.get_secret_value() if token else None,
        producer=bus.producer() if bus is not None else None,
        batches_per_s=settings.ingest_batches_per_s,
    )


@entrypoint
def main() -> None:
    settings = ControllerSettings()
    run = start_service(settings, "controller")
    servicer = build_controller(settings, run.redis, run.bus)
    server, health = build_server(
        lambda s: campaign_pb2_grpc.add_CampaignControllerServicer_to_server(servicer, s),
        [SERVICE_NAME],
        workers=settings.controller_grpc_workers,
    )
    port = listen(server, settings.grpc_host, settings.grpc_port)
    server.start()
    log.info("controller started", extra={"grpc_port": port})
    serve_until(server, health, run.stop)
