"""Prometheus metrics of the gateway (served on MASKPROP_METRICS_PORT, not on the API port)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "maskprop_gateway_requests_total", "HTTP requests", ["method", "route", "status"]
)
LATENCY = Histogram("maskprop_gateway_request_seconds", "HTTP request latency", ["route"])
ANSWERS = Counter("maskprop_gateway_answers_total", "Worker answers accepted", ["vendor"])
GOLD_SHORT = Counter(
    "maskprop_gateway_hidden_gold_short_total",
    "Hidden gold slots left empty: the campaign's gold reached its exposure cap (import more)",
    ["campaign"],
)
BLOCKED = Counter(
    "maskprop_gateway_workers_blocked_total", "Lease requests refused to a worker", ["reason"]
)


class RequestMetrics:
    """ASGI middleware: count and time every request by its route template (never by raw path
    or query).  Plain ASGI rather than ``@app.middleware("http")``: Starlette's
    BaseHTTPMiddleware runs each request through an extra task and stream (~7 % of the
    gateway's CPU under load)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - started)
