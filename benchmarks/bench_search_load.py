"""CPU an answer of the search service *process* under gRPC load (real Redis and broker).

The service as it runs in production (``python -m maskprop_search``: gRPC thread pool, Kafka
producer, label-relay thread, trees consumer) on a fresh Redis database and a topic namespace
of its own; a simulated pool goes in through the clusterer as in ``bench_gateway.py`` (whose
helpers this reuses).  Then a load generator in a separate process (``--workers`` threads,
each LeaseQuestions(``--batch``) + SubmitAnswers, answers from the pool's ground truth) runs
until the campaign is done.  Printed: the search process's CPU (user + system, from
/proc/<pid>/stat: other processes on the machine do not count) per applied answer, and its
idle CPU per second before the load.  Compare with ``bench_search_cpu.py`` (the core alone,
one thread).

    source .cache/dev-infra/env && .venv/bin/python benchmarks/bench_search_load.py
    ... --env MASKPROP_GRPC_WORKERS=4   # extra environment for the search process
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway as bg


def sys_seconds(pid: int) -> float:
    """System (kernel) CPU seconds of a process so far: syscalls, context switches."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def orchestrate(args: argparse.Namespace) -> None:
    import grpc
    import redis as redis_client

    from maskprop.simulate.generator import ade_like_pool
    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc

    kafka = os.environ.get("KAFKA_BOOTSTRAP") or os.environ.get("MASKPROP_IT_KAFKA")
    redis_base = os.environ.get("REDIS_URL") or os.environ.get("MASKPROP_IT_REDIS")
    if not (kafka and redis_base):
        raise SystemExit("error: run `bash scripts/dev-infra.sh up && source .cache/dev-infra/env`")
    tag = uuid.uuid4().hex[:8]
    redis_url = bg.empty_db(redis_base)
    if args.db:
        redis_url = redis_base.rsplit("/", 1)[0] + f"/{args.db}"
        if redis_client.Redis.from_url(redis_url).dbsize():
            raise SystemExit(f"error: redis db {args.db} is not empty")
    work = Path(tempfile.mkdtemp(prefix="bench-search-load-"))
    logs = work / "logs"
    logs.mkdir()
    grpc_port = bg.free_port()
    base = {
        **os.environ,
        "MASKPROP_ENV": "prod",
        "MASKPROP_KAFKA_BOOTSTRAP": kafka,
        "MASKPROP_REDIS_URL": redis_url,
        "MASKPROP_TOPIC_NAMESPACE": f"bsl{tag}",
        "MASKPROP_DATA_DIR": str(work / "data"),
        "MASKPROP_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "MASKPROP_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    extra = dict(kv.split("=", 1) for kv in args.env)
    campaigns = [f"load{i}-{tag}" for i in range(args.repeat)]
    pool = ade_like_pool(args.masks, args.classes, seed=11, dim=16)
    print(
        f"pool: {len(pool)} masks, {args.classes} classes; redis db "
        f"{redis_url.rsplit('/', 1)[1]}; extra env {extra or '-'}",
        flush=True,
    )
    procs: list[bg.Proc] = []
    r = redis_client.Redis.from_url(redis_url)
    try:
        procs.append(
            bg.Proc(
                "clusterer",
                [sys.executable, "-m", "maskprop_clusterer"],
                {**base, "MASKPROP_GRPC_PORT": str(bg.free_port())},
                logs,
            )
        )
        search = bg.Proc(
            "search",
            [sys.executable, "-m", "maskprop_search"],
            {**base, **extra, "MASKPROP_GRPC_PORT": str(grpc_port)},
            logs,
        )
        procs.append(search)
        truth = bg.feed(kafka, base["MASKPROP_TOPIC_NAMESPACE"], pool, campaigns)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = search_pb2_grpc.SearchServiceStub(channel)

        def opened() -> bool:
            try:
                return all(
                    len(stub.GetProgress(search_pb2.GetProgressRequest(campaign=c)).classes)
                    == args.classes
                    for c in campaigns
                )
            except grpc.RpcError:
                return False

        bg.wait_for(opened, 900, "every tree in the search service", procs)
        procs[0].stop()
        truth_file = work / "truth.json"
        truth_file.write_text(json.dumps(truth))
        pid = search.proc.pid
        time.sleep(1.0)
        c0 = bg.cpu_seconds(pid)
        time.sleep(args.idle)
        idle = (bg.cpu_seconds(pid) - c0) / args.idle
        spy = None
        if args.profile:  # every thread's busy samples (not only the GIL holder's)
            spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            argv = [
                spy_bin,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "100",
                *(["--gil"] if os.environ.get("XP_GIL") else []),
            ]
            argv += ["--output", args.profile, "--nonblocking", "--duration", "600"]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        print(f"search process idle: {1e3 * idle:.1f} ms CPU a second")
        runs = []
        for campaign in campaigns:
            c0, s0 = bg.cpu_seconds(pid), sys_seconds(pid)
            out = work / "load.json"
            argv = [sys.executable, __file__, "load", "--target", f"127.0.0.1:{grpc_port}"]
            argv += ["--campaign", campaign, "--truth", str(truth_file), "--out", str(out)]
            argv += ["--workers", str(args.workers), "--batch", str(args.batch)]
            argv += ["--seconds", str(args.seconds)]
            subprocess.run(argv, check=True, timeout=args.seconds + 300)
            cpu, kernel = bg.cpu_seconds(pid) - c0, sys_seconds(pid) - s0
            res = json.loads(out.read_text())
            req = search_pb2.GetProgressRequest(campaign=campaign)
            questions = stub.GetProgress(req, timeout=30).questions
            n = res["answers"]
            runs.append({**res, "search_cpu_s": cpu, "us_per_answer": 1e6 * cpu / max(n, 1)})
            print(
                f"load: {args.workers} workers x lease/answer {args.batch}; {n} answers "
                f"applied in {res['seconds']:.1f} s ({res['answers_per_s']:.0f}/s), done "
                f"{res['campaign_done']}, search questions {questions}; search process "
                f"{cpu:.2f} s CPU, {1e6 * cpu / max(n, 1):.0f} us an answer "
                f"({1e6 * kernel / max(n, 1):.0f} system)",
                flush=True,
            )
        if spy is not None:
            spy.send_signal(bg.signal.SIGINT)
            spy.wait(30)
        channel.close()
        per = sorted(r["us_per_answer"] for r in runs)
        print(f"search process under load: median {per[len(per) // 2]:.0f} us CPU an answer")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "idle": idle}))
    finally:
        for p in reversed(procs):
            p.stop()
        r.flushdb()
        if args.keep:
            print(f"logs kept in {logs}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_load(args: argparse.Namespace) -> None:
    truth = json.loads(Path(args.truth).read_text())
    result: dict[str, Any] = bg.load_direct(args, truth)
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    load = sub.add_parser("load", help="(internal) the load generator process")
    load.add_argument("--target", required=True)
    load.add_argument("--campaign", required=True)
    load.add_argument("--truth", required=True)
    load.add_argument("--out", required=True)
    for p in (ap, load):
        p.add_argument("--workers", type=int, default=32)
        p.add_argument("--batch", type=int, default=100)
        p.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--masks", type=int, default=60_000)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--db", type=int, default=0, help="this Redis db (empty); default: any")
    ap.add_argument("--repeat", type=int, default=3, help="campaigns loaded one after another")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for search")
    ap.add_argument("--profile", default="", help="py-spy (raw) the search process to here")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the services' logs")
    args = ap.parse_args()
    if args.cmd == "load":
        run_load(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
