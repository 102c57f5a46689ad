"""Named dependencies of the routes (authentication, rate limits, the gateway itself).

They are ``async def`` although they call Redis synchronously: FastAPI runs a plain ``def``
dependency in a worker thread, and a thread hop per dependency per request (with the GIL
handed back and forth under load) cost more CPU than the few Redis round trips it avoids
blocking the loop for (see maskprop_gateway.app)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request

from maskprop_gateway.auth import AuthError, KeyStore, Vendor, WorkerClaims
from maskprop_gateway.gateway import Gateway


async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


def _bearer(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


async def get_vendor(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Vendor:
    """Every vendor route: a valid key (401 otherwise), then the vendor's rate limit (429)."""
    try:
        vendor = request.app.state.keys.verify(_bearer(authorization, x_api_key))
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    wait = request.app.state.limiter.retry_after(vendor.vendor_id)
    if wait > 0:
        raise HTTPException(
            429, "rate limit exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))}
        )
    refuse_unknown_query(request)
    return vendor


async def get_worker(
    request: Request,
    x_worker_token: Annotated[str | None, Header()] = None,
    token: str | None = None,
) -> WorkerClaims:
    """The annotator page's routes: a signed worker token (header, or ``token`` query for
    <img> sources)."""
    try:
        claims: WorkerClaims = request.app.state.keys.verify_worker(x_worker_token or token)
    except AuthError as exc:
        raise HTTPException(401, str(exc)) from None
    # The page's calls count against the vendor's budget too.
    wait = request.app.state.limiter.retry_after(claims.vendor_id)
    if wait > 0:
        raise HTTPException(
            429, "rate limit exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))}
        )
    refuse_unknown_query(request)
    return claims


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
VendorDep = Annotated[Vendor, Depends(get_vendor)]
WorkerDep = Annotated[WorkerClaims, Depends(get_worker)]


_DECLARED: dict[int, frozenset[str]] = {}


def _declared_query(route: Any) -> frozenset[str]:
    """The query parameters a route (with its dependencies) declares, computed once."""
    names = _DECLARED.get(id(route))
    if names is None:
        found: set[str] = set()
        todo = [route.dependant]
        while todo:  # the route's own parameters and its dependencies', recursively
            dep = todo.pop()
            found.update(p.alias for p in dep.query_params)
            todo.extend(dep.dependencies)
        names = _DECLARED[id(route)] = frozenset(found)
    return names


def refuse_unknown_query(request: Request) -> None:
    """Query parameters a route does not declare are a 422, not silently ignored (issue #18:
    a misspelt parameter looked accepted).  Checked by the authentication dependencies after
    the caller is known, so an unauthenticated request is still a 401."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    if route is None:
        return
    unknown = sorted(set(request.query_params) - _declared_query(route))
    if unknown:
        raise HTTPException(422, f"unknown query parameters: {', '.join(unknown[:5])}")
