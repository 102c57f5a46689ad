"""Event throughput on the real broker (needs `scripts/dev-infra.sh up`).

1. The shared consume -> handle -> produce -> commit loop (maskprop_runtime.loop.EventLoop,
   with protobuf decoding, dedup in Redis and acks=all) against the named baseline
   "raw kafka-python": the same poll -> produce -> flush -> commit cycle with no decoding,
   no dedup.  Printed as events/s and the ratio.
2. Masks ingested per second by the clusterer (MaskStreamEvent batches of 500 masks decoded,
   validated and stored), against the baseline "raw kafka-python consume" (the same records
   fetched by a bare consumer), and the time to build the tree afterwards.

    source .cache/dev-infra/env && python benchmarks/bench_bus.py [--events 20000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from maskprop_clusterer.service import ClustererSettings, build_clusterer
from maskprop_detector.simulated import pool_events

from maskprop.simulate.generator import ade_like_pool
from maskprop_runtime import topics
from maskprop_runtime.bus import KafkaBus
from maskprop_runtime.loop import DedupStore, Emit, EventLoop
from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2
from maskprop_runtime.store import make_redis


def payload(i: int) -> bytes:
    return clusterer_pb2.TreeBuilt(
        event_id=f"bench.{i}", campaign="bench", class_id=i % 100, tree_uri="x" * 900
    ).SerializeToString()


def fill(bus: KafkaBus, topic: str, n: int) -> None:
    p = bus.producer()
    for i in range(n):
        p.send(topic, f"k{i % 64}".encode(), payload(i))
    p.close()


def drain(step, expected: int, timeout: float = 600.0) -> float:
    started = time.perf_counter()
    done = 0
    while done < expected:
        done += step()
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"only {done}/{expected} events after {timeout}s")
    return time.perf_counter() - started


def bench_loop(bootstrap: str, redis_url: str, n: int) -> None:
    ns = f"bench{uuid.uuid4().hex[:6]}"
    bus = KafkaBus(bootstrap, namespace=ns)
    bus.ensure_topics([topics.TREES, topics.LABELS, topics.DEADLETTER])
    fill(bus, topics.TREES, n)
    fill(bus, topics.LABELS, n)  # the baseline's input: same count, same sizes

    def forward(msg, rec) -> list[Emit]:
        return [Emit(topics.DEADLETTER, rec.key, msg)]

    loop = EventLoop(
        service=f"bench-{ns}",
        bus=bus,
        group=f"{ns}-loop",
        handlers={topics.TREES: forward},
        dedup=DedupStore(make_redis(redis_url), f"bench-{ns}"),
        max_records=500,
    )
    ours = drain(lambda: loop.step(1.0), n)
    loop.close()

    consumer = KafkaConsumer(
        bus.physical(topics.LABELS),
        bootstrap_servers=bootstrap,
        group_id=f"{ns}-raw",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    out_topic = bus.physical(topics.DEADLETTER)

    def raw_step() -> int:
        batches = consumer.poll(timeout_ms=1000, max_records=500)
        count = 0
        offsets = {}
        for tp, msgs in batches.items():
            for m in msgs:
                producer.send(out_topic, key=m.key, value=m.value)
                count += 1
            offsets[TopicPartition(tp.topic, tp.partition)] = OffsetAndMetadata(
                msgs[-1].offset + 1, "", -1
            )
        producer.flush()
        if offsets:
            consumer.commit(offsets)
        return count

    raw = drain(raw_step, n)
    consumer.close()
    producer.close()
    print(
        f"event loop      : {n / ours:8.0f} events/s   raw kafka-python: {n / raw:8.0f} events/s"
        f"   throughput ours/raw = {raw / ours:.2f}"
    )


def bench_clusterer(bootstrap: str, redis_url: str, masks: int) -> None:
    ns = f"bench{uuid.uuid4().hex[:6]}"
    bus = KafkaBus(bootstrap, namespace=ns)
    pool = ade_like_pool(masks, 1, seed=0, dim=32)
    events = list(pool_events(pool, ns))  # a fresh campaign: dedup ids never seen before
    p = bus.producer()
    for key, ev in events[:-1]:  # hold "closed" back: measure ingest alone first
        p.send(topics.MASKS, key, ev.SerializeToString())
    p.close()
    # Baseline: the same records consumed by a bare kafka-python consumer (no decoding).
    raw_consumer = KafkaConsumer(
        bus.physical(topics.MASKS),
        bootstrap_servers=bootstrap,
        group_id=f"{ns}-raw",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    batches = len(events) - 1

    def raw_step() -> int:
        return sum(len(m) for m in raw_consumer.poll(timeout_ms=1000, max_records=20).values())

    raw_only = drain(raw_step, batches)
    raw_consumer.close()
    with tempfile.TemporaryDirectory() as tmp:
        settings = ClustererSettings(data_dir=Path(tmp), kafka_max_poll_records=20)
        loop = build_clusterer(settings, bus, make_redis(redis_url))
        loop.group = f"{ns}-clusterer"
        ingest = drain(lambda: loop.step(1.0), len(events) - 1)
        p = bus.producer()
        key, closed = events[-1]
        p.send(topics.MASKS, key, closed.SerializeToString())
        p.close()
        build = drain(lambda: loop.step(1.0), 1)
        loop.close()
        if not (Path(tmp) / "trees" / ns / "0" / "tree.npz").is_file():
            raise SystemExit("error: the clusterer did not build the tree (see its dead letters)")
    print(
        f"clusterer ingest: {masks / ingest:8.0f} masks/s   raw kafka-python consume: "
        f"{masks / raw_only:8.0f} masks/s   throughput ours/raw = {raw_only / ingest:.2f}"
        f"   tree of {masks} masks built in {build:.1f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--masks", type=int, default=20_000)
    args = ap.parse_args()
    bootstrap = os.environ.get("MASKPROP_IT_KAFKA") or os.environ.get("KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("MASKPROP_IT_REDIS") or os.environ.get("REDIS_URL")
    if not (bootstrap and redis_url):
        raise SystemExit("error: run `bash scripts/dev-infra.sh up && source .cache/dev-infra/env`")
    bench_loop(bootstrap, redis_url, args.events)
    bench_clusterer(bootstrap, redis_url, args.masks)


if __name__ == "__main__":
    main()
