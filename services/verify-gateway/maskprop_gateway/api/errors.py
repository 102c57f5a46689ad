"""Domain errors -> HTTP statuses, in one place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from fastapi import HTTPException

from maskprop_gateway.errors import Forbidden, Gone, Invalid, NotFound
from maskprop_gateway.idempotency import IdempotencyConflict
from maskprop_gateway.quality import QualityError
from maskprop_gateway.search_client import SearchNotFound, SearchRejected, SearchUnavailable

T = TypeVar("T")

_STATUS: dict[type[Exception], int] = {
    NotFound: 404,
    Forbidden: 403,
    Gone: 410,
    Invalid: 422,
    SearchRejected: 422,
    SearchNotFound: 404,
    # quality control's caller errors (a gold item not served to the worker, a bad answer
    # time): the gateway's own checks catch them first, but never as a 500
    QualityError: 422,
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
        # by the nearest mapped class: subclasses (UnknownGold of QualityError) map too
        status = next(_STATUS[c] for c in type(exc).__mro__ if c in _STATUS)
        raise HTTPException(status, str(exc)) from None


def call(fn: Callable[[], T]) -> T:
    with http_errors():
        return fn()
