"""gRPC adapter of the campaign registry: checks the admin token, validates requests, calls
:class:`maskprop_runtime.campaigns.CampaignRegistry`, maps its errors to status codes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from maskprop.errors import MaskpropError
from maskprop_controller.rounds import publish_next_round
from maskprop_runtime.bus import Producer
from maskprop_runtime.campaigns import (
    STATE_NAME,
    CampaignConflict,
    CampaignExists,
    CampaignNotFound,
    CampaignRegistry,
    round_campaign,
    spec_from_proto,
)
from maskprop_runtime.ingest import campaign_status
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2, campaign_pb2_grpc
from maskprop_runtime.server import require_bearer

T = TypeVar("T")
# Most specific first: every CampaignError is a MaskpropError.
CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (CampaignNotFound, grpc.StatusCode.NOT_FOUND),
    (CampaignExists, grpc.StatusCode.ALREADY_EXISTS),
    (CampaignConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (MaskpropError, grpc.StatusCode.INVALID_ARGUMENT),
)


def _abort(context: Any, exc: Exception) -> NoReturn:
    code = next(c for kind, c in CODES if isinstance(exc, kind))
    context.abort(code, str(exc))
    raise AssertionError("unreachable: abort raises")


class ControllerServicer(campaign_pb2_grpc.CampaignControllerServicer):
    """``admin_token``: callers send ``authorization: Bearer <token>``; ``None`` (dev only,
    refused by the settings in prod) lets every caller in.  ``producer``: where ``NextRound``
    publishes a round's image batches (none: ``NextRound`` is refused), at most
    ``batches_per_s``."""

    def __init__(
        self,
        registry: CampaignRegistry,
        *,
        admin_token: str | None,
        producer: Producer | None = None,
        batches_per_s: float = 20.0,
    ) -> None:
        self.registry = registry
        self.admin_token = admin_token
        self.producer = producer
        self.batches_per_s = batches_per_s

    def _call(self, context: Any, fn: Callable[[], T]) -> T:
        require_bearer(context, self.admin_token)
        try:
            return fn()
        except MaskpropError as exc:
            _abort(context, exc)

    def CreateCampaign(self, request: Any, context: Any) -> campaign_pb2.Campaign:
        return self._call(context, lambda: self.registry.create(spec_from_proto(request.spec)))

    def ReviseCampaign(self, request: Any, context: Any) -> campaign_pb2.Campaign:
        return self._call(context, lambda: self.registry.revise(spec_from_proto(request.spec)))

    def ListCampaigns(self, request: Any, context: Any) -> campaign_pb2.ListCampaignsResponse:
        return self._call(
            context, lambda: campaign_pb2.ListCampaignsResponse(campaigns=self.registry.list())
        )

    def GetStatus(self, request: Any, context: Any) -> campaign_pb2.CampaignStatus:
        return self._call(context, lambda: campaign_status(self.registry, request.name))

    def SetState(self, request: Any, context: Any) -> campaign_pb2.Campaign:
        def set_state() -> campaign_pb2.Campaign:
            if request.state not in STATE_NAME:
                raise MaskpropError(f"unknown campaign state {request.state}")
            return self.registry.set_state(request.name, STATE_NAME[request.state])

        return self._call(context, set_state)

    def NextRound(self, request: Any, context: Any) -> campaign_pb2.NextRoundResponse:
        def next_round() -> campaign_pb2.NextRoundResponse:
            if self.producer is None:
                raise MaskpropError("this controller has no broker to publish a round on")
            plan = publish_next_round(
                self.registry, request.name, request.round, request.weights, self.producer,
                batches_per_s=self.batches_per_s,
            )  # fmt: skip
            return campaign_pb2.NextRoundResponse(
                campaign=request.name, round=request.round,
                travels_as=round_campaign(request.name, request.round), weights=request.weights,
                batches=plan.batch_count, published=plan.published, done=plan.done,
            )  # fmt: skip

        return self._call(context, next_round)
