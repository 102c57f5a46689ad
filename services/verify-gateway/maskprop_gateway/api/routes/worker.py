"""The annotator page's API: the same leases and answers as the vendor routes, authenticated by
a signed worker token (``X-Worker-Token`` header, or ``?token=`` for image sources) that binds
vendor, worker and campaign, so the page never holds the vendor's key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import FileResponse
from pydantic import Field

from maskprop_gateway.api.deps import GatewayDep, WorkerDep
from maskprop_gateway.api.errors import call, http_errors
from maskprop_gateway.api.routes.leases import ERRORS, PNG, image_response, overlay_response
from maskprop_gateway.auth import WorkerClaims
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.schemas import LEASE, AnswerIn, AnswersOut, LeaseOut, Strict, answers_out

router = APIRouter(prefix="/v1/worker", tags=["worker"])
page = APIRouter(include_in_schema=False)

#: The annotator page's files (served at /annotate and /static/...).
STATIC = Path(__file__).resolve().parents[2] / "static"
# The page runs inside vendors' iframes (so no X-Frame-Options) and loads nothing foreign.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors *",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class WorkerLeaseRequest(Strict):
    max_questions: int = Field(default=10, ge=1, le=50, strict=True)


class WorkerAnswersRequest(Strict):
    lease_id: str = Field(pattern=LEASE)
    answers: list[AnswerIn] = Field(min_length=1, max_length=200)


@router.post("/lease", status_code=201, response_model=LeaseOut, responses=ERRORS)
async def create_lease(
    body: WorkerLeaseRequest, claims: WorkerDep, gateway: GatewayDep
) -> Response:
    """Lease questions for the token's worker and campaign (a qualification lease first)."""
    with http_errors():
        offer = await gateway.create_lease_on_loop(
            claims.vendor_id, claims.worker_id, claims.campaign, body.max_questions
        )
    # The page already holds a token; minting a fresh one here would let a worker outlive
    # the expiry its vendor chose.  Image URLs point at the token-authenticated routes.
    offer.worker_token = None
    return Response(
        offer.to_json("/v1/worker/leases"), status_code=201, media_type="application/json"
    )


@router.post("/answers", response_model=AnswersOut, responses={**ERRORS, 410: {}})
async def submit_answers(
    body: WorkerAnswersRequest, claims: WorkerDep, gateway: GatewayDep
) -> AnswersOut:
    """Answers of the token's worker for one of its leases (one answer per question; a
    resubmitted answer counts as a duplicate, so retries are safe)."""
    out = call(
        lambda: gateway.submit(
            claims.vendor_id,
            body.lease_id,
            claims.worker_id,
            [(a.question_id, a.answer, a.elapsed_ms) for a in body.answers],
        )
    )
    return AnswersOut.model_validate(answers_out(out))


@router.get(
    "/leases/{lease_id}/questions/{question_id}/image", responses=PNG, response_class=Response
)
def question_image(
    lease_id: str, question_id: str, claims: WorkerDep, gateway: GatewayDep
) -> Response:
    """The question's image (only from one of the token's own leases)."""
    _own_lease(gateway, claims, lease_id)
    return image_response(gateway, claims.vendor_id, lease_id, question_id)


@router.get(
    "/leases/{lease_id}/questions/{question_id}/overlay", responses=PNG, response_class=Response
)
def question_overlay(
    lease_id: str, question_id: str, claims: WorkerDep, gateway: GatewayDep
) -> Response:
    """A transparent PNG of the mask to stack on the image."""
    _own_lease(gateway, claims, lease_id)
    return overlay_response(gateway, claims.vendor_id, lease_id, question_id)


@page.get("/annotate")
def annotate() -> FileResponse:
    """The annotator page.  It carries no data: the worker token arrives in the URL fragment
    (``/annotate#token=...``), which browsers never send to the server."""
    return FileResponse(STATIC / "annotate.html", media_type="text/html", headers=_PAGE_HEADERS)


def _own_lease(gateway: Gateway, claims: WorkerClaims, lease_id: str) -> None:
    if re.match(LEASE, lease_id) is None:
        raise HTTPException(404, "not found")
    # Another worker's lease of the same vendor is 404, as another vendor's lease is.
    rec: dict[str, Any] = call(lambda: gateway.lease(claims.vendor_id, lease_id))
    if rec["worker"] != claims.worker_id or rec["campaign"] != claims.campaign:
        raise HTTPException(404, "no such lease")
