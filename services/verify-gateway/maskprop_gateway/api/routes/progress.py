from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from maskprop_gateway.api.deps import GatewayDep, VendorDep
from maskprop_gateway.api.errors import call
from maskprop_gateway.api.routes.leases import ERRORS
from maskprop_gateway.schemas import CAMPAIGN, ProgressOut

router = APIRouter(prefix="/v1/progress", tags=["operations"])


@router.get("", response_model=ProgressOut, responses=ERRORS)
def progress(
    campaign: Annotated[str, Query(pattern=CAMPAIGN)], vendor: VendorDep, gateway: GatewayDep
) -> ProgressOut:
    """Per class: clusters accepted/rejected/open, masks obtained, questions answered,
    estimated hours and cost."""
    return ProgressOut.model_validate(call(lambda: gateway.progress(campaign)))
