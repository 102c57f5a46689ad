"""The event bus: an in-memory one for embedded mode and Apache Kafka (kafka-python) for
distributed mode, behind one small interface used only by :mod:`maskprop_runtime.loop`."""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from maskprop_runtime import topics

log = logging.getLogger(__name__)

PARTITIONS = 3


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


class Producer(Protocol):
    def send(self, topic: str, key: bytes, value: bytes) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class Consumer(Protocol):
    def poll(self, timeout_s: float, max_records: int) -> list[Record]: ...
    def commit(self, records: Iterable[Record]) -> None: ...
    def keep_alive(self) -> None:
        """Stay in the consumer group during a long handler without consuming anything (the
        group drops a member that does not poll within ``max.poll.interval.ms``)."""
        ...

    def close(self) -> None: ...


class Bus(Protocol):
    def producer(self) -> Producer: ...
    def consumer(self, topics: list[str], group: str) -> Consumer: ...
    def close(self) -> None: ...


def partition_for(key: bytes, partitions: int = PARTITIONS) -> int:
    return zlib.crc32(key) % partitions


# --------------------------------------------------------------------------- in memory
class InMemoryBus:
    """Topics with partitions and consumer groups with committed offsets, in one process.

    Semantics follow Kafka where tests rely on them: per-key order, at-least-once delivery
    (a consumer closed without committing makes its group re-read from the last commit).
    """

    def __init__(self, partitions: int = PARTITIONS) -> None:
        self.partitions = partitions
        self._lock = threading.Lock()
        self._logs: dict[str, list[list[tuple[bytes, bytes]]]] = {}
        self._committed: dict[tuple[str, str, int], int] = defaultdict(int)

    def _topic(self, topic: str) -> list[list[tuple[bytes, bytes]]]:
        if topic not in self._logs:
            self._logs[topic] = [[] for _ in range(self.partitions)]
        return self._logs[topic]

    def append(self, topic: str, key: bytes, value: bytes) -> None:
        with self._lock:
            self._topic(topic)[partition_for(key, self.partitions)].append((key, value))

    def read(self, topic: str) -> list[Record]:
        """Every record of a topic (for tests and reports)."""
        with self._lock:
            parts = self._topic(topic)
            return [
                Record(topic, p, o, k, v)
                for p, log_ in enumerate(parts)
                for o, (k, v) in enumerate(log_)
            ]

    def producer(self) -> InMemoryProducer:
        return InMemoryProducer(self)

    def consumer(self, topics: list[str], group: str) -> InMemoryConsumer:
        return InMemoryConsumer(self, topics, group)

    def close(self) -> None:
        return None


class InMemoryProducer:
    def __init__(self, bus: InMemoryBus) -> None:
        self._bus = bus
        self._pending: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._pending.append((topic, key, value))

    def flush(self) -> None:
        for topic, key, value in self._pending:
            self._bus.append(topic, key, value)
        self._pending.clear()

    def close(self) -> None:
        self.flush()


class InMemoryConsumer:
    def __init__(self, bus: InMemoryBus, topics: list[str], group: str) -> None:
        self._bus = bus
        self._topics = list(topics)
        self._group = group
        with bus._lock:
            self._position = {
                (t, p): bus._committed[(group, t, p)]
                for t in self._topics
                for p in range(bus.partitions)
                if bus._topic(t) is not None
            }

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        out: list[Record] = []
        with self._bus._lock:
            for (t, p), pos in sorted(self._position.items()):
                log_ = self._bus._topic(t)[p]
                while pos < len(log_) and len(out) < max_records:
                    k, v = log_[pos]
                    out.append(Record(t, p, pos, k, v))
                    pos += 1
                self._position[(t, p)] = pos
        if not out and timeout_s > 0:
            time.sleep(min(timeout_s, 0.01))
        return out

    def commit(self, records: Iterable[Record]) -> None:
        with self._bus._lock:
            for r in records:
                k = (self._group, r.topic, r.partition)
                self._bus._committed[k] = max(self._bus._committed[k], r.offset + 1)

    def keep_alive(self) -> None:
        return None  # no group membership to lose in one process

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- Kafka
class KafkaBus:
    """Apache Kafka through kafka-python: idempotent producer with acks=all, manual commits."""

    def __init__(
        self,
        bootstrap: str,
        *,
        session_timeout_ms: int = 10_000,
        connect_timeout_s: float = 120.0,
        partitions: int = PARTITIONS,
        namespace: str = "",
        max_message_bytes: int = topics.MAX_MESSAGE_BYTES,
    ) -> None:
        # Physical topic names are "<namespace>.<topic>" when a namespace is set, so several
        # deployments (or test runs) can share one broker; services only see logical names.
        self.namespace = namespace
        self.bootstrap = bootstrap
        self.session_timeout_ms = session_timeout_ms
        self.connect_timeout_s = connect_timeout_s
        self.partitions = partitions
        # Set on the topics this bus creates (issue #15: producers bound their records by it).
        self.max_message_bytes = max_message_bytes
        self._created: set[str] = set()

    def _retry(self, what: str, fn: Any) -> Any:
        from kafka.errors import KafkaError

        delay, deadline = 0.5, time.monotonic() + self.connect_timeout_s
        while True:
            try:
                return fn()
            except KafkaError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach Kafka at {self.bootstrap} ({what}): {exc}"
                    ) from exc
                log.warning(
                    "cannot reach Kafka, retrying",
                    extra={
                        "bootstrap": self.bootstrap,
                        "what": what,
                        "error": str(exc),
                        "retry_in_s": delay,
                    },
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    @contextmanager
    def _admin(self) -> Iterator[Any]:
        """A Kafka admin client (retried while the broker is unreachable), closed after."""
        from kafka.admin import KafkaAdminClient

        admin = self._retry(
            "admin",
            lambda: KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="maskprop"),
        )
        try:
            yield admin
        finally:
            admin.close()

    def ensure_topics(self, topics: Iterable[str]) -> None:
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        missing = [self.physical(t) for t in topics if self.physical(t) not in self._created]
        if not missing:
            return
        with self._admin() as admin:
            existing = set(admin.list_topics())
            config = {"max.message.bytes": str(self.max_message_bytes)}
            new = [
                NewTopic(t, self.partitions, 1, topic_configs=config)
                for t in missing
                if t not in existing
            ]
            if new:
                try:
                    admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass
        self._created.update(missing)

    def drop_namespace(self) -> list[str]:
        """Delete every topic of this bus's namespace (a benchmark's or a test run's, when it
        ends, so a shared broker's disk does not fill with them); returns their names.  Refused
        without a namespace: the topics of a deployment are never deleted by code."""
        if not self.namespace:
            raise ValueError("drop_namespace needs a namespace: it never deletes shared topics")
        with self._admin() as admin:
            ours = sorted(t for t in admin.list_topics() if t.startswith(f"{self.namespace}."))
            if ours:
                admin.delete_topics(ours, timeout_ms=30_000)
        self._created.clear()
        return ours

    def physical(self, topic: str) -> str:
        return f"{self.namespace}.{topic}" if self.namespace else topic

    def logical(self, topic: str) -> str:
        prefix = f"{self.namespace}."
        return topic[len(prefix) :] if self.namespace and topic.startswith(prefix) else topic

    def producer(self) -> KafkaProducerAdapter:
        from kafka import KafkaProducer

        p = self._retry(
            "producer",
            lambda: KafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_request_size=16 * 1024 * 1024,
                retries=2**31 - 1,
            ),
        )
        return KafkaProducerAdapter(p, self.physical)

    def consumer(self, topics: list[str], group: str) -> KafkaConsumerAdapter:
        from kafka import KafkaConsumer

        self.ensure_topics(topics)
        c = self._retry(
            "consumer",
            lambda: KafkaConsumer(
                *[self.physical(t) for t in topics],
                bootstrap_servers=self.bootstrap,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=max(self.session_timeout_ms // 3, 500),
                max_poll_interval_ms=600_000,
                fetch_max_bytes=64 * 1024 * 1024,
                max_partition_fetch_bytes=16 * 1024 * 1024,
            ),
        )
        return KafkaConsumerAdapter(c, self.logical)

    def close(self) -> None:
        return None


class KafkaProducerAdapter:
    def __init__(self, producer: Any, physical: Any) -> None:
        self._p = producer
        self._physical = physical
        self._futures: list[Any] = []

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._futures.append(self._p.send(self._physical(topic), key=key, value=value))

    def flush(self) -> None:
        self._p.flush()
        futures, self._futures = self._futures, []
        for f in futures:
            f.get(timeout=60)  # raise if a send failed: the caller must not commit

    def close(self) -> None:
        self.flush()
        self._p.close()


class KafkaConsumerAdapter:
    def __init__(self, consumer: Any, logical: Any) -> None:
        self._c = consumer
        self._logical = logical
        self._physical: dict[str, str] = {}

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        batches = self._c.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[Record] = []
        for tp, msgs in batches.items():
            name = self._logical(tp.topic)
            self._physical[name] = tp.topic
            out.extend(
                Record(name, tp.partition, m.offset, m.key or b"", m.value or b"") for m in msgs
            )
        out.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return out

    def commit(self, records: Iterable[Record]) -> None:
        from kafka import TopicPartition
        from kafka.errors import CommitFailedError, RebalanceInProgressError
        from kafka.structs import OffsetAndMetadata

        offsets: dict[Any, Any] = {}
        for r in records:
            tp = TopicPartition(self._physical.get(r.topic, r.topic), r.partition)
            nxt = r.offset + 1
            if tp not in offsets or offsets[tp].offset < nxt:
                offsets[tp] = OffsetAndMetadata(nxt, "", -1)
        if not offsets:
            return
        for attempt in range(5):
            try:
                self._c.commit(offsets)
                return
            except RebalanceInProgressError:
                time.sleep(0.2 * (attempt + 1))
            except CommitFailedError:
                # The group moved on: these records will be redelivered; handlers are idempotent.
                log.warning("commit failed after a rebalance; records will be redelivered")
                return
        log.warning("commit kept hitting a rebalance; records will be redelivered")

    def keep_alive(self) -> None:
        """Poll with every assigned partition paused: the poll counts for
        ``max.poll.interval.ms`` and runs a pending rebalance, but fetches nothing.  A
        partition assigned by that rebalance is not paused yet and may return records: each
        is sought back to its first returned offset, so nothing is skipped."""
        assigned = self._c.assignment()
        self._c.pause(*assigned)
        try:
            got = self._c.poll(timeout_ms=0)
            for tp, msgs in got.items():
                if msgs:
                    self._c.seek(tp, min(m.offset for m in msgs))
        finally:
            self._c.resume(*self._c.assignment())

    def close(self) -> None:
        self._c.close(autocommit=False)


def make_bus(kafka_bootstrap: str | None, **kwargs: Any) -> Bus:
    """The in-memory bus when no bootstrap servers are configured, else Kafka."""
    if kafka_bootstrap is None:
        return InMemoryBus()
    return KafkaBus(kafka_bootstrap, **kwargs)
