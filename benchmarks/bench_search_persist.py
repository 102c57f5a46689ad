"""Bytes written to Redis per answer by search's saves, at a class of ~1M masks (issue #15,
item 2): the session's base + log (one chunk a save, a new base when the log reaches a quarter
of it) against the path before it, a whole snapshot every save.

A :class:`SearchCore` on a real Redis serves one class built like ``bench_session.py``'s (a
random full binary tree, hidden per-mask truth pure along runs of the depth-first order,
scores a noisy view of it) with a synthetic mask table (``--rle-bytes`` of RLE counts a mask).
A noise-free crowd leases ``--lease`` questions a call and submits their answers in one call.
Redis's own ``total_net_input_bytes`` is read around every call: everything search sent
(survey, locks, the save with its chunk or base, lease zset changes, counters, label events in
the outbox).  The outbox entries (label events: the LABELS side) are counted apart and
deleted after each call.  The path before wrote ``len(session.snapshot())`` where this one
writes a chunk or a base: its figure is this run's bytes with each save's chunk/base replaced
by the snapshot taken at that save (the rest of the save was the same).

Run (heavy: ~2 GB and a few minutes at 1M; needs the dev Redis)::

    flock /tmp/mp7/heavy.lock bash -c 'bash scripts/dev-infra.sh up >/dev/null; \\
      source .cache/dev-infra/env; .venv/bin/python benchmarks/bench_search_persist.py'
    .venv/bin/python benchmarks/bench_search_persist.py --masks 20000 --answers 3000
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import redis as redis_lib
from bench_session import hidden_truth, random_tree
from maskprop_search import wire
from maskprop_search.core import SearchCore
from maskprop_search.store import (
    OUTBOXES_KEY,
    REPLICAS_KEY,
    class_prefix,
    classes_key,
    outbox_key,
)
from maskprop_search.wire import ClassMasks

from maskprop.data.masks import MaskTable
from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import AnnotationSession
from maskprop.tree import Tree
from maskprop_runtime.bus import InMemoryBus


def synthetic_class(n: int, seed: int, rle_bytes: int) -> tuple[Tree, np.ndarray, ClassMasks]:
    """(tree, truth bool[n], mask table) of one class of ``n`` masks, 20 masks an image."""
    rng = np.random.default_rng(seed)
    tree = random_tree(n, np.zeros(n), rng)
    truth = hidden_truth(tree, rng)
    scores = np.clip(np.where(truth, 0.75, 0.45) + rng.normal(0, 0.2, n), 0, 1)
    tree = Tree(
        tree.left, tree.right, tree.parent, tree.size, tree.height, tree.order, tree.start, scores
    )
    images = (n + 19) // 20
    img_ids = np.array([f"img{j}" for j in range(images)])
    table = MaskTable(
        mask_ids=np.array([f"m{i}" for i in range(n)]),
        image_ids=img_ids[np.arange(n) // 20],
        class_ids=np.zeros(n, np.int32),
        scores=scores.astype(np.float32),
        features=np.zeros((n, 0), np.float32),
        boxes=np.zeros((n, 4), np.float32),
        mask_ious=np.full(n, np.nan, np.float32),
        rle_h=np.full(n, 480, np.uint32),
        rle_w=np.full(n, 640, np.uint32),
        rle_blob=b"x" * (n * rle_bytes),
        rle_offsets=np.arange(n + 1, dtype=np.int64) * rle_bytes,
        img_ids=img_ids,
        img_w=np.full(images, 640, np.uint32),
        img_h=np.full(images, 480, np.uint32),
        img_files=np.array([f"images/img{j}.png" for j in range(images)]),
    )
    return tree, truth, ClassMasks.of(table, "bench")


class SaveMeter:
    """Wraps a session's ``take_log``/``rebase`` to count what each save wrote of the state,
    and what the whole snapshot (the path before) would have been at that save."""

    def __init__(self, session: AnnotationSession) -> None:
        self.state_bytes = 0
        self.snapshot_bytes = 0
        self.saves = 0
        self.rebases = 0
        take_log, rebase = session.take_log, session.rebase

        def counted_take_log() -> bytes:
            chunk = take_log()
            self.saves += 1
            self.state_bytes += len(chunk)
            self.snapshot_bytes += len(session.snapshot())
            return chunk

        def counted_rebase() -> bytes:
            base = rebase()
            self.saves += 1
            self.rebases += 1
            self.state_bytes += len(base)
            self.snapshot_bytes += len(base)
            return base

        session.take_log = counted_take_log  # type: ignore[method-assign]
        session.rebase = counted_rebase  # type: ignore[method-assign]


def net_in(r: redis_lib.Redis) -> int:
    return int(r.info("stats")["total_net_input_bytes"])


def run(r: redis_lib.Redis, n: int, answers: int, lease: int, seed: int, rle_bytes: int) -> None:
    t0 = time.perf_counter()
    tree, truth, masks = synthetic_class(n, seed, rle_bytes)
    params = AnnotationParams(prior_accept_threshold=0.0)
    selection = Selection(0.0, 0.0)
    campaign = f"bench-persist-{os.getpid()}"
    core = SearchCore(
        r, params, selection, InMemoryBus().producer(), seed=seed, publish_inline=False
    )
    session = AnnotationSession({0: tree}, params, selection, seed=seed)
    meter = SaveMeter(session)
    with core.store.locked(campaign, [0], load=False):
        meta = {"class_name": "bench", "tree_uri": "/nonexistent", "masks": n}
        core.store.create(campaign, 0, session, tree, masks, meta)
    meter.state_bytes = meter.snapshot_bytes = meter.saves = meter.rebases = 0  # the first base
    r.delete(outbox_key(campaign))
    setup_s = time.perf_counter() - t0
    sent = outbox = answered = calls = 0
    call_ms: list[float] = []
    while answered < answers:
        before = net_in(r)
        t1 = time.perf_counter()
        qs, done = core.lease(campaign, lease)
        if done or not qs:
            break
        ans = []
        for q in qs:
            _, question = wire.parse_question_id(q.question_id)
            ans.append((q.question_id, bool(truth[question.mask])))
        core.submit(ans)
        call_ms.append((time.perf_counter() - t1) * 1e3)
        sent += net_in(r) - before
        calls += 2
        answered += len(qs)
        entries = r.xrange(outbox_key(campaign))
        outbox += sum(len(f[b"v"]) + len(f[b"k"]) for _, f in entries)
        r.delete(outbox_key(campaign))
    # Clean up this run's keys.
    for key in r.scan_iter(match=f"{class_prefix(campaign)}*"):
        r.delete(key)
    r.delete(classes_key(campaign))
    r.srem(OUTBOXES_KEY, campaign)
    r.zrem(REPLICAS_KEY, core.store.replica_id)
    state_other = sent - outbox - meter.state_bytes  # survey, locks, leases, counters, keys
    before_path = meter.snapshot_bytes + state_other  # whole snapshot instead of chunk/base
    per = max(answered, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"n={n:,} answers={answered:,} calls={calls} saves={meter.saves} "
        f"rebases={meter.rebases} setup {setup_s:.1f} s, lease+submit p50/p99 "
        f"{np.percentile(call_ms, 50):.1f}/{np.percentile(call_ms, 99):.1f} ms, "
        f"peak RSS {rss:.2f} GiB"
    )
    print(
        f"  bytes to Redis per answer (search state: chunks/bases + leases + counters + "
        f"commands): {(sent - outbox) / per:,.0f} B"
        f"  [chunks+bases {meter.state_bytes / per:,.0f} B, the rest {state_other / per:,.0f} B]"
    )
    print(f"  label events into the outbox per answer (LABELS side): {outbox / per:,.0f} B")
    print(f"  all bytes to Redis per answer: {sent / per:,.0f} B")
    snapshot = meter.snapshot_bytes / max(meter.saves, 1)
    print(
        f"  the path before (whole snapshot a save, {snapshot:,.0f}"
        f" B each): {before_path / per:,.0f} B per answer of state; ratio before/now "
        f"{before_path / max(sent - outbox, 1):,.0f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=int, default=1_000_000)
    ap.add_argument("--answers", type=int, default=20_000)
    ap.add_argument("--lease", type=int, default=100, help="questions a lease; one submit each")
    ap.add_argument("--rle-bytes", type=int, default=120, help="RLE counts a mask")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()
    r = redis_lib.Redis.from_url(args.redis_url)
    run(r, args.masks, args.answers, args.lease, args.seed, args.rle_bytes)


if __name__ == "__main__":
    main()
