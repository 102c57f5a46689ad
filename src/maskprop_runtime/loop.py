"""The one consume -> handle -> produce -> commit loop every service runs.

A handler is a plain function ``handler(message, record) -> list[Emit]``: it receives a typed
protobuf message (never raw bytes), makes its effects durable (files, Redis), and returns the
events to publish.  The loop publishes them, waits for the broker's acks (acks=all), records
the event id as processed, and only then commits the consumed offsets.  A crash anywhere before
the commit means redelivery; handlers are idempotent and output event ids are derived from
input ids, so a redelivered event has no second effect downstream either.

Undecodable events and events a handler declares invalid (:class:`InvalidEvent`) go to the
dead-letter topic with the reason; the consumer never stops on them.  Infrastructure errors
(Redis or Kafka unreachable) propagate: the caller restarts the loop and the events come again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message

from maskprop_runtime import metrics, topics
from maskprop_runtime.bus import Bus, Consumer, Producer, Record
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.watchdog import Heartbeat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Emit:
    topic: str
    key: bytes
    message: Message


Handler = Callable[[Message, Record], list[Emit]]


class InvalidEvent(ValueError):
    """The event is well-formed protobuf but cannot be processed; park it with this reason."""


#: Seconds a dedup record lives (7 days): far beyond any redelivery window (a consumer
#: group's uncommitted offsets come back within minutes; Kafka keeps topics ~7 days by default).
DEDUP_TTL_S = 7 * 24 * 3600


class DedupStore:
    """Event ids already handled by a service (embedded mode uses fakeredis).

    One Redis key per event id, ``maskprop:dedup:{service}:{event_id}``, that expires after
    ``ttl_s`` seconds: a record lives long enough to catch any redelivery and then frees its
    memory (one set that never expired grew by every event ever handled).  :meth:`seen` is one
    EXISTS; :meth:`mark` writes a poll batch's ids in one round trip."""

    def __init__(self, redis: object, service: str, *, ttl_s: float = DEDUP_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self._r = redis
        self._prefix = f"maskprop:dedup:{service}:"
        self._ttl_s = max(1, round(ttl_s))

    def seen(self, event_id: str) -> bool:
        return bool(self._r.exists(self._prefix + event_id))  # type: ignore[attr-defined]

    def mark(self, event_ids: list[str]) -> None:
        if not event_ids:
            return
        pipe = self._r.pipeline(transaction=False)  # type: ignore[attr-defined]
        for event_id in event_ids:
            pipe.set(self._prefix + event_id, b"1", ex=self._ttl_s)
        pipe.execute()


class EventLoop:
    """Consume ``handlers``' topics as consumer group ``group`` and run them."""

    def __init__(
        self,
        *,
        service: str,
        bus: Bus,
        group: str,
        handlers: dict[str, Handler],
        dedup: DedupStore | None = None,
        max_records: int = 50,
    ) -> None:
        self.service = service
        self.bus = bus
        self.group = group
        self.handlers = handlers
        self.dedup = dedup
        self.max_records = max_records
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        # Beaten each time :meth:`run` goes round (an idle poll returns every ``poll_s``):
        # the service's watchdog fails its health check when it stops (watchdog.py).
        self.heartbeat = Heartbeat(f"{service} consumer")

    def _ensure(self) -> tuple[Consumer, Producer]:
        if self._producer is None:
            self._producer = self.bus.producer()
        if self._consumer is None:
            self._consumer = self.bus.consumer(sorted(self.handlers), self.group)
        return self._consumer, self._producer

    def _decode(self, rec: Record) -> Message:
        cls = topics.PAYLOADS[rec.topic]
        msg = cls()
        try:
            msg.ParseFromString(rec.value)
        except DecodeError as exc:
            raise InvalidEvent(f"payload is not a {cls.DESCRIPTOR.full_name}: {exc}") from None
        if len(unknown_fields.UnknownFieldSet(msg)):
            # Parsed, but carries fields this schema does not know: another topic's payload.
            raise InvalidEvent(f"payload has fields unknown to {cls.DESCRIPTOR.full_name}")
        return msg

    def _dead_letter(self, producer: Producer, rec: Record, reason: str) -> None:
        dl = common_pb2.DeadLetter(
            service=self.service,
            source_topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            payload=rec.value,
            reason=reason,
        )
        producer.send(topics.DEADLETTER, rec.key, dl.SerializeToString())
        metrics.EVENTS_DEADLETTERED.labels(self.service).inc()
        log.warning(
            "event dead-lettered",
            extra={
                "topic": rec.topic,
                "partition": rec.partition,
                "offset": rec.offset,
                "reason": reason,
            },
        )

    def step(self, timeout_s: float = 0.5) -> int:
        """Poll once and handle what came; returns the number of records consumed."""
        consumer, producer = self._ensure()
        records = consumer.poll(timeout_s, self.max_records)
        if not records:
            return 0
        handled_ids: list[str] = []
        for rec in records:
            started = time.perf_counter()
            try:
                msg = self._decode(rec)
                event_id = str(getattr(msg, "event_id", "") or "")
                if event_id and self.dedup is not None and self.dedup.seen(event_id):
                    metrics.EVENTS_DUPLICATE.labels(self.service).inc()
                    continue
                outputs = self.handlers[rec.topic](msg, rec)
            except InvalidEvent as exc:
                self._dead_letter(producer, rec, str(exc))
                continue
            for out in outputs:
                producer.send(out.topic, out.key, out.message.SerializeToString())
                metrics.EVENTS_PRODUCED.labels(self.service, out.topic).inc()
            if event_id:
                handled_ids.append(event_id)
            metrics.EVENTS_CONSUMED.labels(self.service, rec.topic).inc()
            metrics.HANDLER_SECONDS.labels(self.service, rec.topic).observe(
                time.perf_counter() - started
            )
        producer.flush()  # outputs acknowledged by the broker before anything is committed
        if self.dedup is not None:
            self.dedup.mark(handled_ids)
        consumer.commit(records)
        return len(records)

    def keep_alive(self) -> None:
        """For a handler that runs long (the clusterer waiting for a tree build): keep the
        consumer's group membership without consuming (:meth:`Consumer.keep_alive`).  Call it
        from the loop's own thread, every few seconds."""
        self.heartbeat.beat()
        if self._consumer is not None:
            self._consumer.keep_alive()

    def run(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Run until ``stop`` is set; on an infrastructure error, reconnect and go on."""
        delay = 0.5
        while not stop.is_set():
            self.heartbeat.beat()
            try:
                self.step(poll_s)
                delay = 0.5
            except Exception:
                log.exception("event loop error; reconnecting", extra={"retry_in_s": delay})
                self.close()
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
        self.close()

    def close(self) -> None:
        for closer in (self._consumer, self._producer):
            if closer is not None:
                try:
                    closer.close()
                except Exception:
                    log.warning("error while closing a bus client", exc_info=True)
        self._consumer = None
        self._producer = None


def run_until_idle(loops: list[EventLoop], max_rounds: int = 1_000_000) -> int:
    """Embedded mode: step every loop until none has anything left; returns records handled."""
    total = 0
    for _ in range(max_rounds):
        n = sum(loop.step(0.0) for loop in loops)
        total += n
        if n == 0:
            return total
    raise RuntimeError("event loops did not settle")
