"""The verify gateway shell (FastAPI): the crowd-vendor API arrives with issue #5.

Today it serves only ``/healthz`` for Kubernetes probes, which reports whether the search
service answers gRPC health checks.  No vendor route exists yet, so none is unauthenticated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field

from maskprop_runtime.settings import RuntimeSettings


class GatewaySettings(RuntimeSettings):
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=1, le=65535)
    search_target: str = "127.0.0.1:50051"


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Channels are made here, inside the app's event loop, never at import time.
        app.state.channel = grpc.aio.insecure_channel(settings.search_target)
        app.state.health = health_pb2_grpc.HealthStub(app.state.channel)
        yield
        await app.state.channel.close()

    app = FastAPI(title="maskprop verify gateway", version="0.1.0", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz(response: Response) -> dict[str, str]:
        try:
            reply = await app.state.health.Check(
                health_pb2.HealthCheckRequest(service="maskprop.search.v1.SearchService"),
                timeout=2,
            )
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        if not ok:
            response.status_code = 503
        return {"status": "ok" if ok else "search unavailable"}

    return app


def main() -> None:
    import uvicorn

    settings = GatewaySettings()
    uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port)
