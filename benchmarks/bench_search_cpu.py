"""CPU per answer of the search service's core, one thread (no gRPC, no broker).

Clusterer and search wired on the in-memory bus (as the in-process tests do) over a real
Redis (``--redis``, a database this script flushes) or fakeredis; a crowd leases
``--batch`` questions and answers them from the pool's true IoU until the campaign is done.
Printed: CPU microseconds an answer (``time.process_time``: other processes on the machine
do not count) for the service, against the named baseline "library alone": the same
per-class ``AnnotationSession`` objects driven with the same lease/answer loop, no Redis,
no protobuf.  Also a hash of the labels, to compare runs of two versions.

    python benchmarks/bench_search_cpu.py [--redis redis://127.0.0.1:6390/9] [--masks 60000]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
from maskprop_clusterer.service import ClustererSettings, build_clusterer
from maskprop_detector.simulated import pool_events
from maskprop_search.service import SearchSettings, build_search

from maskprop.session import AnnotationSession, Answer
from maskprop.simulate.generator import ade_like_pool
from maskprop.simulate.scenes import pool_index
from maskprop.tree import build_tree
from maskprop_runtime import topics
from maskprop_runtime.bus import InMemoryBus
from maskprop_runtime.loop import run_until_idle
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from maskprop_runtime.store import make_redis


def service(pool, redis, batch: int, relay: bool) -> tuple[float, int, str]:
    """(CPU seconds, answers, label hash) of the service answering the whole pool."""
    bus = InMemoryBus()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        clusterer = build_clusterer(ClustererSettings(data_dir=state), bus, redis)
        settings = SearchSettings(data_dir=state)
        core, search_loop = build_search(settings, bus, redis, relay=relay)
        producer = bus.producer()
        for key, ev in pool_events(pool, "bench", batch_size=500):
            producer.send(topics.MASKS, key, ev.SerializeToString())
        producer.flush()
        run_until_idle([clusterer, search_loop])
        n = 0
        c0 = time.process_time()
        while True:
            qs, done = core.lease("bench", batch)
            if done or not qs:
                break
            ious = pool.ious[[pool_index(q.mask_id) for q in qs]]
            core.submit(
                (q.question_id, bool(v >= settings.iou_threshold))
                for q, v in zip(qs, ious, strict=True)
            )
            n += len(qs)
        core.drain_outbox()  # with the relay: what its thread would have published
        cpu = time.process_time() - c0
    labels = {}
    for rec in bus.read(topics.LABELS):
        for lab in search_pb2.LabelsPropagated.FromString(rec.value).labels:
            labels[lab.mask_id] = (lab.accepted, lab.source, lab.node, lab.outcome)
    digest = hashlib.sha256(repr(sorted(labels.items())).encode()).hexdigest()[:16]
    return cpu, n, digest


def library(pool, batch: int) -> tuple[float, int]:
    """The baseline: per-class sessions, the same lease/answer loop, nothing else."""
    settings = SearchSettings()
    sessions, index = {}, {}
    for c in np.unique(pool.class_ids).tolist():
        index[c] = np.flatnonzero(pool.class_ids == c)
        tree = build_tree(pool.features[index[c]], pool.scores[index[c]])
        sessions[c] = AnnotationSession(
            {c: tree}, settings.params(), settings.selection(), seed=settings.seed
        )
    n = 0
    c0 = time.process_time()
    while True:
        got = 0
        for c, s in sessions.items():
            if got >= batch:
                break
            qs = s.lease(batch - got)
            got += len(qs)
            ious = pool.ious[index[c][[q.mask for q in qs]]]
            s.submit(
                Answer(q.class_id, q.node, q.mask, bool(v >= settings.iou_threshold))
                for q, v in zip(qs, ious, strict=True)
            )
            s.pop_decisions()
            n += len(qs)
        if not got:
            break
    return time.process_time() - c0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", help="a Redis database to use (flushed); default fakeredis")
    ap.add_argument("--masks", type=int, default=60000)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--batch", type=int, default=100, help="questions a lease")
    ap.add_argument("--relay", action="store_true", help="publish once at the end, not per call")
    args = ap.parse_args()
    pool = ade_like_pool(args.masks, args.classes, seed=11, dim=16)
    redis = make_redis(args.redis, connect_timeout_s=5)  # None: fakeredis
    redis.flushdb()
    base_cpu, base_n = library(pool, args.batch)
    cpu, n, digest = service(pool, redis, args.batch, args.relay)
    redis.flushdb()
    base_us, us = 1e6 * base_cpu / base_n, 1e6 * cpu / n
    where = args.redis or "fakeredis"
    print(f"pool {args.masks} masks, {args.classes} classes, lease {args.batch}; redis {where}")
    print(f"library alone (baseline): {base_n} answers, {base_us:.0f} us CPU an answer")
    print(
        f"search service core:      {n} answers, {us:.0f} us CPU an answer "
        f"({us / base_us:.1f}x the library)"
    )
    print(f"labels sha256 {digest}")


if __name__ == "__main__":
    main()
