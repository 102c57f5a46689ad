"""The gateway's background work in a process of its own (``MASKPROP_BACKGROUND=process``).

The settler (answers applied: gold scored, votes tallied, labels decided) and the forwarder
(decided labels sent to search, then the question pool topped up) are CPU-bound Python, ~40 %
of a gateway's CPU.  As threads of the HTTP process they share its GIL and its CPU priority
with the event loop serving requests.  Here they run in a child process that the HTTP
process starts (:class:`Background`) and stops, at ``background_nice``: on a busy machine the
kernel runs the requests first and the settling waits, which it can (nothing on the request
path waits for it).  The lower priority is what cuts the requests' tail; the split alone, at
nice 0, did not (benchmarks/README.md, nineteenth session).  The child shares nothing with
the HTTP process but Redis:

* answers marked by requests: the answer inbox, which this process's settler reads with a
  blocking read (:data:`WAIT_S`: no request of this process wakes it);
* decided labels: the label outbox, which this process's forwarder relays;
* "questions arrived": after applying or forwarding answers this process publishes their
  campaigns on :data:`keys.ARRIVALS`; the HTTP process's listener (:func:`listen`) wakes
  the leases waiting for them (:meth:`TopUps.announce`);
* "answers in flight" (should a lease that finds the pool empty wait?): the lengths of the
  inbox and the outbox (:meth:`Gateway.answers_in_flight`).

The child stops after a last pass when the HTTP process stops it, and by itself when the
HTTP process is gone (killed: its pod restarts both).  What it leaves is safe in Redis: the
inbox's entries are applied by any settler (reclaimed after ``settle_reclaim_s``), the
outbox's labels sent by any forwarder.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

from maskprop_gateway import keys
from maskprop_gateway.settings import GatewaySettings
from maskprop_gateway.topups import TopUps

log = logging.getLogger(__name__)

#: Seconds the child's settler waits in Redis for a new inbox entry (XREADGROUP BLOCK) before
#: it looks again (other processes' entries left behind, reclaims; its stop).
WAIT_S = 0.5
#: Seconds the HTTP process waits for the child's last pass when it stops it (within the
#: pod's termination grace period, 30 s).
STOP_WAIT_S = 20.0


class Background:
    """The child process, as the HTTP process sees it: started at once with ``settings``
    (which name Redis and search over the network: it shares no object with this process)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._proc: Any = None
        self.start()

    def start(self) -> None:
        # spawn: a fresh interpreter (the HTTP process runs threads; forking it is unsafe)
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(
            target=_main, args=(self.settings, os.getpid()), name="gateway-background"
        )
        self._proc.start()
        log.info("background process started", extra={"pid": self._proc.pid})

    def ensure_alive(self) -> bool:
        """Start the child again if it died (its inbox entries wait in Redis meanwhile);
        returns whether it had to."""
        if self._proc.is_alive():
            return False
        log.error(
            "the background process died; starting it again",
            extra={"exitcode": self._proc.exitcode},
        )
        self.start()
        return True

    def stop(self) -> None:
        """Stop the child after its last pass (it applies and sends what is queued)."""
        if self._proc.is_alive():
            self._proc.terminate()  # SIGTERM: the child's handler stops it cleanly
            self._proc.join(STOP_WAIT_S)
        if self._proc.is_alive():
            log.error("the background process did not stop; killing it")
            self._proc.kill()
            self._proc.join(5)


def listen(redis: Any, topups: TopUps, stop: threading.Event) -> threading.Thread:
    """In the HTTP process: a thread that hears :data:`keys.ARRIVALS` and wakes the leases
    waiting for questions of those campaigns, until ``stop``."""

    def run() -> None:
        while not stop.is_set():
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.ARRIVALS)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        data = message["data"]
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        topups.announce(text.split("\n"))
            except Exception as exc:  # Redis restarting: leases fall back to lease_wait_s
                log.warning("listening for arrivals failed; retrying", extra={"error": str(exc)})
                stop.wait(1.0)
            finally:
                pubsub.close()

    thread = threading.Thread(target=run, name="arrivals", daemon=True)
    thread.start()
    return thread


def _main(settings: GatewaySettings, parent: int) -> None:
    """The child: the gateway's settler and forwarder until SIGTERM or the parent is gone."""
    from maskprop_gateway.app import build_gateway
    from maskprop_gateway.search_client import GrpcSearchClient
    from maskprop_runtime.logs import setup_logging
    from maskprop_runtime.metrics import start_metrics
    from maskprop_runtime.server import tune_interpreter
    from maskprop_runtime.store import make_redis

    setup_logging("verify-gateway-background", settings.log_level, settings.log_json)
    tune_interpreter(settings)
    if settings.background_nice:
        os.nice(settings.background_nice)
    start_metrics(settings.background_metrics_port, settings.metrics_host)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # a terminal's ^C reaches both processes: the parent stops this one
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    assert settings.redis_url is not None
    r = make_redis(
        settings.redis_url.get_secret_value(), connect_timeout_s=settings.connect_timeout_s
    )
    client = GrpcSearchClient(settings.search_target)
    gateway = build_gateway(settings, r, client)

    def publish(campaigns: Iterable[str]) -> None:
        names = "\n".join(sorted(set(campaigns)))
        if names:
            r.publish(keys.ARRIVALS, names)

    gateway.topups.broadcast = publish
    halts: list[Callable[[], None]] = []
    if settings.forward_linger_s > 0:
        halts.append(gateway.start_forwarder())
    halts.append(
        gateway.settler.start(idle_s=0.0, linger_s=settings.settle_linger_s, wait_s=WAIT_S)
    )
    log.info("background started: settler and forwarder", extra={"pid": os.getpid()})
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.warning("the gateway's HTTP process is gone; stopping")
            break
    for halt in reversed(halts):  # the settler's last pass first: it queues labels
        halt()
    client.close()
    log.info("background stopped")
