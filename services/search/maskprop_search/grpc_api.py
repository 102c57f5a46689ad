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
#: A lease commits only while at least this much of its caller's deadline is left: the
#: response still has to reach the caller (issue #15).
COMMIT_MARGIN_S = 0.5


def _campaign(context: Any, campaign: str) -> str:
    try:
        return check_name("campaign", campaign)
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise  # unreachable: abort raises


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, core: SearchCore) -> None:
        self.core = core

    def LeaseQuestions(self, request: Any, context: Any) -> search_pb2.LeaseQuestionsResponse:
        started = time.perf_counter()
        campaign = _campaign(context, request.campaign)
        if not 1 <= request.max_questions <= MAX_BATCH:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_questions must be 1..{MAX_BATCH}")
        # A deadline-less call has an infinite time_remaining(): no bound.
        remaining = context.time_remaining()
        answer_by = None if remaining > 1e9 else time.monotonic() + remaining - COMMIT_MARGIN_S
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
        try:
            applied, dup, stale = self.core.submit(
                (a.question_id, a.is_correct) for a in request.answers
            )
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        RPC_SECONDS.labels("SubmitAnswers").observe(time.perf_counter() - started)
        return search_pb2.SubmitAnswersResponse(applied=applied, duplicates=dup, stale=stale)

    def GetProgress(self, request: Any, context: Any) -> search_pb2.GetProgressResponse:
        campaign = _campaign(context, request.campaign)
        try:
            return self.core.progress(campaign)
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
