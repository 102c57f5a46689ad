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

    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc

    tag = uuid.uuid4().hex[:8]
    extra = dict(kv.split("=", 1) for kv in args.env)
    campaigns = [f"load{i}-{tag}" for i in range(args.repeat)]
    print(f"extra env {extra or '-'}", flush=True)
    with bg.search_stack(
        "bench-search-load",
        campaigns,
        args.masks,
        args.classes,
        search_env=extra,
        db=args.db,
        keep=args.keep,
    ) as st:
        search, grpc_port, truth, work = st.search, st.grpc_port, st.truth, st.work
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = search_pb2_grpc.SearchServiceStub(channel)
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


def run_load(args: argparse.Namespace) -> None:
    truth = json.loads(Path(args.truth).read_text())
    result: dict[str, Any] = bg.load_direct(args, truth)
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    load = sub.add_parser("load", help="(internal) the load generator process")
    bg.common_args(ap, load, seconds=600.0)
    ap.add_argument("--db", type=int, default=0, help="this Redis db (empty); default: any")
    ap.add_argument("--repeat", type=int, default=3, help="campaigns loaded one after another")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for search")
    ap.add_argument("--profile", default="", help="py-spy (raw) the search process to here")
    args = ap.parse_args()
    if args.cmd == "load":
        run_load(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
