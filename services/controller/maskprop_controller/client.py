"""A client of the campaign controller with the registry's interface, for the CLI: errors
come back as the registry's exceptions, so callers handle one set."""

from __future__ import annotations

from typing import Any

import grpc

from maskprop.campaign_spec import CampaignSpec
from maskprop.errors import MaskpropError
from maskprop_runtime.campaigns import (
    STATE_PB,
    CampaignConflict,
    CampaignExists,
    CampaignNotFound,
    spec_to_proto,
)
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2, campaign_pb2_grpc

ERRORS: dict[grpc.StatusCode, type[MaskpropError]] = {
    grpc.StatusCode.NOT_FOUND: CampaignNotFound,
    grpc.StatusCode.ALREADY_EXISTS: CampaignExists,
    grpc.StatusCode.FAILED_PRECONDITION: CampaignConflict,
    grpc.StatusCode.INVALID_ARGUMENT: MaskpropError,
    grpc.StatusCode.UNAUTHENTICATED: MaskpropError,
}


class ControllerClient:
    """``target``: ``host:port`` of the controller; ``admin_token`` sent as a bearer token."""

    def __init__(
        self, target: str, *, admin_token: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = campaign_pb2_grpc.CampaignControllerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self.timeout_s = timeout_s
        self.target = target

    def _call(self, method: Any, request: Any, *, deadline: bool = True) -> Any:
        try:
            timeout = self.timeout_s if deadline else None
            return method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            kind = ERRORS.get(exc.code())
            if kind is not None:
                raise kind(exc.details()) from None
            raise ConnectionError(
                f"campaign controller at {self.target}: {exc.code().name}: {exc.details()}"
            ) from None

    def create(self, spec: CampaignSpec) -> campaign_pb2.Campaign:
        request = campaign_pb2.CreateCampaignRequest(spec=spec_to_proto(spec))
        return self._call(self.stub.CreateCampaign, request)

    def revise(self, spec: CampaignSpec) -> campaign_pb2.Campaign:
        request = campaign_pb2.ReviseCampaignRequest(spec=spec_to_proto(spec))
        return self._call(self.stub.ReviseCampaign, request)

    def list(self) -> list[campaign_pb2.Campaign]:
        response = self._call(self.stub.ListCampaigns, campaign_pb2.ListCampaignsRequest())
        return list(response.campaigns)

    def status(self, name: str) -> campaign_pb2.CampaignStatus:
        return self._call(self.stub.GetStatus, campaign_pb2.GetStatusRequest(name=name))

    def set_state(self, name: str, state: str) -> campaign_pb2.Campaign:
        if state not in STATE_PB:
            raise MaskpropError(f"a campaign cannot be set {state!r}")
        request = campaign_pb2.SetStateRequest(name=name, state=STATE_PB[state])
        return self._call(self.stub.SetState, request)

    def next_round(self, name: str, round_: int, weights: str) -> campaign_pb2.NextRoundResponse:
        """Publish round ``round_`` (returns once published; no deadline: a round publishes at
        a bounded rate)."""
        request = campaign_pb2.NextRoundRequest(name=name, round=round_, weights=weights)
        return self._call(self.stub.NextRound, request, deadline=False)

    def close(self) -> None:
        self.channel.close()
