"""How the gateway reaches the search service: gRPC (deployed) or in-process (embedded,
tests).  Both expose the same three calls with the search protos."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

import grpc

from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc
from maskprop_runtime.treestore import check_name

log = logging.getLogger(__name__)


class SearchUnavailable(Exception):
    """The search service did not answer, or failed (HTTP 503 with Retry-After)."""


class SearchRejected(Exception):
    """Search refused the request as invalid (gRPC INVALID_ARGUMENT; HTTP 422)."""


class SearchNotFound(Exception):
    """Search has no such campaign or question (gRPC NOT_FOUND; HTTP 404)."""


_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


class Submitted(NamedTuple):
    """What SubmitAnswers did: answers applied, duplicates, stale, and the questions its
    top-ups leased."""

    applied: int
    duplicates: int
    stale: int
    questions: list[search_pb2.Question]


class SearchClient(Protocol):
    def lease(
        self, campaign: str, n: int, owner: str
    ) -> tuple[list[search_pb2.Question], bool]: ...
    def submit(
        self,
        answers: Iterable[tuple[str, bool]],
        top_ups: Mapping[str, int] | None = None,
        owner: str = "",
    ) -> Submitted:
        """Deliver answers; with ``top_ups`` (campaign -> questions) also lease new questions
        of those campaigns from the classes the answers reached (search.proto, TopUp)."""
        ...

    def progress(self, campaign: str) -> search_pb2.GetProgressResponse: ...


class GrpcSearchClient:
    def __init__(self, target: str, timeout_s: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = search_pb2_grpc.SearchServiceStub(self._channel)
        self._timeout = timeout_s

    def _call(self, method: Any, request: Any) -> Any:
        name = type(request).__name__.removesuffix("Request")
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            # every status maps to a domain error (issue #18: INVALID_ARGUMENT was a 500)
            code, details = exc.code(), str(exc.details())
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise SearchRejected(f"search refused the request: {details}") from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise SearchNotFound(f"search: {details}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                # Logged (issue #15): a lease search committed after its caller gave up held
                # its questions from everyone for the lease time, without a trace.
                log.warning(
                    "search call %s timed out after %.1f s: %s", name, self._timeout, details
                )
            elif code not in _UNAVAILABLE:
                log.error("search call %s failed: %s %s", name, code, details)
            raise SearchUnavailable(details) from None

    def lease(self, campaign: str, n: int, owner: str) -> tuple[list[search_pb2.Question], bool]:
        resp = self._call(
            self._stub.LeaseQuestions,
            search_pb2.LeaseQuestionsRequest(campaign=campaign, max_questions=n, lease_owner=owner),
        )
        return list(resp.questions), resp.campaign_done

    def submit(
        self,
        answers: Iterable[tuple[str, bool]],
        top_ups: Mapping[str, int] | None = None,
        owner: str = "",
    ) -> Submitted:
        items = [search_pb2.AnswerItem(question_id=q, is_correct=ok) for q, ok in answers]
        if not items:
            return Submitted(0, 0, 0, [])
        request = search_pb2.SubmitAnswersRequest(
            answers=items,
            top_ups=[
                search_pb2.TopUp(campaign=c, max_questions=n) for c, n in (top_ups or {}).items()
            ],
            lease_owner=owner,
        )
        resp = self._call(self._stub.SubmitAnswers, request)
        return Submitted(resp.applied, resp.duplicates, resp.stale, list(resp.questions))

    def progress(self, campaign: str) -> search_pb2.GetProgressResponse:
        return self._call(self._stub.GetProgress, search_pb2.GetProgressRequest(campaign=campaign))

    def close(self) -> None:
        self._channel.close()


class LocalSearchClient:
    """An in-process :class:`maskprop_search.core.SearchCore` behind the same calls, with the
    gRPC adapter's name check and error mapping (its caller errors are ``ValueError``s)."""

    def __init__(self, core: Any) -> None:
        self.core = core

    def lease(self, campaign: str, n: int, owner: str) -> tuple[list[search_pb2.Question], bool]:
        with _rejected():
            return self.core.lease(check_name("campaign", campaign), n, owner)

    def submit(
        self,
        answers: Iterable[tuple[str, bool]],
        top_ups: Mapping[str, int] | None = None,
        owner: str = "",
    ) -> Submitted:
        with _rejected():
            top_ups = {check_name("campaign", c): n for c, n in (top_ups or {}).items()}
            return Submitted(*self.core.submit_and_lease(list(answers), top_ups, owner))

    def progress(self, campaign: str) -> search_pb2.GetProgressResponse:
        with _rejected():
            return self.core.progress(check_name("campaign", campaign))


@contextmanager
def _rejected() -> Iterator[None]:
    try:
        yield
    except ValueError as exc:
        raise SearchRejected(f"search refused the request: {exc}") from None
