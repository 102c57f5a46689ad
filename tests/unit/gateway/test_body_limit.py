"""413 for every body over the limit, declared or streamed without Content-Length (issue #18:
a chunked one got FastAPI's 400 "There was an error parsing the body")."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from maskprop_gateway.limits import BodySizeLimit
from pydantic import BaseModel

LIMIT = 1024


class Body(BaseModel):
    text: str


def client() -> TestClient:
    app = FastAPI()

    @app.post("/echo")
    def echo(body: Body) -> dict[str, int]:
        return {"chars": len(body.text)}

    app.add_middleware(BodySizeLimit, max_bytes=LIMIT)
    return TestClient(app)


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def payload(n: int) -> bytes:
    return b'{"text": "' + b"x" * n + b'"}'


def test_declared_and_streamed_oversized_bodies_are_413():
    with client() as c:
        big = payload(2 * LIMIT)
        declared = c.post("/echo", content=big, headers={"content-type": "application/json"})
        streamed = c.post(
            "/echo", content=chunked(big, 100), headers={"content-type": "application/json"}
        )
    assert declared.status_code == streamed.status_code == 413
    assert streamed.json()["detail"] == f"request body larger than {LIMIT} bytes"


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 2 * LIMIT), chunk=st.integers(1, 700))
def test_streamed_bodies_under_the_limit_arrive_whole(n, chunk):
    data = payload(n)
    with client() as c:
        r = c.post(
            "/echo", content=chunked(data, chunk), headers={"content-type": "application/json"}
        )
    if len(data) > LIMIT:
        assert r.status_code == 413
    else:
        assert r.status_code == 200 and r.json() == {"chars": n}
