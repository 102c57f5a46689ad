"""Prometheus metrics shared by every service (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS_CONSUMED = Counter(
    "maskprop_events_consumed_total", "Events handled by the loop", ["service", "topic"]
)
EVENTS_PRODUCED = Counter(
    "maskprop_events_produced_total", "Events produced by handlers", ["service", "topic"]
)
EVENTS_DEADLETTERED = Counter(
    "maskprop_events_deadlettered_total", "Events parked on the dead-letter topic", ["service"]
)
EVENTS_DUPLICATE = Counter(
    "maskprop_events_duplicate_total", "Redelivered events skipped by dedup", ["service"]
)
HANDLER_SECONDS = Histogram(
    "maskprop_handler_seconds", "Time to handle one event", ["service", "topic"]
)
RPC_SECONDS = Histogram("maskprop_rpc_seconds", "Time to serve one gRPC call", ["method"])
#: Read at each scrape by the process that relays search's labels (a growing value: no relay
#: runs, or it falls behind the crowd's decisions).
LABEL_OUTBOX_PENDING = Gauge(
    "maskprop_label_outbox_pending",
    "Records of decisions waiting in the label outboxes, all campaigns (NaN: Redis unreachable)",
)


def start_metrics(port: int | None, host: str = "127.0.0.1") -> None:
    if port:
        start_http_server(port, addr=host)
