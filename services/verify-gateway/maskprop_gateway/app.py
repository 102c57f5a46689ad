"""The verify gateway: the HTTP API crowd vendors call (FastAPI, OpenAPI at /openapi.json).

Every /v1 route needs a vendor key (or, for the annotator page, a signed worker token); bodies
are size-limited; vendors are rate-limited.  ``/healthz`` (probes), ``/openapi.json`` and the
annotator page's files (``/annotate``, ``/static/...``) are the only unauthenticated routes and
return no data of any campaign.

Threads: the hot routes (leases, answers, lease status) and the dependencies run on the event
loop although their Redis calls are synchronous.  Each call blocks the loop for one round trip
(~0.1 ms on loopback), which costs less than what it avoids: with route bodies on 8 worker
threads, the GIL changed hands around every Redis call, and under 32 concurrent workers the
same requests took ~30 % more CPU (bench_gateway.py).  Calls into search (tens of ms) stay off
the loop: the settler thread applies answers (scoring, votes, labels: off the request path,
so a response's time is the same for hidden gold and real questions), the forwarder thread
sends decided labels, leases top up the question pool from a
thread (one search call at a time per campaign), and progress, images and overlays run in
worker threads (``MASKPROP_HTTP_THREADS``).  More throughput: more gateway processes.
With ``MASKPROP_BACKGROUND=process`` (deployed) the settler and the forwarder run in a child
process instead (:mod:`~maskprop_gateway.background`), at a lower CPU priority than the
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from maskprop_gateway import background, metrics, webhooks
from maskprop_gateway.api.routes import answers, leases, progress, worker
from maskprop_gateway.auth import KeyStore
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.limits import BodySizeLimit, RateLimiter
from maskprop_gateway.qc_rules import QualityPolicy
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.search_client import GrpcSearchClient, SearchClient
from maskprop_gateway.settings import GatewaySettings
from maskprop_runtime.server import entrypoint, tune_interpreter
from maskprop_runtime.store import make_redis

log = logging.getLogger(__name__)

ExpiredHook = Callable[[list[dict[str, str]]], None]


def policy_from(settings: GatewaySettings) -> QualityPolicy:
    return QualityPolicy(
        qualification_size=settings.qualification_size,
        qualification_pass=settings.qualification_pass,
        gold_share=settings.gold_share,
        min_accuracy=settings.min_accuracy,
        redundancy=settings.redundancy,
        max_redundancy=settings.max_redundancy,
        gold_exposure=settings.gold_exposure,
    )


def build_gateway(settings: GatewaySettings, r: Any, search: SearchClient) -> Gateway:
    """The gateway's domain facade over Redis ``r`` and ``search`` (the HTTP process's, and
    a background process's: background.py)."""
    keys = KeyStore(r, settings.key_pepper.get_secret_value())
    qc = QualityControl(r, policy_from(settings))
    return Gateway(r, search, qc, settings, token_for=keys.worker_token)


def create_app(
    settings: GatewaySettings | None = None,
    *,
    redis: Any = None,
    search: SearchClient | None = None,
    expiry_interval_s: float = 5.0,
) -> FastAPI:
    """Build the app.  ``redis`` and ``search`` default to the configured Redis and the gRPC
    search service; tests and the embedded mode pass fakeredis and an in-process search."""
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Connections are made here, inside the app's event loop, never at import time.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.http_threads
        r = redis
        if r is None:
            url = settings.redis_url.get_secret_value() if settings.redis_url else None
            r = make_redis(url, connect_timeout_s=settings.connect_timeout_s)
        if settings.background == "process" and search is not None:
            raise ValueError("MASKPROP_BACKGROUND=process needs search over gRPC, not in process")
        client = search or GrpcSearchClient(settings.search_target)
        app.state.keys = KeyStore(r, settings.key_pepper.get_secret_value())
        app.state.limiter = RateLimiter(r, settings.rate_per_s, settings.rate_burst)
        app.state.gateway = build_gateway(settings, r, client)
        # answers are applied off the request path, in every mode (embedded too): by threads
        # of this process, or by a child process (background.py)
        stops: list[Callable[[], None]] = []
        app.state.background = None
        if settings.background == "process":
            app.state.background = background.Background(settings)
            heard = threading.Event()
            background.listen(r, app.state.gateway.topups, heard)
            stops += [app.state.background.stop, heard.set]
        else:
            if settings.forward_linger_s > 0:
                stops.append(app.state.gateway.start_forwarder())
            stops.insert(0, app.state.gateway.start_settler())  # stopped first: it queues labels
        app.state.expired_hooks = []
        stop_webhooks = webhooks.install(app, r)  # signed vendor callbacks, retried
        task = asyncio.create_task(_expire_loop(app, expiry_interval_s))
        yield
        await app.state.gateway.drain_refills()
        await stop_webhooks()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for halt in stops:  # applies what requests marked, then sends what they decided
            await asyncio.to_thread(halt)
        if isinstance(client, GrpcSearchClient):
            client.close()

    app = FastAPI(
        title="maskprop verify gateway",
        version="1.0.0",
        description="Crowd-vendor API: lease yes/no mask-verification questions for workers, "
        "submit answers. Authenticate with `Authorization: Bearer <vendor key>`.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(metrics.RequestMetrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", []))
        return JSONResponse({"detail": f"{where}: {first.get('msg')}"}, status_code=422)

    @app.get("/healthz", include_in_schema=False)
    async def healthz(response: Response) -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(leases.router)
    app.include_router(answers.router)
    app.include_router(progress.router)
    app.include_router(worker.router)
    app.include_router(worker.page)  # GET /annotate, the annotator page
    app.mount("/static", StaticFiles(directory=worker.STATIC), name="static")
    return app


#: Seconds between repair sweeps of the question pool (see ``Gateway.sweep``).
SWEEP_INTERVAL_S = 30.0


async def _expire_loop(app: FastAPI, interval_s: float) -> None:
    """Expired leases free their questions; hooks (vendor callbacks) hear about them; with
    inline forwarding, decided labels whose sending failed are retried (the forwarder's relay
    thread retries by itself).  Now and then the question pool is swept for questions left
    unclaimable."""
    swept = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        try:
            if app.state.background is not None:
                await asyncio.to_thread(app.state.background.ensure_alive)
            expired = await asyncio.to_thread(app.state.gateway.expire_leases)
            for hook in app.state.expired_hooks:
                hook(expired)  # raises if a callback could not be queued: expired again later
            await asyncio.to_thread(app.state.gateway.finish_expired, expired)
            await asyncio.to_thread(app.state.gateway.retry_forward)
            if time.monotonic() - swept >= SWEEP_INTERVAL_S:
                swept = time.monotonic()
                await asyncio.to_thread(app.state.gateway.sweep)
        except Exception:
            log.exception("lease expiry failed; will retry")


@entrypoint
def main() -> None:
    import uvicorn

    from maskprop_runtime.logs import setup_logging
    from maskprop_runtime.metrics import start_metrics

    settings = GatewaySettings()
    setup_logging("verify-gateway", settings.log_level, settings.log_json)
    tune_interpreter(settings)
    start_metrics(settings.metrics_port, settings.metrics_host)
    uvicorn.run(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        access_log=False,  # request lines would carry query tokens; our logs carry none
    )
