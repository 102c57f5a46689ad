"""The label relay as a process of its own: ``python -m maskprop_search.relay``.

Search's saves leave compact records of decisions in each campaign's outbox stream in Redis;
a relay expands them into ``LabelsPropagated`` events (the class's mask table from the tree
store) and publishes them to ``maskprop.labels``.  Run with search's ``label_relay=process``,
this process does that work instead of a thread inside every search replica: on Kubernetes it
gets CPU of its own, on a shared machine a lower priority, so the bursts of a large class
(one decision can label hundreds of thousands of masks) wait while the crowd's calls are
served.  Each campaign's outbox is locked while one relay drains it, so any number of relays
may run; a relay killed before the broker's ack leaves the events to the next (same ids).
"""

from __future__ import annotations

import logging

from maskprop_runtime.metrics import LABEL_OUTBOX_PENDING
from maskprop_runtime.server import entrypoint, start_health_only, start_service
from maskprop_runtime.watchdog import watch
from maskprop_search.service import SearchSettings, build_core

log = logging.getLogger(__name__)


@entrypoint
def main() -> None:
    settings = SearchSettings()
    run = start_service(settings, "label-relay")
    # no sessions here: the mask tables it expands decisions with are its only cache
    core = build_core(settings, run.bus, run.redis, relay=True, relay_masks=settings.cache_masks)
    LABEL_OUTBOX_PENDING.set_function(core.outbox_backlog)
    server, health = start_health_only(settings.grpc_host, settings.grpc_port, "label-relay")
    log.info("label relay started", extra={"grpc_port": settings.grpc_port})
    watch(health, ["label-relay"], [core.outboxes.heartbeat], settings.loop_stall_s, run.stop)
    # no wake-up from the saves of other processes: the relay polls the outboxes
    core.run_relay(run.stop, idle_s=settings.relay_poll_s, linger_s=settings.relay_linger_s)
    health.enter_graceful_shutdown()
    core.drain_at_shutdown()
    server.stop(5).wait()


if __name__ == "__main__":
    main()
