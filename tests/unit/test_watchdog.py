"""The loop watchdog (maskprop_runtime.watchdog): a work loop that stops going round fails the
service's gRPC health check (what Kubernetes' liveness probe asks) until it goes round again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maskprop_runtime import topics
from maskprop_runtime.bus import InMemoryBus, InMemoryConsumer, Record
from maskprop_runtime.loop import EventLoop
from maskprop_runtime.outbox import relay_loop
from maskprop_runtime.server import free_port, start_health_only
from maskprop_runtime.watchdog import Heartbeat, Watchdog, watch

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Records what the watchdog sets, as grpc_health's HealthServicer.set would."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.calls = 0

    def set(self, name: str, status: int) -> None:
        self.status[name] = status
        self.calls += 1


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_stale_beat_sets_every_name_not_serving_once_and_a_new_beat_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, health = Clock(), Health()
    consumer, relay = Heartbeat("sink consumer", clock), Heartbeat("label relay", clock)
    consumer.beat(), relay.beat()
    dog = Watchdog(health, ["sink", "maskprop.sink.v1.Dataset"], [consumer, relay], stall_s=60)
    clock.t += 59
    assert dog.check() and health.calls == 0  # live: the health server's SERVING stands
    consumer.beat()
    clock.t += 2  # the relay's beat is 61 s old
    with caplog.at_level(logging.ERROR, logger="maskprop_runtime.watchdog"):
        assert not dog.check()
        assert not dog.check()  # still stalled: no second log line, no second set
    assert health.status == {
        "": NOT_SERVING,
        "sink": NOT_SERVING,
        "maskprop.sink.v1.Dataset": NOT_SERVING,
    }
    assert health.calls == 3
    [record] = caplog.records
    assert record.loop == "label relay" and record.stalled_s == 61.0  # type: ignore[attr-defined]
    assert "test_a_stale_beat" in record.stack  # type: ignore[attr-defined]
    relay.beat()
    assert dog.check()
    assert set(health.status.values()) == {SERVING} and health.calls == 6


def test_a_watchdog_needs_a_positive_stall_and_zero_turns_it_off() -> None:
    with pytest.raises(ValueError, match="stall_s must be positive"):
        Watchdog(Health(), [], [], stall_s=0)
    assert watch(Health(), [], [], 0, threading.Event()) is None


class StuckBus(InMemoryBus):
    """An in-memory bus whose consumers hang in ``poll`` while ``stuck`` is set, as
    kafka-python 3.0.12's once did after its group removed it (docs/architecture.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = threading.Event()
        self.released = threading.Event()

    def consumer(self, topics: list[str], group: str) -> InMemoryConsumer:
        bus = self

        class Stuck(InMemoryConsumer):
            def poll(self, timeout_s: float, max_records: int) -> list[Record]:
                if bus.stuck.is_set():
                    bus.released.wait()
                time.sleep(min(timeout_s, 0.01))
                return super().poll(0.0, max_records)

        return Stuck(self, topics, group)


def _health_of(port: int) -> Callable[[], int]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    return lambda: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _wait_for(read: Callable[[], int], want: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got == want


def test_a_consumer_stuck_in_poll_fails_the_probe_until_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = StuckBus()
    port = free_port()
    server, health = start_health_only("127.0.0.1", port, "sink")
    loop = EventLoop(service="sink", bus=bus, group="g", handlers={topics.LABELS: lambda m, r: []})
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    runner.start()
    probe = _health_of(port)
    try:
        with caplog.at_level(logging.ERROR, logger="maskprop_runtime.watchdog"):
            assert watch(health, ["sink"], [loop.heartbeat], 0.3, stop) is not None
            time.sleep(0.6)
            assert probe() == SERVING  # idle polls go round
            bus.stuck.set()
            _wait_for(probe, NOT_SERVING)
        [record] = [r for r in caplog.records if r.name == "maskprop_runtime.watchdog"]
        assert record.loop == "sink consumer"  # type: ignore[attr-defined]
        assert "in poll" in record.stack  # type: ignore[attr-defined]  # where it hangs
        bus.stuck.clear()
        bus.released.set()
        _wait_for(probe, SERVING)
    finally:
        bus.released.set()
        stop.set()
        runner.join(5)
        server.stop(0)


def test_a_relay_stuck_in_its_drain_stalls_its_heartbeat() -> None:
    clock, health = Clock(), Health()
    beat = Heartbeat("label relay", clock)
    dog = Watchdog(health, ["label-relay"], [beat], stall_s=10)
    stuck, release, stop = threading.Event(), threading.Event(), threading.Event()
    drained = threading.Event()

    def drain() -> int:
        drained.set()
        if stuck.is_set():
            release.wait()
        return 0

    relay = threading.Thread(
        target=relay_loop,
        args=(drain, threading.Event(), stop),
        kwargs={"idle_s": 0.01, "heartbeat": beat},
        daemon=True,
    )
    relay.start()
    try:
        assert drained.wait(5)
        clock.t += 11
        time.sleep(0.1)  # the loop beats again at the new time
        assert dog.check()
        stuck.set()
        time.sleep(0.1)  # now inside drain, stuck
        clock.t += 11
        assert not dog.check() and health.status[""] == NOT_SERVING
    finally:
        release.set()
        stop.set()
        relay.join(5)
