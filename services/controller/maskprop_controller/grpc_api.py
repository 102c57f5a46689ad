"""gRPC adapter of the campaign registry: checks the admin token, validates requests, calls
:class:`maskprop_runtime.campaigns.CampaignRegistry`, maps its errors to status codes."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from maskprop.errors import MaskpropError
from maskprop_runtime.campaigns import (
    STATE_NAME,
    CampaignConflict,
    CampaignExists,
    CampaignNotFound,
    CampaignRegistry,
    spec_from_proto,
)
from maskprop_runtime.ingest import campaign_status
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2, campaign_pb2_grpc

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
    refused by the settings in prod) lets every caller in."""

    def __init__(self, registry: CampaignRegistry, *, admin_token: str | None) -> None:
        self.registry = registry
        self.admin_token = admin_token

    def _call(self, context: Any, fn: Callable[[], T]) -> T:
        if self.admin_token is not None:
            sent = dict(context.invocation_metadata()).get("authorization", "")
            expected = f"Bearer {self.admin_token}"
            if not hmac.compare_digest(sent.encode(), expected.encode()):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid admin token is required")
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
