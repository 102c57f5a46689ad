"""Liveness that follows the work, not the gRPC server: a loop that stopped going round fails
the service's health check, so Kubernetes restarts the pod.

A service's gRPC health answers from the server's own threads, so it said SERVING while the
loop that does the service's work was stuck.  That happened: kafka-python 3.0.12's
``poll(timeout_ms=500)`` once never returned after the broker removed the consumer from its
group (heartbeat expiry); the client spun in ``ensure_coordinator_ready`` without rejoining
(docs/architecture.md, sixteenth session).  A sink stuck so writes nothing and looks healthy.

Each loop beats a :class:`Heartbeat` every time it goes round (an idle consumer polls every
0.5 s, a relay wakes every ``idle_s``).  :class:`Watchdog` checks the beats every few seconds:
one older than ``stall_s`` sets every health name of the service NOT_SERVING and logs, once,
which loop stalled, for how long and the stuck thread's stack; a beat again sets SERVING.  The
liveness probe (deploy/k8s: every 20 s, 3 failures) then restarts the pod; the consumed offsets
were not committed, so its events come again.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


class Heartbeat:
    """When a loop last went round (``clock`` seconds, monotonic) and which thread runs it."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._at = clock()
        self._thread: int | None = None

    def beat(self) -> None:
        self._at = self.clock()
        self._thread = threading.get_ident()

    def age(self) -> float:
        """Seconds since the last beat (since creation before the first)."""
        return self.clock() - self._at

    def stack(self) -> str:
        """Where the loop's thread is now (empty before its first beat or once it ended)."""
        frame = sys._current_frames().get(self._thread) if self._thread is not None else None
        return "".join(traceback.format_stack(frame)) if frame is not None else ""


class Watchdog:
    """Sets ``health``'s ``names`` (the empty name, which probes ask, included) NOT_SERVING
    while any of ``beats`` is older than ``stall_s`` seconds, SERVING again once none is."""

    def __init__(
        self,
        health: Any,
        names: Sequence[str],
        beats: Sequence[Heartbeat],
        *,
        stall_s: float,
    ) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s must be positive, got {stall_s}")
        self.health = health
        self.names = ["", *(n for n in names if n)]
        self.beats = list(beats)
        self.stall_s = stall_s
        self.stalled: set[str] = set()

    def check(self) -> bool:
        """Look at the beats once and set the health; returns whether every loop is live."""
        from grpc_health.v1 import health_pb2  # here: loops import Heartbeat without grpc

        now_stalled = {b.name for b in self.beats if b.age() > self.stall_s}
        for beat in self.beats:
            if beat.name in now_stalled and beat.name not in self.stalled:
                log.error(
                    "a loop stopped going round; health set NOT_SERVING",
                    extra={
                        "loop": beat.name,
                        "stalled_s": round(beat.age(), 1),
                        "stack": beat.stack(),
                    },
                )
            elif beat.name in self.stalled and beat.name not in now_stalled:
                log.warning("a stalled loop goes round again", extra={"loop": beat.name})
        if bool(now_stalled) != bool(self.stalled):
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if now_stalled
                else health_pb2.HealthCheckResponse.SERVING
            )
            for name in self.names:
                self.health.set(name, status)
        self.stalled = now_stalled
        return not now_stalled

    def start(self, stop: threading.Event, every_s: float | None = None) -> threading.Thread:
        """Check every ``every_s`` seconds (default: a tenth of ``stall_s``, 0.05-5 s) in a
        daemon thread until ``stop``."""
        every = every_s if every_s is not None else min(max(self.stall_s / 10, 0.05), 5.0)

        def run() -> None:
            while not stop.wait(every):
                self.check()

        thread = threading.Thread(target=run, name="watchdog", daemon=True)
        thread.start()
        return thread


def watch(
    health: Any,
    names: Sequence[str],
    beats: Sequence[Heartbeat],
    stall_s: float,
    stop: threading.Event,
) -> Watchdog | None:
    """A service's main: watch ``beats`` (``stall_s`` 0: not at all)."""
    if stall_s <= 0:
        return None
    dog = Watchdog(health, names, beats, stall_s=stall_s)
    dog.start(stop)
    return dog
