"""CPU of a redis-py round trip from one thread, from many threads, and from asyncio tasks.

Why the gateway's hot routes run on the event loop (maskprop_gateway.app): the same Redis
round trips cost far more CPU when several threads make them, because the GIL changes hands
around every blocking call.  Named baseline: **one thread**, synchronous redis-py, GET of a
short value, in the same process and run.  Printed: CPU microseconds (user + system of this
process) a round trip, and the ratio to the baseline.

    source .cache/dev-infra/env && .venv/bin/python benchmarks/bench_redis_threads.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from collections.abc import Callable


def cpu_per_call(n: int, run: Callable[[], None]) -> float:
    t0 = time.process_time()
    run()
    return 1e6 * (time.process_time() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    import redis
    import redis.asyncio as aredis
    import uvloop

    n, k = args.calls, args.threads
    r = redis.Redis.from_url(args.redis)
    r.set("maskprop:bench:k", "v")

    def one_thread() -> None:
        for _ in range(n):
            r.get("maskprop:bench:k")

    def many_threads() -> None:
        def work() -> None:
            for _ in range(n // k):
                r.get("maskprop:bench:k")

        threads = [threading.Thread(target=work) for _ in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def tasks() -> None:
        async def run() -> None:
            ar = aredis.Redis.from_url(args.redis)

            async def work() -> None:
                for _ in range(n // k):
                    await ar.get("maskprop:bench:k")

            await asyncio.gather(*(work() for _ in range(k)))
            await ar.aclose()

        uvloop.run(run())

    one_thread()  # warm up the connection pool
    base = cpu_per_call(n, one_thread)
    rows = [
        ("one thread, sync (baseline)", base),
        (f"{k} threads, sync", cpu_per_call(n, many_threads)),
        (f"{k} asyncio tasks, one thread", cpu_per_call(n, tasks)),
    ]
    r.delete("maskprop:bench:k")
    for name, us in rows:
        print(f"{name:32} {us:7.1f} us of CPU a round trip  ({us / base:.2f}x the baseline)")


if __name__ == "__main__":
    main()
