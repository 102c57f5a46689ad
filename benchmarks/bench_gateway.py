"""Sustained answers/s through the verify gateway into search, on the real Redis and broker.

Processes (all on loopback; needs `scripts/dev-infra.sh up`):

1. clusterer + search (``python -m maskprop_clusterer`` / ``maskprop_search``) on a fresh
   Redis database and a topic namespace of their own; a simulated pool (two identical
   campaigns) goes in through ``KafkaBus``; the clusterer stops once every tree is built.
2. the gateway (``python -m maskprop_gateway``: uvicorn, one process) on the same Redis
   database, talking gRPC to search; vendor and gold questions are created through the Python
   API before it starts; rate limits out of the way.
3. a load generator (this file, ``load``): many simulated workers (asyncio tasks on uvloop,
   one keep-alive connection each) each leasing 100 questions and answering them
   (``elapsed_ms`` 1500: realistic, no real sleep), until the campaign is done or the time
   runs out.  Qualification and hidden gold are
   answered right, real questions from the pool's ground truth.

The named baseline, **search gRPC SubmitAnswers directly**, runs first in the same invocation:
the same workers, the same batch size, the other campaign, LeaseQuestions + SubmitAnswers
straight to the search service.  Printed: answers/s (overall and sustained: the middle 80 % of
the answers), p50/p99 latency of the answer requests and per answer, and the gateway's
overhead ratio.

Issue #15's run: ``--big-class 1000000 --seconds 120`` adds one class of 1M masks (class 0,
``ade_like_class``) to a long tail of ``--masks`` over the other classes (``ade_class_sizes``);
"window /s" is the mean over the whole ``--seconds`` window (a crowd that ran dry counts zero
for the rest of it).  ``--search-replicas 2`` starts a second search process
(``MASKPROP_REPLICA_ID`` search-0/search-1: the live replicas split the classes by rendezvous
hashing) and a second gateway pointing at it, since a gateway takes one
``MASKPROP_SEARCH_TARGET``; worker i of the load generator uses gateway (baseline: replica)
i mod 2, so a worker's leases and answers always meet the same replica, as a client pinned to
one gateway pod would.

Closed or open loop.  By default each worker sends its next request as soon as the last one
returned (closed loop): the most the services can take, but at that load every request queues
behind the other workers' (Little's law: 32 workers at ~130 requests/s wait ~250 ms a request
in all), so its latencies measure the queue, not the service.  ``--rate R`` is an open loop:
worker i leases at fixed slots, one every ``workers * batch / R`` seconds, and answers half a
period later, whatever the server's pace (a crowd does not wait for it); the latencies are then
those of a crowd offering R answers/s, and a server that cannot keep up shows as leases sent
late (their lag), short or empty leases and a window mean below R.

``--relay-nice N`` publishes the labels through a relay process of its own (search's
``MASKPROP_LABEL_RELAY=process``, ``python -m maskprop_search.relay``, as deploy/k8s runs it)
at nice level N, instead of a thread inside search: on a shared machine a large class's bursts
of labels then wait while the crowd's calls are served.  ``--gateway-background process``
(the default, as deploy/k8s runs it) runs each gateway's settler and forwarder in a child
process (``MASKPROP_BACKGROUND``) at nice level ``--background-nice`` (10, as deployed); its
CPU is printed as ``gateway-bg``.

    source .cache/dev-infra/env && .venv/bin/python benchmarks/bench_gateway.py   # 150k masks
    ... --profile 20   # also py-spy the gateway for 20 s under load (py-spy on PATH)
    ... --big-class 1000000 --seconds 120 --search-replicas 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskprop_runtime.bus import KafkaBus
from maskprop_runtime.server import free_port

ROOT = Path(__file__).resolve().parents[1]
PEPPER = "bench-pepper-0123456789"
#: An open-loop lease sent this long after its slot is late (the server fell behind).
LATE_S = 0.01
VENDOR = "bench"


# ---------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


#: Seconds of each bucket of ``tail_series`` (answer-request p99 over time).
TAIL_BUCKET_S = 10


def summarize(done: list[tuple[float, int, float]], started: float, ended: float) -> dict[str, Any]:
    """``done``: (finished at, answers in the request, latency s) of every answer request."""
    done = sorted(done)
    total = sum(n for _, n, _ in done)
    out: dict[str, Any] = {
        "answers": total,
        "requests": len(done),
        "seconds": ended - started,
        "answers_per_s": total / max(ended - started, 1e-9),
    }
    # Sustained: between the 10 % and 90 % marks of the answers, past the ramp-up (an open
    # tree frontier is narrow at first) and the tail (the last clusters wait on few answers).
    marks, seen = {}, 0
    for t, n, _ in done:
        seen += n
        for q in (0.1, 0.9):
            if q not in marks and seen >= q * total:
                marks[q] = (t, seen)
    if len(marks) == 2 and marks[0.9][0] > marks[0.1][0]:
        (t0, n0), (t1, n1) = marks[0.1], marks[0.9]
        out["sustained_answers_per_s"] = (n1 - n0) / (t1 - t0)
    # Answers a half-second from the start: where the ramp-up, the steady state and the tail
    # of the campaign are.
    series: dict[int, int] = {}
    for t, n, _ in done:
        series[int((t - started) * 2)] = series.get(int((t - started) * 2), 0) + n
    out["series"] = [series.get(i, 0) for i in range(max(series, default=-1) + 1)]
    lat = [dt for _, _, dt in done]
    per = [dt / n for _, n, dt in done if n]
    out["p50_ms"], out["p99_ms"] = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
    out["per_answer_p50_ms"] = percentile(per, 50) * 1e3
    out["per_answer_p99_ms"] = percentile(per, 99) * 1e3
    # Where the tail is: p99 and the requests over 50 ms of each 10 s (start-up transients,
    # periodic jobs such as the gateway's 30 s repair sweep, a large class's label bursts).
    buckets: dict[int, list[float]] = {}
    for t, _, dt in done:
        buckets.setdefault(int((t - started) / TAIL_BUCKET_S), []).append(dt)
    out["tail_series"] = [
        (percentile(b, 99) * 1e3, sum(dt > 0.05 for dt in b), len(b))
        for b in (buckets.get(i, []) for i in range(max(buckets, default=-1) + 1))
    ]
    return out


# ---------------------------------------------------------------------------- load generator
class _Http:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the load generator shares the
    two cores with the services, so it stays lean (httpx cost ~4x the CPU of urllib3 a
    request, and 32 urllib3 threads contended for the GIL)."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port = host, port
        self.head = f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        self.reader: Any = None
        self.writer: Any = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import asyncio

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode() if body is not None else b""
        extra = f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}{extra}\r\n".encode() + data)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        raw = await self.reader.readexactly(length) if length else b""
        return status, (json.loads(raw) if raw else None)


def load_gateway(args: argparse.Namespace, truth: dict[str, bool]) -> dict[str, Any]:
    import asyncio

    # One gateway a search replica: worker i talks to gateway i mod n (its leases and answers
    # all go through the same gateway, so to the same replica).
    addresses = [
        (t.split("//", 1)[1].split(":")[0], int(t.rsplit(":", 1)[1]))
        for t in args.target.split(",")
    ]
    deadline = time.monotonic() + args.seconds
    done: list[tuple[float, int, float]] = []
    leases: list[float] = []
    sizes: list[int] = []  # questions per lease
    empty_at: list[float] = []  # when leases came back empty (s from the start)
    errors: dict[str, int] = {}
    # Several campaigns (``--campaign a,b,...``): worker i starts on campaign i mod K and moves
    # to the next unfinished one when its own is done, so the crowd stays busy while any is.
    campaigns = args.campaign.split(",")
    done_at: dict[str, float] = {}  # campaign -> when it was found done (s from the start)
    last_check: dict[str, float] = {}
    state = {"finished": False}
    # Open loop (``--rate R``): worker i leases at its own slots, one every ``period`` (the
    # workers together offer R answers/s), and answers half a period after its slot, however
    # long the requests take (a crowd's pace does not wait for the server); a worker behind
    # its schedule goes at once, and how late it went is kept (``lag``).  Closed loop (no
    # rate): every worker sends its next request as soon as the last one returns.  A lease
    # sent more than LATE_S after its slot counts as late.
    period = args.workers * args.batch / args.rate if args.rate else 0.0
    lags: list[float] = []

    def error(what: str) -> None:
        errors[what] = errors.get(what, 0) + 1

    async def campaign_done(http: _Http, campaign: str) -> bool:
        # One worker at a time asks, at most once a second a campaign: 32 workers polling
        # /v1/progress (every class of the campaign, in search) at the end would load the
        # services.
        if campaign in done_at:
            return True
        if time.monotonic() - last_check.get(campaign, 0.0) < 1.0:
            return False
        last_check[campaign] = time.monotonic()
        status, out = await http.request("GET", f"/v1/progress?campaign={campaign}")
        if status == 200 and bool(out["done"]):
            done_at[campaign] = time.monotonic() - started
            state["finished"] = len(done_at) == len(campaigns)
            return True
        return False

    async def worker(i: int) -> None:
        wid = f"w{i:04d}"
        http = _Http(*addresses[i % len(addresses)], args.key)
        mine = i % len(campaigns)
        slot = started + period * i / args.workers
        while not state["finished"] and time.monotonic() < deadline:
            while campaigns[mine] in done_at:
                mine = (mine + 1) % len(campaigns)
            campaign = campaigns[mine]
            if period:
                if slot >= deadline:
                    break
                now = time.monotonic()
                if slot > now:
                    await asyncio.sleep(slot - now)
                elif now - slot > LATE_S:
                    lags.append(now - slot)
                slot += period
            t0 = time.perf_counter()
            status, lease = await http.request(
                "POST",
                "/v1/leases",
                {"worker_id": wid, "campaign": campaign, "max_questions": args.batch},
            )
            dt_lease = time.perf_counter() - t0
            if status != 201:
                error(f"lease {status}" + (f" {lease.get('detail', '')}"[:120] if lease else ""))
                if status == 403:
                    return  # suspended or failed qualification: this worker is out
                await asyncio.sleep(0.2)
                continue
            leases.append(dt_lease)
            sizes.append(len(lease["questions"]))
            if not lease["questions"]:
                empty_at.append(time.monotonic() - started)
                if not await campaign_done(http, campaign) and not period:
                    await asyncio.sleep(0.2)
                continue
            answers = [
                {
                    "question_id": q["question_id"],
                    "answer": truth.get(q["mask"]["counts"], True),
                    "elapsed_ms": 1500,
                }
                for q in lease["questions"]
            ]
            if period:  # the worker looks at the questions until half a period past its slot
                think = slot - period / 2 - time.monotonic()
                if think > 0:
                    await asyncio.sleep(think)
            t0 = time.perf_counter()
            status, out = await http.request(
                "POST",
                "/v1/answers",
                {"lease_id": lease["lease_id"], "worker_id": wid, "answers": answers},
            )
            dt = time.perf_counter() - t0
            if status == 200:
                done.append((time.monotonic(), int(out["accepted"]), dt))
            else:
                error(f"answers {status}")
        if http.writer is not None:
            http.writer.close()

    async def crowd() -> None:
        await asyncio.gather(*(worker(i) for i in range(args.workers)))

    started = time.monotonic()
    import uvloop  # the gateway's event loop too

    uvloop.run(crowd())
    out = summarize(done, started, time.monotonic())
    out.update(
        campaign_done=state["finished"],
        campaigns_done=done_at,
        campaigns=len(campaigns),
        lease_p50_ms=percentile(leases, 50) * 1e3,
        lease_p99_ms=percentile(leases, 99) * 1e3,
        lease_sizes=sizes,
        rate=args.rate,
        late_leases=len(lags),
        lag_p99_ms=percentile(lags, 99) * 1e3 if lags else 0.0,
        empty_series=[sum(int(t * 2) == i for t in empty_at) for i in range(len(out["series"]))],
        errors=errors,
    )
    return out


def load_direct(args: argparse.Namespace, truth: dict[str, bool]) -> dict[str, Any]:
    import grpc

    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc

    # One channel a search replica: worker i calls replica i mod n.
    channels = [grpc.insecure_channel(t) for t in args.target.split(",")]
    stubs = [search_pb2_grpc.SearchServiceStub(c) for c in channels]
    deadline = time.monotonic() + args.seconds
    finished = threading.Event()
    lock = threading.Lock()
    done: list[tuple[float, int, float]] = []
    leases: list[float] = []
    sizes: list[int] = []

    def worker(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while not finished.is_set() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            resp = stub.LeaseQuestions(
                search_pb2.LeaseQuestionsRequest(
                    campaign=args.campaign, max_questions=args.batch, lease_owner=f"w{i}"
                ),
                timeout=120,
            )
            with lock:
                leases.append(time.perf_counter() - t0)
                sizes.append(len(resp.questions))
            if resp.campaign_done:
                finished.set()
                return
            if not resp.questions:
                time.sleep(0.2)
                continue
            items = [
                search_pb2.AnswerItem(
                    question_id=q.question_id, is_correct=truth.get(q.rle.counts.decode(), True)
                )
                for q in resp.questions
            ]
            t0 = time.perf_counter()
            out = stub.SubmitAnswers(search_pb2.SubmitAnswersRequest(answers=items), timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                done.append((time.monotonic(), int(out.applied), dt))

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for channel in channels:
        channel.close()
    out = summarize(done, started, time.monotonic())
    out.update(
        campaign_done=finished.is_set(),
        lease_p50_ms=percentile(leases, 50) * 1e3,
        lease_p99_ms=percentile(leases, 99) * 1e3,
        lease_sizes=sizes,
        errors={},
    )
    return out


def run_load(args: argparse.Namespace) -> None:
    truth = json.loads(Path(args.truth).read_text())
    t0 = time.process_time()
    result = (load_gateway if args.mode == "gateway" else load_direct)(args, truth)
    result["loadgen_cpu_s"] = time.process_time() - t0
    # The mean over the whole window asked for: a crowd that ran dry (campaign done) before
    # the window ended counts zero answers for the rest of it.
    result["window_s"] = args.seconds
    result["window_answers_per_s"] = result["answers"] / max(result["seconds"], args.seconds)
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- orchestration
class Proc:
    """One service process with its log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(argv, env=env, stdout=f, stderr=f, cwd=ROOT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, n: int = 20) -> str:
        lines = self.log.read_text(errors="replace").splitlines()[-n:]
        return f"--- {self.name}\n" + "\n".join(lines)


def empty_db(base_url: str) -> str:
    """A Redis database (15 down to 1) that holds nothing: no colleague's or test's state."""
    import redis

    for db in range(15, 0, -1):
        url = base_url.rsplit("/", 1)[0] + f"/{db}"
        if redis.Redis.from_url(url).dbsize() == 0:
            return url
    raise SystemExit("error: no empty Redis database (1-15) to run in")


def feed(
    bootstrap: str,
    namespace: str,
    pool: Any,
    campaigns: list[str],
    tail: Any = None,
    tail_campaigns: list[str] | None = None,
) -> dict[str, bool]:
    """Send the pool once per campaign (and ``tail`` once per ``tail_campaigns``); returns RLE
    counts -> correct (IoU >= 0.75)."""
    from maskprop_detector.simulated import pool_events

    from maskprop.simulate.scenes import pool_index
    from maskprop_runtime import topics

    producer = KafkaBus(bootstrap, namespace=namespace).producer()
    truth: dict[str, bool] = {}
    fed = [(pool, c) for c in campaigns] + [(tail, c) for c in tail_campaigns or []]
    seen: set[int] = set()
    for p, campaign in fed:
        first, _ = id(p) not in seen, seen.add(id(p))
        for key, ev in pool_events(p, campaign, batch_size=500):
            if first and ev.HasField("masks"):
                for m in ev.masks.masks:
                    truth[m.rle.counts.decode()] = bool(p.ious[pool_index(m.mask_id)] >= 0.75)
            producer.send(topics.MASKS, key, ev.SerializeToString())
    producer.close()
    return truth


def wait_for(cond: Any, timeout: float, what: str, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tails = "\n".join(p.tail() for p in procs)
            raise SystemExit(f"error: timed out waiting for {what}\n{tails}")
        time.sleep(0.5)


def run_loadgen(
    mode: str, target: str, campaign: str, key: str, truth: Path, args: argparse.Namespace
) -> dict[str, Any]:
    out = truth.parent / f"{mode}.json"
    argv = [sys.executable, __file__, "load", "--mode", mode, "--target", target]
    argv += ["--campaign", campaign, "--key", key, "--truth", str(truth), "--out", str(out)]
    argv += ["--workers", str(args.workers), "--batch", str(args.batch)]
    argv += ["--seconds", str(args.seconds), "--rate", str(args.rate)]
    subprocess.run(argv, check=True, cwd=ROOT, timeout=args.seconds + 300)
    return dict(json.loads(out.read_text()))


def profile(
    pid: int, seconds: int, out: Path, after: float = 0.0
) -> subprocess.Popen[bytes] | None:
    """py-spy ``pid`` for ``seconds``, starting ``after`` seconds from now (a shell sleeps
    first, so the start-up of a run can be left out of its profile)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("py-spy not on PATH: no profile", file=sys.stderr)
        return None
    argv = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--format", "raw"]
    argv += ["--output", str(out), "--rate", "200", "--nonblocking", "--gil"]
    if after > 0:
        argv = ["sh", "-c", f'sleep {after:.3f} && exec "$0" "$@"', *argv]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def drain_wait(r: Any, limit_s: float) -> float:
    """Seconds until every label outbox in ``r`` is empty (the relay sent them), polled every
    0.5 s for at most ``limit_s``."""
    from maskprop_search.store import LabelOutboxes

    outboxes, t0 = LabelOutboxes(r), time.monotonic()
    while outboxes.pending() and time.monotonic() - t0 < limit_s:
        time.sleep(0.5)
    return time.monotonic() - t0


def cpu_seconds(pid: int, system: bool = False) -> float:
    """User + system CPU seconds a process (and its reaped children) used so far; with
    ``system`` only the kernel's part (syscalls, context switches)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    # after the ")": state is field 3; utime, stime, cutime, cstime are fields 14-17
    picked = (fields[12], fields[14]) if system else fields[11:15]
    return sum(int(x) for x in picked) / ticks


def child_pid(pid: int) -> int | None:
    """The gateway ``pid``'s background process (a multiprocessing spawn child, not its
    resource tracker), or None (Linux)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            return int(child)
    return None


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:``port`` (the broker), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


class CpuMeter:
    """CPU seconds each named process spends between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.t0: dict[str, float] = {}

    def start(self) -> None:
        self.t0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.s0 = {k: cpu_seconds(p, system=True) for k, p in self.pids.items()}
        self.w0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        self.system = {k: cpu_seconds(p, True) - self.s0[k] for k, p in self.pids.items()}
        self.wall = time.monotonic() - self.w0
        return {k: cpu_seconds(p) - self.t0[k] for k, p in self.pids.items()}

    def idle(self, seconds: float) -> dict[str, float]:
        """CPU seconds a second each process uses with no load (pollers, heartbeats): a
        fixed cost that a longer run spreads over more answers."""
        self.start()
        time.sleep(seconds)
        return {k: v / seconds for k, v in self.stop().items()}


def redis_commands(r: Any) -> dict[str, tuple[int, int]]:
    """Redis calls and CPU microseconds per command since the last CONFIG RESETSTAT (commands
    inside Lua scripts counted by name, the script calls as evalsha)."""
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


def search_calls(ports: int | list[int]) -> dict[str, int]:
    """gRPC calls the search service served so far, by method (its Prometheus endpoint; with
    several ports, summed over those replicas)."""
    import urllib.request

    out: dict[str, int] = {}
    for port in [ports] if isinstance(ports, int) else ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for line in text.decode().splitlines():
            if line.startswith("maskprop_rpc_seconds_count{"):
                method = line.split('method="', 1)[1].split('"', 1)[0]
                out[method] = out.get(method, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def hotspots(path: Path, package: str, top: int = 12) -> str:
    """Share of busy samples per innermost frame of ``package`` (file:line): where the time
    under our code goes, library calls below it included."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not n.isdigit() or any(w in frames[-1] for w in ("select (", "wait (", "sleep (")):
            continue  # idle threads
        total += int(n)
        ours = [f for f in frames if package in f or "maskprop/" in f]
        where = ours[-1] if ours else "(outside the service's code)"
        counts[where] = counts.get(where, 0) + int(n)
    rows = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"  {100 * n / max(total, 1):5.1f}%  {where}" for where, n in rows)


def bench_pool(
    masks: int, classes: int, big: int = 0, *, seed: int = 11, dim: int = 16, tail: bool = False
) -> Any:
    """The simulated pool: ``ade_like_pool(masks, classes)`` (Zipf sizes, at most 30k masks a
    class); with ``big``, class 0 is one ADE-like class of ``big`` masks and the other
    ``classes - 1`` classes share ``masks`` with ADE20K's long-tailed class sizes
    (``ade_class_sizes``), so the pool holds ``big + masks`` masks.  ``tail`` (with ``big``):
    the same pool without class 0 (the long tail alone, classes 1..classes-1)."""
    import numpy as np

    from maskprop.simulate.generator import ade_class_sizes, ade_like_class, ade_like_pool
    from maskprop.simulate.pool import MaskPool

    if not big:
        return ade_like_pool(masks, classes, seed=seed, dim=dim)
    sizes = [big, *(int(n) for n in ade_class_sizes(masks, classes - 1))]
    ids = list(range(classes))
    if tail:
        sizes, ids = sizes[1:], ids[1:]
    parts = [ade_like_class(c, n, seed, dim)[:3] for c, n in zip(ids, sizes, strict=True)]
    return MaskPool(
        features=np.concatenate([p[0] for p in parts]),
        scores=np.concatenate([p[1] for p in parts]),
        ious=np.concatenate([p[2] for p in parts]),
        class_ids=np.repeat(np.array(ids, dtype=np.int32), sizes),
        class_names=tuple(f"class_{k:03d}" for k in range(classes)),
    )


@dataclass
class Stack:
    """Clusterer (stopped once the trees are in) and search processes on an empty Redis
    database and a topic namespace of their own, with a simulated pool fed per campaign."""

    kafka: str
    r: Any  # redis client on the stack's database
    work: Path
    logs: Path
    base: dict[str, str]  # environment of the services
    procs: list[Proc]
    search: Proc
    grpc_port: int
    metrics_port: int  # search's Prometheus endpoint
    truth: dict[str, bool]  # RLE counts -> correct
    # every search replica (the first is ``search``) with its gRPC and metrics ports
    searches: list[Proc]
    grpc_ports: list[int]
    metrics_ports: list[int]
    relay: Proc | None = None  # the label relay process (``relay_nice``)


@contextmanager
def search_stack(
    prefix: str,
    campaigns: list[str],
    masks: int,
    classes: int,
    *,
    search_env: dict[str, str] | None = None,
    db: int = 0,
    keep: bool = False,
    big: int = 0,
    replicas: int = 1,
    tail_campaigns: list[str] | None = None,
    relay_nice: int | None = None,
) -> Iterator[Stack]:
    """Start the stack, wait until search has every tree, yield it; stop it and empty its
    Redis database afterwards (``db``: that database, which must be empty; else the first
    empty one of 15..1).  ``big``: see :func:`bench_pool`.  ``replicas``: search processes
    (``MASKPROP_REPLICA_ID`` search-0, search-1, ...); the others start once the first has
    every tree (sessions live in Redis, the class files in the shared data directory) and
    the live replicas split the classes between them (rendezvous hashing).
    ``tail_campaigns``: more campaigns fed with the long tail alone (``bench_pool(...,
    tail=True)``: the pool without its big class), each clustered like the others.
    ``relay_nice``: search's labels go out through a relay process of their own
    (``MASKPROP_LABEL_RELAY=process``, ``python -m maskprop_search.relay``) run at this nice
    level; None: the relay thread inside each search replica."""
    import grpc
    import redis as redis_client

    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc

    kafka = os.environ.get("KAFKA_BOOTSTRAP") or os.environ.get("MASKPROP_IT_KAFKA")
    redis_base = os.environ.get("REDIS_URL") or os.environ.get("MASKPROP_IT_REDIS")
    if not (kafka and redis_base):
        raise SystemExit("error: run `bash scripts/dev-infra.sh up && source .cache/dev-infra/env`")
    if db:
        redis_url = redis_base.rsplit("/", 1)[0] + f"/{db}"
        if redis_client.Redis.from_url(redis_url).dbsize():
            raise SystemExit(f"error: redis db {db} is not empty")
    else:
        redis_url = empty_db(redis_base)
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    logs = work / "logs"
    logs.mkdir()
    grpc_port, metrics_port = free_port(), free_port()
    base = {
        **os.environ,
        "MASKPROP_ENV": "prod",
        "MASKPROP_SINK_ADMIN_TOKEN": uuid.uuid4().hex,
        "MASKPROP_KAFKA_BOOTSTRAP": kafka,
        "MASKPROP_REDIS_URL": redis_url,
        "MASKPROP_TOPIC_NAMESPACE": f"{prefix.replace('-', '')}{uuid.uuid4().hex[:8]}",
        "MASKPROP_DATA_DIR": str(work / "data"),
        "MASKPROP_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "MASKPROP_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    pool = bench_pool(masks, classes, big)
    tails = tail_campaigns or []
    tail = (bench_pool(masks, classes, big, tail=True) if big else pool) if tails else None
    expected = {c: classes for c in campaigns}
    expected.update({c: classes - 1 if big else classes for c in tails})
    print(
        f"pool: {len(pool)} masks (largest class {int((pool.class_ids == 0).sum())}), "
        f"{classes} classes x {len(campaigns)} campaigns"
        + (f", + the long tail ({len(tail)} masks) x {len(tails)} campaigns" if tail else "")
        + f"; redis db {redis_url.rsplit('/', 1)[1]}; logs {logs}",
        flush=True,
    )
    if relay_nice is not None:
        search_env = {**(search_env or {}), "MASKPROP_LABEL_RELAY": "process"}
    procs: list[Proc] = []
    relay: Proc | None = None
    r = redis_client.Redis.from_url(redis_url)
    try:
        procs.append(
            Proc(
                "clusterer",
                [sys.executable, "-m", "maskprop_clusterer"],
                {**base, "MASKPROP_GRPC_PORT": str(free_port())},
                logs,
            )
        )
        search = Proc(
            "search",
            [sys.executable, "-m", "maskprop_search"],
            {
                **base,
                **(search_env or {}),
                "MASKPROP_GRPC_PORT": str(grpc_port),
                "MASKPROP_METRICS_PORT": str(metrics_port),
                "MASKPROP_REPLICA_ID": "search-0",
            },
            logs,
        )
        procs.append(search)
        if relay_nice is not None:
            relay = Proc(
                "relay",
                ["nice", "-n", str(relay_nice), sys.executable, "-m", "maskprop_search.relay"],
                {**base, **search_env, "MASKPROP_GRPC_PORT": str(free_port())},
                logs,
            )
            procs.append(relay)
        t0 = time.monotonic()
        truth = feed(kafka, base["MASKPROP_TOPIC_NAMESPACE"], pool, campaigns, tail, tails)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = search_pb2_grpc.SearchServiceStub(channel)

        def opened() -> bool:
            try:
                return all(
                    len(
                        stub.GetProgress(
                            search_pb2.GetProgressRequest(campaign=c), timeout=10
                        ).classes
                    )
                    == n
                    for c, n in expected.items()
                )
            except grpc.RpcError:
                return False

        wait_for(opened, 900, "every tree in the search service", procs)
        channel.close()
        procs[0].stop()  # the clusterer's work is done: give its core to the run
        print(f"trees built and loaded in {time.monotonic() - t0:.0f} s", flush=True)
        # Search decides each class's opening sweep as its tree arrives (the 1M-mask class:
        # ~470k leaves); the window starts once their labels are published, as they would
        # be long before a crowd arrives at a class.
        waited = drain_wait(r, 600)
        print(f"opening sweeps' labels published {waited:.0f} s later", flush=True)
        searches, grpc_ports, metrics_ports = [search], [grpc_port], [metrics_port]
        for i in range(1, replicas):
            grpc_ports.append(free_port())
            metrics_ports.append(free_port())
            searches.append(
                Proc(
                    f"search{i}",
                    [sys.executable, "-m", "maskprop_search"],
                    {
                        **base,
                        **(search_env or {}),
                        "MASKPROP_GRPC_PORT": str(grpc_ports[-1]),
                        "MASKPROP_METRICS_PORT": str(metrics_ports[-1]),
                        "MASKPROP_REPLICA_ID": f"search-{i}",
                    },
                    logs,
                )
            )
            procs.append(searches[-1])
        for port in grpc_ports[1:]:
            wait_for(lambda p=port: _serving(p, campaigns[0]), 120, "a search replica", procs)
        yield Stack(
            kafka,
            r,
            work,
            logs,
            base,
            procs,
            search,
            grpc_port,
            metrics_port,
            truth,
            searches,
            grpc_ports,
            metrics_ports,
            relay,
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
        r.flushdb()
        with contextlib.suppress(ConnectionError):  # its topics hold GBs a run
            KafkaBus(
                kafka, namespace=base["MASKPROP_TOPIC_NAMESPACE"], connect_timeout_s=10
            ).drop_namespace()
        (work / "truth.json").unlink(missing_ok=True)
        if keep:
            print(f"logs kept in {logs}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _serving(port: int, campaign: str) -> bool:
    """Whether the search process on ``port`` answers GetProgress for ``campaign``."""
    import grpc

    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            stub.GetProgress(search_pb2.GetProgressRequest(campaign=campaign), timeout=10)
            return True
        except grpc.RpcError:
            return False


def orchestrate(args: argparse.Namespace) -> None:
    import grpc
    import httpx
    from maskprop_gateway.auth import KeyStore
    from maskprop_gateway.qc_rules import QualityPolicy
    from maskprop_gateway.quality import QualityControl
    from maskprop_gateway.simcrowd import simulated_gold

    from maskprop.simulate.generator import ade_like_pool
    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc

    tag = uuid.uuid4().hex[:8]
    direct, via_gw = f"direct-{tag}", f"gw-{tag}"
    # --campaigns K: the gateway's crowd works on gw-<tag> (the whole pool) and K - 1 more
    # campaigns of the long tail alone, every class through the real clusterer.
    tails = [f"gw{j}-{tag}" for j in range(1, args.campaigns)]
    with search_stack(
        "bench-gateway",
        [via_gw] if args.no_baseline else [direct, via_gw],
        args.masks,
        args.classes,
        keep=bool(args.profile or args.keep),
        big=args.big_class,
        replicas=args.search_replicas,
        tail_campaigns=tails,
        search_env={"MASKPROP_CACHE_MASKS": str(args.cache_masks)} if args.cache_masks else None,
        relay_nice=args.relay_nice,
    ) as st:
        r, work, logs, base, procs = st.r, st.work, st.logs, st.base, st.procs
        search, grpc_port, truth, kafka = st.search, st.grpc_port, st.truth, st.kafka
        # Vendor and gold questions through the Python API, before the gateway starts.
        key = KeyStore(r, PEPPER).create(VENDOR, "Bench Crowd")
        # gold comes from a labelled pool of its own, about half of it wrong masks
        held = ade_like_pool(max(2000, 4 * args.gold), 4, seed=99, dim=8)
        for j, campaign in enumerate([via_gw, *tails]):
            # gold ids are g<seed>-<n>: a seed a campaign, or a worker qualified on one
            # campaign has "seen" the other's gold
            gold = simulated_gold(held, campaign, args.gold, seed=j)
            QualityControl(r, QualityPolicy()).import_gold(gold)
            truth.update({g.rle_counts.decode(): g.answer for g in gold})
        truth_file = work / "truth.json"
        truth_file.write_text(json.dumps(truth))

        # One gateway a search replica (the gateway takes one MASKPROP_SEARCH_TARGET); the
        # load generator's worker i uses gateway i mod n.
        gateways, targets = [], []
        for i, port in enumerate(st.grpc_ports):
            http_port = free_port()
            gateways.append(
                Proc(
                    f"gateway{i or ''}",
                    [sys.executable, "-m", "maskprop_gateway"],
                    {
                        **base,
                        "MASKPROP_HTTP_PORT": str(http_port),
                        "MASKPROP_SEARCH_TARGET": f"127.0.0.1:{port}",
                        "MASKPROP_KEY_PEPPER": PEPPER,
                        "MASKPROP_RATE_PER_S": "1000000",
                        "MASKPROP_RATE_BURST": "1000000",
                        "MASKPROP_REDUNDANCY": str(args.redundancy),
                        "MASKPROP_BACKGROUND": args.gateway_background,
                        "MASKPROP_BACKGROUND_NICE": str(args.background_nice),
                        **(
                            {"MASKPROP_SWITCH_INTERVAL_S": str(args.gateway_switch_interval)}
                            if args.gateway_switch_interval
                            else {}
                        ),
                    },
                    logs,
                )
            )
            procs.append(gateways[-1])
            targets.append(f"http://127.0.0.1:{http_port}")
        gateway, target = gateways[0], ",".join(targets)

        def healthy() -> bool:
            try:
                return all(httpx.get(f"{t}/healthz", timeout=2).status_code == 200 for t in targets)
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the gateway", procs)

        pids = {
            **{p.name: p.proc.pid for p in st.searches},
            **{p.name: p.proc.pid for p in gateways},
            # MASKPROP_BACKGROUND=process: each gateway's settler and forwarder
            **{f"{p.name}-bg": child_pid(p.proc.pid) for p in gateways},
            **({"relay": st.relay.proc.pid} if st.relay else {}),
            "redis": int(r.info("server")["process_id"]),
            "broker": listener_pid(int(kafka.rsplit(":", 1)[1])),
        }
        grpc_targets = ",".join(f"127.0.0.1:{p}" for p in st.grpc_ports)
        meter = CpuMeter(pids)
        idle = meter.idle(3.0)
        base_res: dict[str, Any] | None = None
        if not args.no_baseline:
            print(
                f"baseline: {args.workers} workers x {args.batch} answers, gRPC, "
                f"{len(st.grpc_ports)} search replica(s)",
                flush=True,
            )
            meter.start()
            r.config_resetstat()
            calls0 = search_calls(st.metrics_ports)
            spy = (
                profile(search.proc.pid, args.profile, work / "search.pyspy")
                if args.profile
                else None
            )
            base_res = run_loadgen("direct", grpc_targets, direct, "", truth_file, args)
            base_res["cpu_s"] = meter.stop()
            base_res.update(sys_s=meter.system, wall_s=meter.wall, idle_cpu_per_s=idle)
            base_res["redis_commands"] = redis_commands(r)
            base_res["redis_in_bytes"] = int(r.info("stats")["total_net_input_bytes"])
            calls1 = search_calls(st.metrics_ports)
            base_res["search_calls"] = {k: v - calls0.get(k, 0) for k, v in calls1.items()}
            if spy is not None:
                spy.wait(args.profile + 30)
        r.config_resetstat()
        calls1 = search_calls(st.metrics_ports)
        redis_in0 = int(r.info("stats")["total_net_input_bytes"])
        # AOF rewrites fork Redis and copy what the run writes: each one slowed commands by
        # 10-70 ms here while the child ran (issue #15's tail), so a run counts them.
        aof0 = int(r.info("persistence").get("aof_rewrites", 0))
        print(
            f"gateway : {args.workers} workers x {args.batch} answers, HTTP, "
            f"{len(gateways)} gateway(s), {1 + len(tails)} campaign(s), "
            f"redundancy {args.redundancy}",
            flush=True,
        )
        spies = (
            [
                profile(gateway.proc.pid, args.profile, work / "gateway.pyspy", args.profile_after),
                profile(
                    search.proc.pid, args.profile, work / "search-gw.pyspy", args.profile_after
                ),
                *(
                    [
                        profile(
                            st.relay.proc.pid,
                            args.profile,
                            work / "relay.pyspy",
                            args.profile_after,
                        )
                    ]
                    if st.relay
                    else []
                ),
            ]
            if args.profile
            else []
        )
        meter.start()
        gw_res = run_loadgen("gateway", target, ",".join([via_gw, *tails]), key, truth_file, args)
        gw_res["cpu_s"] = meter.stop()
        gw_res.update(sys_s=meter.system, wall_s=meter.wall, idle_cpu_per_s=idle)
        gw_res["redis_commands"] = redis_commands(r)
        gw_res["redis_in_bytes"] = int(r.info("stats")["total_net_input_bytes"]) - redis_in0
        gw_res["aof_rewrites"] = int(r.info("persistence").get("aof_rewrites", 0)) - aof0
        gw_res["search_calls"] = {
            k: v - calls1.get(k, 0) for k, v in search_calls(st.metrics_ports).items()
        }
        # Label work the window's CPU figures do not hold yet: decisions records still waiting
        # in the outboxes, and how long the relay takes to send them.
        from maskprop_search.store import LabelOutboxes

        gw_res["outbox_at_end"] = LabelOutboxes(r).pending()
        gw_res["outbox_drain_s"] = drain_wait(r, 300)
        # Hidden gold a campaign may still show: none left means part of the window ran
        # without gold (cheaper: no gold to score), so its figures flatter the gateway.
        qc = QualityControl(r, QualityPolicy())
        gw_res["gold_left"] = {c: qc.gold_left(c) for c in [via_gw, *tails]}
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = search_pb2_grpc.SearchServiceStub(channel)
        for res, cs in ((base_res, [direct]), (gw_res, [via_gw, *tails])):
            if res is not None:
                res["applied_at_search"] = sum(
                    stub.GetProgress(
                        search_pb2.GetProgressRequest(campaign=c), timeout=30
                    ).questions
                    for c in cs
                )
        channel.close()
        for spy in spies:
            if spy is not None:
                spy.wait(args.profile + args.profile_after + 30)
        report(base_res, gw_res, args.search_replicas)
        for name in ("search", "gateway", "search-gw", "relay"):
            if (work / f"{name}.pyspy").exists():
                print(
                    f"\n{name} hotspots (py-spy, {args.profile} s under load): {work / name}.pyspy"
                )
                package = "maskprop_gateway" if name == "gateway" else "maskprop_search"
                print(hotspots(work / f"{name}.pyspy", package))
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "replicas": args.search_replicas,
                        "big_class": args.big_class,
                        "baseline": base_res,
                        "gateway": gw_res,
                    }
                )
            )


def dry(x: dict[str, Any]) -> str:
    """Whether the crowd ran dry: every campaign done before the window ended, or leases
    that came back empty (the workers waited for questions) and when."""
    window = x.get("window_s", 0.0)
    done = x.get("campaigns_done") or {}
    k = x.get("campaigns", 1)
    empty = x.get("lease_sizes", []).count(0)
    series = x.get("empty_series", [])
    first = next((i / 2 for i, n in enumerate(series) if n), None)
    if x.get("campaign_done") and x["seconds"] < window:
        return f"YES: all {k} campaign(s) done at {x['seconds']:.1f} s of the {window:.0f} s window"
    out = "no: the load ran the whole window" if not x.get("campaign_done") else "no"
    out += f"; campaigns done {len(done)}/{k}"
    if done:
        out += " (at " + ", ".join(f"{t:.0f}" for t in sorted(done.values())) + " s)"
    if empty:
        out += f"; {empty} empty leases, the first at {first} s"
    return out


def report(base: dict[str, Any] | None, gw: dict[str, Any], replicas: int = 1) -> None:
    print(f"{replicas} search replica(s); window {gw.get('window_s', 0):.0f} s")
    print(
        f"{'':36} {'answers':>8} {'s':>6} {'window /s':>10} {'answers/s':>10} {'sustained/s':>12} "
        f"{'req p50 ms':>11} {'req p99 ms':>11} {'/answer p50':>12} {'/answer p99':>12} "
        f"{'lease p50':>10} {'lease p99':>10}"
    )
    rows = [("gateway (HTTP, QC, gRPC)", gw)]
    if base is not None:
        rows.insert(0, ("search gRPC SubmitAnswers directly", base))
    for name, x in rows:
        print(
            f"{name:36} {x['answers']:>8} {x['seconds']:>6.1f} "
            f"{x.get('window_answers_per_s', 0):>10.0f} {x['answers_per_s']:>10.0f} "
            f"{x.get('sustained_answers_per_s', 0):>12.0f} {x['p50_ms']:>11.1f} "
            f"{x['p99_ms']:>11.1f} {x['per_answer_p50_ms']:>12.3f} {x['per_answer_p99_ms']:>12.3f} "
            f"{x['lease_p50_ms']:>10.1f} {x['lease_p99_ms']:>10.1f}"
        )
    if gw.get("rate"):
        print(
            f"open loop: the crowd offered {gw['rate']:.0f} answers/s (each worker on a fixed "
            f"schedule); leases sent over {LATE_S * 1e3:.0f} ms behind it {gw['late_leases']} of "
            f"{len(gw.get('lease_sizes', []))}, p99 of their lag {gw['lag_p99_ms']:.1f} ms"
        )
    else:
        print("closed loop: each worker's next request as soon as its last one returned")
    if gw["errors"]:
        print(f"gateway errors: {gw['errors']}")
    # Where the two cores went: CPU time per answer of each process (the load generator's is
    # its own process's, measured by itself).
    for name, x in [("direct" if x is base else "gateway", x) for _, x in rows]:
        n = max(x["answers"], 1)
        cpu = {**x.get("cpu_s", {}), "loadgen": x.get("loadgen_cpu_s", 0.0)}
        parts = ", ".join(f"{k} {1e6 * v / n:.0f}" for k, v in cpu.items())
        print(
            f"{name:8} CPU us per answer: {parts}; total {1e6 * sum(cpu.values()) / n:.0f} "
            f"(answers given {x['answers']}, applied by search {x.get('applied_at_search', '?')})"
        )
        system = x.get("sys_s", {})
        idle = x.get("idle_cpu_per_s", {})
        wall = x.get("wall_s", 0.0)
        print(
            f"{'':8} of which system (kernel): "
            + ", ".join(f"{k} {1e6 * v / n:.0f}" for k, v in system.items())
            + "; idle cost over this run's wall time: "
            + ", ".join(f"{k} {1e6 * v * wall / n:.0f}" for k, v in idle.items())
            + f"; into Redis {x.get('redis_in_bytes', 0) / n:.0f} bytes per answer"
            + (f", {x['aof_rewrites']} AOF rewrites" if "aof_rewrites" in x else "")
        )
        sizes, calls = x.get("lease_sizes", []), x.get("search_calls", {})
        applied = x.get("applied_at_search", 0) or 0
        print(
            f"{'':8} leases {len(sizes)} ({sizes.count(0)} empty, "
            f"{sum(sizes) / max(len(sizes), 1):.0f} questions on average); search served "
            f"{calls.get('LeaseQuestions', 0)} LeaseQuestions and "
            f"{calls.get('SubmitAnswers', 0)} SubmitAnswers calls "
            f"({applied / max(calls.get('SubmitAnswers', 0), 1):.0f} answers a call)"
        )
        if "outbox_at_end" in x:
            print(
                f"{'':8} label outboxes at the window's end: {x['outbox_at_end']} records of "
                f"decisions waiting (their labels' CPU is not in the figures above), sent "
                f"{x['outbox_drain_s']:.1f} s later"
            )
        if x.get("gold_left"):
            left = x["gold_left"]
            out = [c for c, n in left.items() if n == 0]
            print(
                f"{'':8} hidden gold left at the end: {min(left.values())}-"
                f"{max(left.values())} items a campaign"
                + (
                    f"; USED UP in {len(out)} of {len(left)} campaigns: part of the window "
                    "ran without hidden gold (less QC work than a real run; raise --gold)"
                    if out
                    else ""
                )
            )
        print(f"{'':8} answers per 0.5 s: {x.get('series', [])}")
        if x.get("tail_series"):
            print(
                f"{'':8} answer requests per {TAIL_BUCKET_S} s, p99 ms (over 50 ms / all): "
                + ", ".join(f"{p:.0f} ({n}/{m})" for p, n, m in x["tail_series"])
            )
        if "empty_series" in x:
            print(f"{'':8} empty leases per 0.5 s: {x['empty_series']}")
        cmds = sorted(x.get("redis_commands", {}).items(), key=lambda kv: -kv[1][1])
        calls = sum(c for c, _ in dict(cmds).values())
        print(
            f"{'':8} Redis: {calls / n:.1f} commands per answer; by CPU: "
            + ", ".join(f"{k} {c / n:.2f}x {u / n:.0f}us" for k, (c, u) in cmds[:8])
        )
    s_gw = gw.get("sustained_answers_per_s") or gw["answers_per_s"]
    w_gw = gw.get("window_answers_per_s") or gw["answers_per_s"]
    if base is not None:
        s_base = base.get("sustained_answers_per_s") or base["answers_per_s"]
        w_base = base.get("window_answers_per_s") or base["answers_per_s"]
        print(
            f"campaign done: direct {base['campaign_done']}, gateway {gw['campaign_done']}; "
            f"window mean gateway/direct = {w_gw / w_base:.3f}; "
            f"sustained throughput gateway/direct = {s_gw / s_base:.3f}; "
            f"answer-request p50 gateway/direct = {gw['p50_ms'] / base['p50_ms']:.1f}x"
        )
        print(f"crowd ran dry (direct): {dry(base)}")
    print(f"crowd ran dry (gateway): {dry(gw)}")
    print(
        f"goals through the gateway: window mean {w_gw:.0f} answers/s over "
        f"{gw.get('window_s', 0):.0f} s >= 5000 {'met' if w_gw >= 5000 else 'NOT met'}"
        f"; answer-request p50 {gw['p50_ms']:.1f} ms, p99 {gw['p99_ms']:.1f} ms < 50 ms "
        f"{'met' if gw['p99_ms'] < 50 else 'NOT met'}"
    )


def common_args(
    ap: argparse.ArgumentParser,
    load: argparse.ArgumentParser,
    *,
    seconds: float,
    masks: int = 60_000,
) -> None:
    """Options shared by this benchmark and bench_search_load.py (``load``: the load
    generator's own parser)."""
    for name in ("--target", "--campaign", "--truth", "--out"):
        load.add_argument(name, required=True)
    for p in (ap, load):
        p.add_argument("--workers", type=int, default=32)
        p.add_argument("--batch", type=int, default=100)
        p.add_argument("--seconds", type=float, default=seconds)
    ap.add_argument("--masks", type=int, default=masks)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the services' logs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    load = sub.add_parser("load", help="(internal) the load generator process")
    load.add_argument("--mode", choices=["gateway", "direct"], required=True)
    load.add_argument("--key", default="")
    # 150k masks: the gateway phase of a 60k campaign lasts ~5 s, mostly ramp-up and tail,
    # so its "sustained" rate was not one.
    common_args(ap, load, seconds=60.0, masks=150_000)
    for p in (ap, load):
        p.add_argument(
            "--rate",
            type=float,
            default=0.0,
            help="open loop: the answers/s the crowd offers, each worker on a fixed schedule "
            "(the gateway run only); 0: closed loop, each worker's next request as soon as "
            "its last one returns",
        )
    ap.add_argument(
        "--gold",
        type=int,
        default=2000,
        help="hidden gold items a campaign (400, the default before the seventeenth session, "
        "ran out 35-45 s into a 120 s run at 5,500-6,000 answers/s)",
    )
    ap.add_argument(
        "--cache-masks",
        type=int,
        default=0,
        help="search's MASKPROP_CACHE_MASKS (0: the service's default, 4M masks); a pool "
        "larger than it makes search load classes under load",
    )
    ap.add_argument(
        "--relay-nice",
        type=int,
        choices=range(0, 20),
        metavar="N",
        default=None,
        help="publish labels through a relay process of their own (search's "
        "MASKPROP_LABEL_RELAY=process) at nice level N (0-19); default: the relay thread "
        "inside search",
    )
    ap.add_argument(
        "--big-class",
        type=int,
        default=0,
        help="add one class of this many masks (class 0) to the pool; the other classes "
        "share --masks with ADE20K's long-tailed sizes",
    )
    ap.add_argument(
        "--search-replicas",
        type=int,
        choices=[1, 2],
        default=1,
        help="search processes splitting the classes; one gateway each",
    )
    ap.add_argument(
        "--campaigns",
        type=int,
        default=1,
        help="the gateway's crowd works on this many campaigns: the whole pool and K - 1 of "
        "the long tail alone (a worker moves on when its campaign is done)",
    )
    ap.add_argument(
        "--redundancy",
        type=int,
        default=1,
        help="the gateway's MASKPROP_REDUNDANCY: answers asked for each question",
    )
    ap.add_argument(
        "--gateway-switch-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="the gateway's MASKPROP_SWITCH_INTERVAL_S (how long a busy thread may keep the GIL "
        "from the event loop; 0: the service default, 0.02)",
    )
    ap.add_argument(
        "--gateway-background",
        choices=["thread", "process"],
        default="process",
        help="where each gateway's settler and forwarder run (MASKPROP_BACKGROUND; deployed: "
        "process)",
    )
    ap.add_argument(
        "--background-nice",
        type=int,
        default=10,
        metavar="N",
        help="the background process's nice value (MASKPROP_BACKGROUND_NICE; deployed: 10)",
    )
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the direct-gRPC baseline (and its campaign: half the setup)",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="py-spy search under the baseline, then gateway and search, N seconds each",
    )
    ap.add_argument(
        "--profile-after",
        type=float,
        default=0.0,
        metavar="S",
        help="start the gateway run's profiles S seconds into the load (past its start-up)",
    )
    args = ap.parse_args()
    if args.rate < 0 or getattr(args, "cache_masks", 0) < 0:  # the load parser has no cache
        ap.error("--rate and --cache-masks must not be negative")
    if args.cmd == "load":
        run_load(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
