from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from maskprop_gateway.api.deps import GatewayDep, VendorDep
from maskprop_gateway.api.errors import http_errors
from maskprop_gateway.api.routes.leases import ERRORS
from maskprop_gateway.idempotency import Stored
from maskprop_gateway.schemas import AnswersOut, AnswersRequest, answers_out

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
            description="Retries with the same key are applied once (first response "
            "replayed); a retry of a request whose gateway died takes the key over after "
            "a few seconds and applies what the first did not",
        ),
    ] = None,
) -> dict[str, Any]:
    """Answers of one worker for one lease: one answer per question; with an
        ``Idempotency-Key`` a retried request is applied once and gets the first response.

        The answers are recorded before the response; quality control and the labels they decide
        are applied shortly after, off the request (``GET /v1/progress`` shows them then).
        ``accepted``: answers recorded by this request (a retry's answers already recorded are
        ``duplicates``).  ``worker_status``: the worker's standing when the answers were recorded
        (``passed``, ``in_progress``, ``required``, ``failed`` or ``suspended``; a qualification
        lease's last answer
    already says whether the worker passed; a suspension these answers cause shows from
        the next request).  ``forwarded_to_search``: deprecated, always 0.  No field depends on
        which questions were hidden gold."""
    answers = [(a.question_id, a.answer, a.elapsed_ms) for a in body.answers]
    with http_errors():
        if idempotency_key is None:
            return answers_out(
                gateway.submit(vendor.vendor_id, body.lease_id, body.worker_id, answers)
            )
        idem, vid = gateway.idempotency, vendor.vendor_id
        fp = idem.fingerprint(body.model_dump())
        held = idem.begin(vid, idempotency_key, fp)
        if isinstance(held, Stored):
            response.status_code = held.status
            response.headers["Idempotent-Replayed"] = "true"
            return answers_out(held.body)  # (records stored before #18 carry a count)
        try:
            with idem.holding(vid, idempotency_key, held.owner):
                out = answers_out(
                    gateway.submit(
                        vid, body.lease_id, body.worker_id, answers, request_key=idempotency_key
                    )
                )
        except Exception:
            idem.abandon(vid, idempotency_key, held.owner)
            raise
        idem.finish(vid, idempotency_key, fp, 200, out, held.owner)
    return out  # validated against AnswersOut once, by FastAPI
