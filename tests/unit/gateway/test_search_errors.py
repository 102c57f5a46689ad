"""Every search error reaches a vendor as a 4xx or 503 with a clear message, and campaign names
follow one rule at the gateway and in search (issue #18: ``campaign=.`` was a 500)."""

from __future__ import annotations

import re

import grpc
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from maskprop_gateway.api.errors import http_errors
from maskprop_gateway.schemas import CAMPAIGN, LeaseRequest
from maskprop_gateway.search_client import (
    GrpcSearchClient,
    LocalSearchClient,
    SearchNotFound,
    SearchRejected,
    SearchUnavailable,
)
from pydantic import ValidationError

from maskprop_runtime.treestore import check_name


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _client_raising(code: grpc.StatusCode) -> GrpcSearchClient:
    client = GrpcSearchClient.__new__(GrpcSearchClient)
    client._timeout = 1.0

    class Stub:
        def __getattr__(self, name):
            def call(request, timeout):
                raise _RpcError(code, f"{name} says no")

            return call

    client._stub = Stub()
    return client


EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: (SearchRejected, 422),
    grpc.StatusCode.FAILED_PRECONDITION: (SearchRejected, 422),
    grpc.StatusCode.NOT_FOUND: (SearchNotFound, 404),
}


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_every_grpc_status_maps_to_4xx_or_503(code):
    if code == grpc.StatusCode.OK:
        return
    client = _client_raising(code)
    exc_type, status = EXPECTED.get(code, (SearchUnavailable, 503))
    with pytest.raises(exc_type):
        client.progress("gw")
    with pytest.raises(HTTPException) as http, http_errors():
        client.progress("gw")
    assert http.value.status_code == status
    assert "says no" in str(http.value.detail) or status == 503


def test_local_search_refusals_are_422_not_500():
    class Core:
        def progress(self, campaign):
            raise ValueError(f"no campaign {campaign!r}")

        lease = submit = progress

    search = LocalSearchClient(Core())
    app = FastAPI()

    @app.get("/p")
    def p(campaign: str):
        with http_errors():
            return search.progress(campaign)

    with TestClient(app) as c:
        for name in (".", "..", "gw"):
            r = c.get("/p", params={"campaign": name})
            assert r.status_code == 422, r.text
            assert "search refused the request" in r.json()["detail"]


def test_the_gateway_states_the_search_name_rule():
    for bad in (".", "..", "", "a/b", "a" * 65):
        with pytest.raises(ValidationError):
            LeaseRequest(worker_id="w", campaign=bad)
        with pytest.raises(ValueError):
            check_name("campaign", bad)


@given(st.text(alphabet="ab._-/ ", max_size=70) | st.from_regex(CAMPAIGN, fullmatch=True))
def test_gateway_pattern_and_search_check_agree(name):
    at_gateway = re.fullmatch(CAMPAIGN, name) is not None
    try:
        check_name("campaign", name)
        in_search = True
    except ValueError:
        in_search = False
    assert at_gateway == in_search


def test_domain_errors_and_their_subclasses_map_to_4xx():
    from maskprop_gateway.errors import Forbidden, Gone, Invalid, NotFound
    from maskprop_gateway.quality import NotEnoughGold, QualityError, UnknownGold

    cases = {
        NotFound("x"): 404,
        Forbidden("x"): 403,
        Gone("x"): 410,
        Invalid("x"): 422,
        QualityError("x"): 422,
        UnknownGold("x"): 422,
        NotEnoughGold("x"): 422,
        SearchRejected("x"): 422,
        SearchNotFound("x"): 404,
        SearchUnavailable("x"): 503,
    }
    for exc, status in cases.items():
        with pytest.raises(HTTPException) as http, http_errors():
            raise exc
        assert http.value.status_code == status, exc
