"""Domain errors -> HTTP statuses, in one place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from fastapi import HTTPException

from maskprop_gateway.errors import Forbidden, Gone, Invalid, NotFound
from maskprop_gateway.idempotency import IdempotencyConflict
from maskprop_gateway.search_client import SearchNotFound, SearchRejected, SearchUnavailable

T = TypeVar("T")

_STATUS: dict[type[Exception], int] = {
    NotFound: 404,
    Forbidden: 403,
    Gone: 410,
    Invalid: 422,
    SearchRejected: 422,
    SearchNotFound: 404,
}


@contextmanager
def http_errors() -> Iterator[None]:
    try:
        yield
    except SearchUnavailable:
        raise HTTPException(
            503, "search service unavailable", headers={"Retry-After": "5"}
        ) from None
    except IdempotencyConflict as exc:
        raise HTTPException(exc.status, exc.detail) from None
    except tuple(_STATUS) as exc:
        raise HTTPException(_STATUS[type(exc)], str(exc)) from None


def call(fn: Callable[[], T]) -> T:
    with http_errors():
        return fn()
