"""gRPC serving written once: health (grpc.health.v1, for Kubernetes gRPC probes),
reflection-free, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import hmac
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from maskprop.errors import MaskpropError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def build_server(
    register: Callable[[grpc.Server], None], service_names: list[str], *, workers: int = 8
) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default: a second server on a taken port would then
            # share it silently and answer the first one's clients UNIMPLEMENTED.
            ("grpc.so_reuseport", 0),
        ],
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer


def listen(server: grpc.Server, host: str, port: int) -> int:
    """Bind ``server`` to ``host:port`` (0: any free port); the port it got. A taken port ends
    the service with one clear error instead of a traceback."""
    try:
        return int(server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:
        raise MaskpropError(f"cannot listen on {host}:{port}: the port is taken") from None


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on ``host``, never the same one twice in this process: services started
    one after another each get their own even before the first of them has bound its port."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def install_shutdown(stop: threading.Event) -> None:
    """SIGTERM (Kubernetes) and SIGINT set ``stop``; the service drains and exits."""

    def handler(signum: int, _frame: object) -> None:
        log.info("shutdown requested", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve_until(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    stop: threading.Event,
    *,
    grace_s: float = 10.0,
) -> None:
    stop.wait()
    health_servicer.enter_graceful_shutdown()  # probes fail first, so traffic drains
    server.stop(grace_s).wait()


def require_bearer(context: Any, token: str | None) -> None:
    """Abort the call UNAUTHENTICATED unless it carries ``authorization: Bearer <token>``;
    ``token`` None (dev only: each service's settings refuse it in prod) lets every caller in."""
    if token is None:
        return
    sent = dict(context.invocation_metadata()).get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid admin token is required")


def start_health_only(host: str, port: int, service_name: str) -> tuple[grpc.Server, Any]:
    """For services without a gRPC API (clusterer, sink): grpc.health.v1 alone, so every
    service is probed the same way on Kubernetes."""
    server, health_servicer = build_server(lambda _s: None, [service_name], workers=2)
    listen(server, host, port)
    server.start()
    return server, health_servicer


def entrypoint(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a service's ``main``: configuration and connectivity problems end the process
    with one clear ``error:`` line (after the retries with backoff have run out)."""

    def wrapped() -> None:
        from pydantic import ValidationError

        try:
            main()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "settings"
            raise SystemExit(f"error: bad setting {where}: {first['msg']}") from None
        except (ConnectionError, MaskpropError) as exc:
            raise SystemExit(f"error: {exc}") from None

    wrapped.__doc__ = main.__doc__
    return wrapped


@dataclass
class Started:
    """What every standalone service process starts with."""

    bus: Any
    redis: Any
    stop: threading.Event


def tune_interpreter(settings: Any) -> None:
    """CPython's pace for a service under load: the young generation collected every
    ``settings.gc_threshold`` allocations instead of 700 (older generations keep their
    ratios), the GIL handed over every ``settings.switch_interval_s`` instead of 5 ms."""
    if settings.gc_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(settings.gc_threshold, older, oldest)
    sys.setswitchinterval(settings.switch_interval_s)


def start_service(settings: Any, name: str, *, needs_redis: bool = True) -> Started:
    """The start of every service's ``main``, written once: logs, the distributed-mode check,
    the interpreter's pace (GC, GIL), metrics, Redis (retrying with backoff), the bus and SIGTERM
    handling."""
    from maskprop_runtime.bus import make_bus
    from maskprop_runtime.logs import setup_logging
    from maskprop_runtime.metrics import start_metrics
    from maskprop_runtime.store import make_redis

    setup_logging(name, settings.log_level, settings.log_json)
    tune_interpreter(settings)
    needed = "MASKPROP_KAFKA_BOOTSTRAP" + (" and MASKPROP_REDIS_URL" if needs_redis else "")
    if not settings.distributed or (needs_redis and settings.redis_url is None):
        raise SystemExit(
            f"error: a standalone {name} needs {needed} "
            "(use `maskprop run` for the embedded pipeline)"
        )
    start_metrics(settings.metrics_port, settings.metrics_host)
    redis = (
        make_redis(
            settings.redis_url.get_secret_value(), connect_timeout_s=settings.connect_timeout_s
        )
        if needs_redis
        else None
    )
    bus = make_bus(settings.kafka_bootstrap, **settings.bus_options())
    stop = threading.Event()
    install_shutdown(stop)
    return Started(bus=bus, redis=redis, stop=stop)
