"""The search service process: gRPC API + a consumer of ``maskprop.trees``, state in Redis."""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

from pydantic import Field

from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop_runtime import topics
from maskprop_runtime.bus import Bus, Producer
from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.loop import DedupStore, EventLoop
from maskprop_runtime.metrics import LABEL_OUTBOX_PENDING
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2_grpc
from maskprop_runtime.server import (
    build_server,
    entrypoint,
    listen,
    serve_until,
    start_service,
)
from maskprop_runtime.settings import RuntimeSettings
from maskprop_runtime.watchdog import watch
from maskprop_search.core import SearchCore
from maskprop_search.grpc_api import SearchServicer
from maskprop_search.store import CACHE_MASKS

log = logging.getLogger(__name__)


class SearchSettings(RuntimeSettings):
    """The campaign's method parameters (paper defaults) and the service's own settings."""

    seed: int = 0
    samples_per_cluster: int = Field(default=15, ge=1)
    accept_threshold: float = 0.85
    iou_threshold: float = 0.75
    prior_accept_threshold: float = 0.7
    prior_reject_threshold: float = 0.0
    reuse_answers: bool = True
    sequential: Literal["off", "curtail", "beta"] = "off"
    strategy: Literal["heuristic", "bfs", "dfs", "dfs_heuristic"] = "heuristic"
    lease_seconds: float = Field(default=600.0, gt=0)
    #: gRPC handler threads.  Every call is GIL-bound Python between short Redis round trips,
    #: so more threads buy no throughput, only GIL hand-offs and lock waits: 8 threads cost
    #: ~25 % more CPU an answer than 2 under 32 concurrent clients (bench_search_load.py).
    grpc_workers: int = Field(default=2, ge=1)
    #: The label relay, woken by a save, waits this long for more saves before it publishes:
    #: fewer, fuller broker batches (labels reach the topic at most this much later).
    relay_linger_s: float = Field(default=0.05, ge=0)
    #: Who builds and publishes the label events that saves leave in the outboxes: "thread",
    #: a thread of this process; "process", none here: `python -m maskprop_search.relay` runs
    #: apart (its own Deployment on Kubernetes; a lower CPU priority on a shared machine), so a
    #: large class's bursts of decisions (hundreds of thousands of labels at once) take neither
    #: this process's GIL nor the API's CPU.  Outboxes are locked per campaign: any number of
    #: relays may run.
    label_relay: Literal["thread", "process"] = "thread"
    #: The relay process, which no save wakes, looks for new outbox records this often.
    relay_poll_s: float = Field(default=0.1, gt=0, le=10)
    #: Masks of the classes whose sessions (with trees and mask tables, ~0.9 KB a mask) this
    #: process keeps in memory, least recently used out first; the others load when a call
    #: needs them (GET base + LRANGE log, one round trip).  In the relay process: the masks of
    #: the mask tables it keeps (no sessions there).
    cache_masks: int = Field(default=CACHE_MASKS, ge=1)
    #: This replica's name among the live ones that leases spread classes over (the pod's
    #: name under Kubernetes); empty: a random one per process.
    replica_id: str = Field(default="", max_length=64)

    def params(self) -> AnnotationParams:
        return AnnotationParams(
            samples_per_cluster=self.samples_per_cluster,
            accept_threshold=self.accept_threshold,
            iou_threshold=self.iou_threshold,
            prior_accept_threshold=self.prior_accept_threshold,
            prior_reject_threshold=self.prior_reject_threshold,
            reuse_answers=self.reuse_answers,
            sequential=self.sequential,
        )

    def selection(self) -> Selection:
        return Selection(self.prior_reject_threshold, self.prior_accept_threshold)


def build_core(
    settings: SearchSettings,
    bus: Bus,
    redis: Any,
    producer: Producer | None = None,
    *,
    relay: bool = False,
    relay_masks: int = 0,
) -> SearchCore:
    """``relay``: labels are published by a relay running ``core.run_relay`` (a thread of the
    service process, or the relay process) instead of by each API call before it returns
    (embedded mode).  ``relay_masks``: the relay's cache of mask tables (:class:`SearchCore`)."""
    return SearchCore(
        redis,
        settings.params(),
        settings.selection(),
        producer or bus.producer(),
        seed=settings.seed,
        strategy=settings.strategy,
        lease_seconds=settings.lease_seconds,
        publish_inline=not relay,
        cache_masks=settings.cache_masks,
        replica_id=settings.replica_id or None,
        label_bytes=topics.record_limit(settings.kafka_max_message_bytes),
        relay_masks=relay_masks,
        # a registered campaign's sessions open with its own parameters (issue #16)
        params_for=CampaignRegistry(redis).session_params,
    )


def build_search(
    settings: SearchSettings,
    bus: Bus,
    redis: Any,
    producer: Producer | None = None,
    *,
    relay: bool = False,
) -> tuple[SearchCore, EventLoop]:
    """The core (:func:`build_core`) and its consumer of ``maskprop.trees``."""
    core = build_core(settings, bus, redis, producer, relay=relay)
    loop = EventLoop(
        service="search",
        bus=bus,
        group="maskprop-search",
        handlers={topics.TREES: core.on_tree_built},
        dedup=DedupStore(redis, "search", ttl_s=settings.dedup_ttl_s),
        max_records=settings.kafka_max_poll_records,
    )
    return core, loop


@entrypoint
def main() -> None:
    settings = SearchSettings()
    run = start_service(settings, "search")
    stop = run.stop
    core, loop = build_search(settings, run.bus, run.redis, relay=True)
    # exported in both modes: a search whose relay process is not running shows it here
    LABEL_OUTBOX_PENDING.set_function(core.outbox_backlog)
    relay: threading.Thread | None = None
    republished = 0
    if settings.label_relay == "thread":
        republished = core.recover()
        relay = threading.Thread(
            target=core.run_relay,
            args=(stop,),
            kwargs={"linger_s": settings.relay_linger_s},
            name="label-relay",
            daemon=True,
        )
        relay.start()
    server, health = build_server(
        lambda s: search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(core), s),
        ["maskprop.search.v1.SearchService"],
        workers=settings.grpc_workers,
    )
    port = listen(server, settings.grpc_host, settings.grpc_port)
    server.start()
    log.info(
        "search started",
        extra={
            "grpc_port": port,
            "label_relay": settings.label_relay,
            "republished_events": republished,
        },
    )
    consumer = threading.Thread(target=loop.run, args=(stop,), name="trees-consumer", daemon=True)
    consumer.start()
    beats = [loop.heartbeat] + ([core.outboxes.heartbeat] if relay is not None else [])
    watch(health, ["maskprop.search.v1.SearchService"], beats, settings.loop_stall_s, stop)
    serve_until(server, health, stop)
    consumer.join(timeout=15)
    if relay is None:  # the relay process publishes what the last calls decided
        return
    relay.join(timeout=15)
    core.drain_at_shutdown()
