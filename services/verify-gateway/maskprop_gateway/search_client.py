"""How the gateway reaches the search service: gRPC (deployed) or in-process (embedded,
tests).  Both expose the same three calls with the search protos."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import grpc

from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc


class SearchUnavailable(Exception):
    """The search service did not answer (HTTP 503 with Retry-After)."""


class SearchClient(Protocol):
    def lease(
        self, campaign: str, n: int, owner: str
    ) -> tuple[list[search_pb2.Question], bool]: ...
    def submit(self, answers: Iterable[tuple[str, bool]]) -> tuple[int, int, int]: ...
    def progress(self, campaign: str) -> search_pb2.GetProgressResponse: ...


class GrpcSearchClient:
    def __init__(self, target: str, timeout_s: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = search_pb2_grpc.SearchServiceStub(self._channel)
        self._timeout = timeout_s

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise SearchUnavailable(str(exc.details())) from None
            raise

    def lease(self, campaign: str, n: int, owner: str) -> tuple[list[search_pb2.Question], bool]:
        resp = self._call(
            self._stub.LeaseQuestions,
            search_pb2.LeaseQuestionsRequest(campaign=campaign, max_questions=n, lease_owner=owner),
        )
        return list(resp.questions), resp.campaign_done

    def submit(self, answers: Iterable[tuple[str, bool]]) -> tuple[int, int, int]:
        items = [search_pb2.AnswerItem(question_id=q, is_correct=ok) for q, ok in answers]
        if not items:
            return 0, 0, 0
        resp = self._call(self._stub.SubmitAnswers, search_pb2.SubmitAnswersRequest(answers=items))
        return resp.applied, resp.duplicates, resp.stale

    def progress(self, campaign: str) -> search_pb2.GetProgressResponse:
        return self._call(self._stub.GetProgress, search_pb2.GetProgressRequest(campaign=campaign))

    def close(self) -> None:
        self._channel.close()


class LocalSearchClient:
    """An in-process :class:`maskprop_search.core.SearchCore` behind the same calls."""

    def __init__(self, core: Any) -> None:
        self.core = core

    def lease(self, campaign: str, n: int, owner: str) -> tuple[list[search_pb2.Question], bool]:
        return self.core.lease(campaign, n, owner)

    def submit(self, answers: Iterable[tuple[str, bool]]) -> tuple[int, int, int]:
        return self.core.submit(list(answers))

    def progress(self, campaign: str) -> search_pb2.GetProgressResponse:
        return self.core.progress(campaign)
