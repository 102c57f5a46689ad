"""Redis CPU of the gateway's question pool (issue #15): today's ``maskprop_gateway.pool``
against the one of commit ``--before`` (default 0656b1e: a seen-by set and a holders hash a
question, the repair sweep pipelining a ZSCORE and an HVALS a question), both loaded in this
process and run alternately on the same real Redis server.

``cycle``: ``--questions`` questions (~1 KB views) go through claim -> settle (decided) ->
done in leases of ``--batch`` by 64 workers, the path every real question takes; Redis CPU
(``INFO cpu``, user + system) and client CPU a question.

``sweep``: ``--questions`` open questions, half of them held by live leases; two repair-sweep
reads (:meth:`QuestionPool.unheld`): one after every hold lapsed (all listed), one while they
hold (none listed); Redis CPU, client CPU and wall time of the pair.

Each side runs ``--repeats`` times, alternately, on a flushed database; printed: the mean
over the repeats with p50/p99 beside it, and today's / before.  Needs the real Redis
(``bash scripts/dev-infra.sh up && source .cache/dev-infra/env``; an empty database of 1-15)::

    .venv/bin/python benchmarks/bench_gateway_pool.py cycle
    .venv/bin/python benchmarks/bench_gateway_pool.py sweep
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "0656b1e"  # the last commit with item:{q}:seen and item:{q}:holders
VIEW = '{"view": "' + "x" * 1000 + '"}'


def pool_classes(before: str) -> dict[str, Any]:
    """``{"today": QuestionPool, before: QuestionPool}``; the old one reads the key schema of
    its own commit (its functions look ``keys`` up in their module's globals)."""
    from bench_sink import module_at
    from maskprop_gateway.pool import QuestionPool

    folder = "services/verify-gateway/maskprop_gateway"
    old_keys = module_at(before, f"{folder}/keys.py", f"keys_{before}")
    old_pool = module_at(before, f"{folder}/pool.py", f"pool_{before}")
    old_pool.keys = old_keys  # type: ignore[attr-defined]
    return {"today": QuestionPool, before: old_pool.QuestionPool}


def _redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _fill(pool: Any, campaign: str, n: int) -> list[str]:
    qids = [f"{campaign}:1:{i}:{i}" for i in range(n)]
    for lo in range(0, n, 2000):
        pool.add(campaign, {q: VIEW for q in qids[lo : lo + 2000]}, 1000.0)
    return qids


def cycle(r: Any, cls: Any, n: int, batch: int) -> dict[str, float]:
    r.flushdb()
    pool, c = cls(r), "camp"
    _fill(pool, c, n)
    redis0, client0 = _redis_cpu(r), time.process_time()
    done = 0
    for k in range(n // batch):
        worker = f"v:w{k % 64}"
        got = [q for q, _ in pool.claim(c, worker, batch, 2000.0, 1000.0 + k * 1e-3, 1)]
        pool.settle(worker, {q: (0, True) for q in got})
        pool.done(got)
        done += len(got)
    redis1, client1 = _redis_cpu(r), time.process_time()
    if done != n // batch * batch:
        raise SystemExit(f"error: {done} questions went through, expected {n // batch * batch}")
    return {
        "redis_us": 1e6 * (redis1 - redis0) / done,
        "client_us": 1e6 * (client1 - client0) / done,
    }


def sweep(r: Any, cls: Any, n: int, batch: int) -> dict[str, float]:
    r.flushdb()
    pool, c = cls(r), "camp"
    _fill(pool, c, n)
    for k in range(n // 2 // batch):
        pool.claim(c, f"v:w{k}", batch, 2000.0, 1000.0, 1)
    redis0, client0, wall0 = _redis_cpu(r), time.process_time(), time.perf_counter()
    lapsed = sum(len(chunk) for chunk in pool.unheld(c, 3000.0))
    live = sum(len(chunk) for chunk in pool.unheld(c, 1500.0))
    redis1, client1, wall1 = _redis_cpu(r), time.process_time(), time.perf_counter()
    held = n // 2 // batch * batch
    if (lapsed, live) != (held, 0):
        raise SystemExit(f"error: the sweep listed {lapsed} and {live}, expected {held} and 0")
    return {
        "redis_ms": 1e3 * (redis1 - redis0),
        "client_ms": 1e3 * (client1 - client0),
        "wall_ms": 1e3 * (wall1 - wall0),
    }


def _row(name: str, runs: list[dict[str, float]]) -> str:
    from bench_gateway import percentile

    parts = []
    for key in runs[0]:
        xs = [run[key] for run in runs]
        mean, p50, p99 = statistics.fmean(xs), percentile(xs, 50), percentile(xs, 99)
        parts.append(f"{key} {mean:.2f} (p50 {p50:.2f}, p99 {p99:.2f})")
    return f"{name:>8}: " + ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["cycle", "sweep"])
    ap.add_argument("--questions", type=int, default=40_000)
    ap.add_argument("--batch", type=int, default=95)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", default=BEFORE)
    args = ap.parse_args()
    if args.questions < 2 * args.batch or args.batch < 1 or args.repeats < 1:
        raise SystemExit("error: need --questions >= 2 x --batch >= 2 and --repeats >= 1")
    import redis

    sys.path[:0] = [str(ROOT / "benchmarks")]
    from bench_gateway import empty_db

    base = os.environ.get("REDIS_URL") or os.environ.get("MASKPROP_IT_REDIS")
    if not base:
        raise SystemExit("error: run `bash scripts/dev-infra.sh up && source .cache/dev-infra/env`")
    r = redis.Redis.from_url(empty_db(base))
    classes = pool_classes(args.before)
    run = cycle if args.mode == "cycle" else sweep
    results: dict[str, list[dict[str, float]]] = {name: [] for name in classes}
    try:
        for _ in range(args.repeats):
            for name, cls in classes.items():
                results[name].append(run(r, cls, args.questions, args.batch))
    finally:
        r.flushdb()
    print(
        f"{args.mode}: {args.questions} questions, batches of {args.batch}, "
        f"{args.repeats} repeats each, alternately, real Redis"
    )
    for name, runs in results.items():
        print(_row(name, runs))
    today, before = results["today"], results[args.before]
    for key in today[0]:
        ratio = statistics.fmean(x[key] for x in today) / statistics.fmean(x[key] for x in before)
        print(f"today / {args.before} {key}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
