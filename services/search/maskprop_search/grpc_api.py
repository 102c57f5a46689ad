"""gRPC adapter: validates requests, calls :class:`SearchCore`, maps errors to status codes."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from maskprop_runtime.metrics import RPC_SECONDS
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc
from maskprop_runtime.treestore import check_name
from maskprop_search.core import CallerGone, SearchCore
from maskprop_search.wire import BadRequest

log = logging.getLogger(__name__)

MAX_BATCH = 1000
#: Top-ups one SubmitAnswers call may carry (one a campaign of its answers).
MAX_TOP_UPS = 100
#: A lease commits only while at least this much of its caller's deadline is left: the
#: response still has to reach the caller (issue #15).
COMMIT_MARGIN_S = 0.5


def _campaign(context: Any, campaign: str) -> str:
    try:
        return check_name("campaign", campaign)
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise  # unreachable: abort raises


def _answer_by(context: Any) -> float | None:
    """The ``time.monotonic()`` by which a call's leases must commit (None: no deadline)."""
    remaining = context.time_remaining()  # infinite for a deadline-less call
    return None if remaining > 1e9 else time.monotonic() + remaining - COMMIT_MARGIN_S


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, core: SearchCore) -> None:
        self.core = core

    def LeaseQuestions(self, request: Any, context: Any) -> search_pb2.LeaseQuestionsResponse:
        started = time.perf_counter()
        campaign = _campaign(context, request.campaign)
        if not 1 <= request.max_questions <= MAX_BATCH:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_questions must be 1..{MAX_BATCH}")
        answer_by = _answer_by(context)
        try:
            qs, done = self.core.lease(
                campaign, request.max_questions, request.lease_owner, answer_by=answer_by
            )
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except CallerGone as exc:
            log.warning("lease not committed: its caller's deadline passed: %s", exc)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        RPC_SECONDS.labels("LeaseQuestions").observe(time.perf_counter() - started)
        return search_pb2.LeaseQuestionsResponse(questions=qs, campaign_done=done)

    def SubmitAnswers(self, request: Any, context: Any) -> search_pb2.SubmitAnswersResponse:
        started = time.perf_counter()
        if not 1 <= len(request.answers) <= MAX_BATCH:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"send 1..{MAX_BATCH} answers")
        if len(request.top_ups) > MAX_TOP_UPS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"send 0..{MAX_TOP_UPS} top-ups")
        top_ups: dict[str, int] = {}
        for t in request.top_ups:
            campaign = _campaign(context, t.campaign)
            if not 1 <= t.max_questions <= MAX_BATCH or campaign in top_ups:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a top-up asks 1..{MAX_BATCH} questions, one top-up a campaign",
                )
            top_ups[campaign] = t.max_questions
        answer_by = _answer_by(context) if top_ups else None
        try:
            applied, dup, stale, qs = self.core.submit_and_lease(
                ((a.question_id, a.is_correct) for a in request.answers),
                top_ups,
                request.lease_owner,
                answer_by=answer_by,
            )
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        RPC_SECONDS.labels("SubmitAnswers").observe(time.perf_counter() - started)
        return search_pb2.SubmitAnswersResponse(
            applied=applied, duplicates=dup, stale=stale, questions=qs
        )

    def GetProgress(self, request: Any, context: Any) -> search_pb2.GetProgressResponse:
        campaign = _campaign(context, request.campaign)
        try:
            return self.core.progress(campaign)
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
