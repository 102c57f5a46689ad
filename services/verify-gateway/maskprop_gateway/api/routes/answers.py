from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from maskprop_gateway.api.deps import GatewayDep, VendorDep
from maskprop_gateway.api.errors import http_errors
from maskprop_gateway.api.routes.leases import ERRORS
from maskprop_gateway.idempotency import IdempotencyStore
from maskprop_gateway.schemas import AnswersOut, AnswersRequest

router = APIRouter(prefix="/v1/answers", tags=["answers"])


@router.post("", response_model=AnswersOut, responses={**ERRORS, 409: {}, 410: {}})
async def submit_answers(
    body: AnswersRequest,
    vendor: VendorDep,
    gateway: GatewayDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
            description="Retries with the same key are applied once (first response replayed)",
        ),
    ] = None,
) -> dict[str, Any]:
    """Answers of one worker for one lease: one answer per question; with an
    ``Idempotency-Key`` a retried request is applied once and gets the first response."""
    idem = gateway_idempotency(gateway)
    with http_errors():
        if idempotency_key is not None:
            fp = idem.fingerprint(body.model_dump())
            stored = idem.begin(vendor.vendor_id, idempotency_key, fp)
            if stored is not None:
                response.status_code = stored.status
                response.headers["Idempotent-Replayed"] = "true"
                return dict(stored.body)
        try:
            out = gateway.submit(
                vendor.vendor_id,
                body.lease_id,
                body.worker_id,
                [(a.question_id, a.answer, a.elapsed_ms) for a in body.answers],
            )
        except Exception:
            if idempotency_key is not None:
                idem.abandon(vendor.vendor_id, idempotency_key)
            raise
        if idempotency_key is not None:
            idem.finish(vendor.vendor_id, idempotency_key, fp, 200, out)
    return out  # validated against AnswersOut once, by FastAPI


def gateway_idempotency(gateway: GatewayDep) -> IdempotencyStore:
    return IdempotencyStore(gateway.r)
