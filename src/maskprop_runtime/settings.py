"""Typed settings read from the environment (prefix ``MASKPROP_``) and validated at start-up.

Embedded and distributed modes are one code base: leave ``MASKPROP_KAFKA_BOOTSTRAP`` and
``MASKPROP_REDIS_URL`` unset for the in-memory bus and the embedded store, set them for a real
broker and a real Redis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from maskprop_runtime import topics


class RuntimeSettings(BaseSettings):
    """What every service needs."""

    model_config = SettingsConfigDict(env_prefix="MASKPROP_", extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    kafka_bootstrap: str | None = None
    topic_namespace: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,40}$")
    redis_url: SecretStr | None = None
    data_dir: Path = Path("data")
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 on Kubernetes, so Prometheus can scrape
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    kafka_max_poll_records: int = Field(default=50, ge=1)
    # Every topic's max.message.bytes (set on the topics: scripts/dev-infra.sh, deploy/k8s);
    # producers cut their events below it (maskprop_runtime.topics.record_limit).
    kafka_max_message_bytes: int = Field(default=topics.MAX_MESSAGE_BYTES, ge=65_536)
    connect_timeout_s: float = Field(default=120.0, gt=0)
    # Seconds a consumer remembers an event id it handled (maskprop_runtime.loop.DedupStore):
    # well beyond any redelivery window; default 7 days.
    dedup_ttl_s: float = Field(default=7 * 24 * 3600, ge=1)
    # Net allocations between young-generation runs of CPython's cyclic garbage collector
    # (CPython's default is 700).  A service allocates many short-lived objects a request,
    # almost none in reference cycles; at 700 the collector ran thousands of times a second
    # under load (see benchmarks/README.md, bench_gateway).  0 keeps CPython's default.
    gc_threshold: int = Field(default=50_000, ge=0)
    # Seconds a thread may hold the GIL while another waits for it (CPython's default is
    # 0.005).  A service's threads release it on every socket wait anyway; forced hand-overs
    # between busy threads (route bodies, gRPC workers, relays) only add context switches
    # (bench_gateway: ~10 % less CPU an answer at 0.02).
    switch_interval_s: float = Field(default=0.02, gt=0, le=1)
    # Seconds a service's work loop (Kafka consumer, label relay) may go without going round
    # before its gRPC health turns NOT_SERVING and the liveness probe restarts the pod
    # (maskprop_runtime.watchdog); longer than any one handler call.  0: not watched.
    loop_stall_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _refuse_unsafe_prod(self) -> RuntimeSettings:
        if self.env == "prod" and (self.kafka_bootstrap is None or self.redis_url is None):
            raise ValueError(
                "MASKPROP_ENV=prod needs MASKPROP_KAFKA_BOOTSTRAP and MASKPROP_REDIS_URL: "
                "the in-memory bus and embedded store lose everything on restart"
            )
        return self

    @property
    def distributed(self) -> bool:
        return self.kafka_bootstrap is not None

    def bus_options(self) -> dict[str, object]:
        """Keyword arguments of :func:`maskprop_runtime.bus.make_bus` for these settings."""
        if not self.distributed:
            return {}
        return {
            "session_timeout_ms": self.kafka_session_timeout_ms,
            "connect_timeout_s": self.connect_timeout_s,
            "namespace": self.topic_namespace,
            "max_message_bytes": self.kafka_max_message_bytes,
        }
