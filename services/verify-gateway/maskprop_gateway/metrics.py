"""Prometheus metrics of the gateway (served on MASKPROP_METRICS_PORT, not on the API port)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "maskprop_gateway_requests_total", "HTTP requests", ["method", "route", "status"]
)
LATENCY = Histogram("maskprop_gateway_request_seconds", "HTTP request latency", ["route"])
ANSWERS = Counter("maskprop_gateway_answers_total", "Worker answers accepted", ["vendor"])
BLOCKED = Counter(
    "maskprop_gateway_workers_blocked_total", "Lease requests refused to a worker", ["reason"]
)


async def record(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count and time every request by its route template (never by raw path or query)."""
    started = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    LATENCY.labels(route).observe(time.perf_counter() - started)
    return response
