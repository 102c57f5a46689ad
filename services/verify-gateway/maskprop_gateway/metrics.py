"""Prometheus metrics of the gateway (served on MASKPROP_METRICS_PORT, not on the API port)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
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

# The settler (settler.py): answers are marked on the request path and applied off it.
SETTLE_BACKLOG = Gauge(
    "maskprop_gateway_settle_backlog",
    "Answer requests in the inbox not applied yet (scoring, votes, labels), all replicas",
)
SETTLE_LAG = Gauge(
    "maskprop_gateway_settle_lag_seconds",
    "Age of the oldest answer request in the inbox not applied yet (0: none waiting)",
)
SETTLE_DELAY = Histogram(
    "maskprop_gateway_settle_delay_seconds",
    "Seconds from an answer request marking its answers to their being applied",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
SETTLED = Counter("maskprop_gateway_settled_answers_total", "Answers applied by the settler")
SETTLE_DEAD = Counter(
    "maskprop_gateway_settle_dead_total",
    "Answer requests the settler could not apply (dead-lettered to inbox:answers:dead)",
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
