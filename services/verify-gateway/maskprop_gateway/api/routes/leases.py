from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, HTTPException, Response

from maskprop_gateway.api.deps import GatewayDep, VendorDep
from maskprop_gateway.api.errors import call, http_errors
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.images import ImageMissing, image_path, overlay_png
from maskprop_gateway.schemas import LEASE, QUESTION, ErrorOut, LeaseOut, LeaseRequest, LeaseStatus

router = APIRouter(prefix="/v1/leases", tags=["leases"])
# 400: a body that is not JSON at all (FastAPI's parser), 422: JSON that breaks the schema.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 422, 429, 503)
}
PNG: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "The image"},
}
_CACHE = {"Cache-Control": "private, max-age=3600"}


@router.post("", status_code=201, response_model=LeaseOut, responses=ERRORS)
async def create_lease(body: LeaseRequest, vendor: VendorDep, gateway: GatewayDep) -> Response:
    """Lease questions for one of the vendor's workers.  A new worker first gets a
    qualification lease; hidden gold questions are mixed into work leases."""
    with http_errors():
        offer = await gateway.create_lease_on_loop(
            vendor.vendor_id, body.worker_id, body.campaign, body.max_questions
        )
    # Serialized by the gateway, not validated against LeaseOut by FastAPI: it builds every
    # field from checked parts, views rendered once (maskprop_gateway.views), and a model
    # instance per question was the largest single cost of the hottest route (LeaseOut stays
    # the documented schema; tests hold the body to it).
    return Response(offer.to_json(), status_code=201, media_type="application/json")


@router.get("/{lease_id}", response_model=LeaseStatus, responses=ERRORS)
async def get_lease(lease_id: str, vendor: VendorDep, gateway: GatewayDep) -> LeaseStatus:
    """A lease of this vendor (another vendor's lease is 404)."""
    _check(LEASE, lease_id)
    rec = call(lambda: gateway.lease(vendor.vendor_id, lease_id))
    return LeaseStatus(
        lease_id=lease_id,
        kind=rec["kind"],
        campaign=rec["campaign"],
        worker_id=rec["worker"],
        expires_at=float(rec["expires"]),
        questions=len(rec["refs"]),
        answered=gateway.answered_count(lease_id),
    )


@router.get("/{lease_id}/questions/{question_id}/image", responses=PNG, response_class=Response)
def question_image(
    lease_id: str, question_id: str, vendor: VendorDep, gateway: GatewayDep
) -> Response:
    """The question's image, from the gateway's own image store."""
    return image_response(gateway, vendor.vendor_id, lease_id, question_id)


@router.get("/{lease_id}/questions/{question_id}/overlay", responses=PNG, response_class=Response)
def question_overlay(
    lease_id: str, question_id: str, vendor: VendorDep, gateway: GatewayDep
) -> Response:
    """A transparent PNG of the mask to stack on the image."""
    return overlay_response(gateway, vendor.vendor_id, lease_id, question_id)


def _check(pattern: str, value: str) -> None:
    if re.match(pattern, value) is None:
        raise HTTPException(404, "not found")


def image_response(gateway: Gateway, vendor_id: str, lease_id: str, oid: str) -> Response:
    _check(LEASE, lease_id)
    _check(QUESTION, oid)
    with http_errors():
        view = gateway.item_view(vendor_id, lease_id, oid)
        campaign = gateway.lease(vendor_id, lease_id)["campaign"]
    try:
        path = image_path(
            gateway.settings.image_root,
            campaign,
            view.image_file,
            gateway.campaigns.root(campaign),
        )
    except ImageMissing:
        raise HTTPException(404, "image not in the gateway's image store") from None
    media = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return Response(path.read_bytes(), media_type=media, headers=_CACHE)


def overlay_response(gateway: Gateway, vendor_id: str, lease_id: str, oid: str) -> Response:
    _check(LEASE, lease_id)
    _check(QUESTION, oid)
    with http_errors():
        view = gateway.item_view(vendor_id, lease_id, oid)
    return Response(
        overlay_png(view.rle_h, view.rle_w, view.rle_counts), media_type="image/png", headers=_CACHE
    )
