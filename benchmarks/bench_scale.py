"""A whole campaign at scale through every service, on a real broker and Redis (issue #15).

Processes (loopback only): clusterer, search, sink and the verify gateway, each as its own
process (``python -m maskprop_<name>``, what ``maskprop serve <name>`` runs), started with the
integration tier's :class:`tests.integration.conftest.Service`; the pool goes in through
``maskprop feed-simulated --big-class`` (class 0 holds ``--big-class`` masks, the other classes
share the rest with ADE20K's long-tailed sizes); a simulated crowd answers over the gateway's
HTTP API (``/v1/leases``, ``/v1/answers``, ``/v1/progress``; the lean keep-alive client of
``bench_gateway.py``) until the campaign is done or ``--max-answers`` is reached.

The crowd is noise-free: the truth of a question is looked up by what a worker sees of it (its
class name and RLE), the truth of the pool's lowest-index mask with that key (simulated ellipses
repeat at millions of masks, so the key is not always unique); the library's reference labels
(:func:`maskprop_app.embedded.reference_labels`) are computed with the same answers, so the
sink must end up holding exactly them.

Stages and what is measured in each: feed (``feed-simulated`` running; the clusterer stores
batches meanwhile), cluster (feed end -> search has every class's tree), answer (crowd start ->
campaign done), sink drain (done -> the sink holds a label for every mask), sink restart
(SIGTERM, start -> gRPC health SERVING, at the labels held).  Per stage: wall time, peak RSS of
each service's process tree (/proc, sampled every 0.25 s; the clusterer's build workers count
to the clusterer), Redis ``used_memory`` (peak sampled, at the end) and ``used_memory_peak``.
Over the run: bytes into Redis per answer (``total_net_input_bytes`` over the answer stage /
answers the crowd gave: every client, gateway QC included), Kafka bytes per label (the labels
topic's log segments on disk / labels the sink holds), the sink's ledger (labels, distinct
masks, duplicates) and its labels against the library's.

``--faults``: kill -9 of the clusterer's process tree ``--kill-build-after`` s after it logged
"tree build started" for class 0 (the largest build), of search while answers flow (its
saves), of the sink while it writes, and a broker restart (``scripts/dev-infra.sh
restart-kafka``), each service started again at once; ``--faults clusterer,sink`` injects
those alone.  The broker
restart needs ``--infra private``: a broker and Redis of this run's own on free ports
(``scripts/dev-infra.sh up`` with ``MASKPROP_INFRA_DIR`` and the ports set, ``down --wipe``
at the end), never the shared dev-infra broker.  ``--infra shared`` (default) uses
``KAFKA_BOOTSTRAP``/``REDIS_URL`` (``source .cache/dev-infra/env``) and an empty Redis database.

    source .cache/dev-infra/env
    .venv/bin/python benchmarks/bench_scale.py --masks 60000 --big-class 20000   # CI size
    .venv/bin/python benchmarks/bench_scale.py --masks 3000000 --big-class 1000000 \\
        --infra private --json scale.json
    ... --faults --infra private
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_gateway import _Http, percentile  # noqa: E402

from maskprop_runtime.bus import KafkaBus  # noqa: E402
from tests.integration.conftest import Service, free_port  # noqa: E402

PEPPER = "bench-scale-pepper-0123456789"
SERVICES = ("clusterer", "search", "sink", "gateway")
FAULTS = ("clusterer", "search", "sink", "broker")
MODULES = {
    "clusterer": "maskprop_clusterer",
    "search": "maskprop_search",
    "sink": "maskprop_sink",
    "gateway": "maskprop_gateway",
}


# ---------------------------------------------------------------------------- /proc
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        todo += _children(p)
    return total


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (a pod killed: the build workers go with it)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Sampler:
    """Peak RSS per service process tree and peak Redis ``used_memory``, per stage."""

    def __init__(self, services: dict[str, Service], r: Any) -> None:
        self.services, self.r = services, r
        self.peak: dict[str, int] = {}
        self.redis_peak = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.25):
            rss = {
                name: tree_rss(s.proc.pid)
                for name, s in self.services.items()
                if s.proc is not None and s.proc.poll() is None
            }
            try:
                mem = int(self.r.info("memory")["used_memory"])
            except Exception:  # Redis restarting or busy: skip a sample
                mem = 0
            with self.lock:
                for k, v in rss.items():
                    self.peak[k] = max(self.peak.get(k, 0), v)
                self.redis_peak = max(self.redis_peak, mem)

    def take(self) -> dict[str, Any]:
        """This stage's peaks; starts the next stage's."""
        with self.lock:
            out = {"peak_rss_mb": {k: round(v / 2**20) for k, v in self.peak.items()}}
            out["redis_used_memory_peak_sampled_mb"] = round(self.redis_peak / 2**20, 1)
            self.peak, self.redis_peak = {}, 0
        info = self.r.info("memory")
        out["redis_used_memory_mb"] = round(int(info["used_memory"]) / 2**20, 1)
        out["redis_used_memory_peak_mb"] = round(int(info["used_memory_peak"]) / 2**20, 1)
        return out

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


# ---------------------------------------------------------------------------- infra
class Infra:
    """The broker and Redis the run uses: the shared dev-infra ones (an empty Redis database)
    or a private pair started with scripts/dev-infra.sh on free ports."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self.env = {**os.environ}
        if kind == "private":
            self.env.update(
                MASKPROP_INFRA_DIR=str(work / "infra"),
                KAFKA_PORT=str(free_port()),
                KAFKA_CONTROLLER_PORT=str(free_port()),
                REDIS_PORT=str(free_port()),
            )
            self._script("up")
            self.kafka = f"127.0.0.1:{self.env['KAFKA_PORT']}"
            self.redis_url = f"redis://127.0.0.1:{self.env['REDIS_PORT']}/0"
            self.kafka_data = work / "infra" / "kafka" / "data"
        else:
            kafka = os.environ.get("KAFKA_BOOTSTRAP") or os.environ.get("MASKPROP_IT_KAFKA")
            redis_base = os.environ.get("REDIS_URL") or os.environ.get("MASKPROP_IT_REDIS")
            if not (kafka and redis_base):
                raise SystemExit("error: `source .cache/dev-infra/env` first (or --infra private)")
            self.kafka = kafka
            self.redis_url = _empty_db(redis_base)
            self.kafka_data = ROOT / ".cache" / "dev-infra" / "kafka" / "data"

    def _script(self, *argv: str) -> None:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "dev-infra.sh"), *argv],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def restart_broker(self) -> float:
        if self.kind != "private":
            raise SystemExit("error: a broker restart needs --infra private")
        t0 = time.monotonic()
        self._script("restart-kafka")
        return time.monotonic() - t0

    def close(self, namespace: str) -> None:
        if self.kind == "private":
            self._script("down", "--wipe")
        else:  # the shared broker keeps no benchmark's topics (GBs a run at 3M masks)
            with contextlib.suppress(ConnectionError):
                KafkaBus(self.kafka, namespace=namespace, connect_timeout_s=10).drop_namespace()


def _empty_db(base_url: str) -> str:
    import redis

    for db in range(15, 0, -1):
        url = base_url.rsplit("/", 1)[0] + f"/{db}"
        if redis.Redis.from_url(url).dbsize() == 0:
            return url
    raise SystemExit("error: no empty Redis database (1-15) to run in")


def topic_bytes(data_dir: Path, topic: str) -> int:
    """Bytes of a topic's log segments on the broker's disk (all partitions)."""
    return sum(
        f.stat().st_size
        for d in data_dir.glob(f"{topic}-*")
        for f in d.glob("*.log")
        if f.is_file()
    )


# ---------------------------------------------------------------------------- truth
def _key(class_name: str, counts: bytes | str) -> int:
    raw = counts.encode() if isinstance(counts, str) else counts
    digest = hashlib.blake2b(class_name.encode() + b"\0" + raw, digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Truth:
    """What a noise-free worker answers, looked up by what it sees (class name, RLE)."""

    def __init__(self, keys: np.ndarray, answers: np.ndarray, gold: dict[int, bool]) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys, self.answers, self.gold = keys[order], answers[order], gold

    def __call__(self, questions: list[dict[str, Any]]) -> list[bool]:
        keys = [_key(q["class_name"], q["mask"]["counts"]) for q in questions]
        at = np.searchsorted(self.keys, np.array(keys, dtype=np.uint64))
        at = np.minimum(at, len(self.keys) - 1)
        out = []
        for k, i in zip(keys, at.tolist(), strict=True):
            if k in self.gold:
                out.append(self.gold[k])
            elif int(self.keys[i]) == k:
                out.append(bool(self.answers[i]))
            else:
                raise KeyError(f"a question no pool mask has: {k}")
        return out


def pool_truth(tree_root: Path, campaign: str, pool: Any, iou: float) -> tuple[Any, np.ndarray]:
    """(key per pool index, noise-free answer per pool index): the masks' RLEs read back from
    the class files the clusterer stored; a key several masks share answers as its
    lowest-index mask does."""
    from maskprop.simulate.scenes import pool_index
    from maskprop_runtime.treestore import TreeStore

    n = len(pool)
    keys = np.zeros(n, dtype=np.uint64)
    store = TreeStore(tree_root)
    for c, name in enumerate(pool.class_names):
        manifest = store.tree_path(campaign, c)
        if not manifest.is_file():
            continue
        _tree, table, _sha = TreeStore.load_tree(manifest)
        blob, off = bytes(table.rle_blob), table.rle_offsets
        for j, mid in enumerate(table.mask_ids.tolist()):
            keys[pool_index(str(mid))] = _key(name, blob[int(off[j]) : int(off[j + 1])])
    truth = pool.ious >= iou
    # the lowest index of each key decides for every mask with that key
    order = np.lexsort((np.arange(n), keys))
    sk = keys[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sk[1:] != sk[:-1]
    leader = order[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
    answers = np.empty(n, dtype=bool)
    answers[order] = truth[leader]
    return keys, answers


# ---------------------------------------------------------------------------- crowd
class Crowd:
    """Simulated workers on the gateway's HTTP API in a background thread (asyncio)."""

    def __init__(self, port: int, key: str, campaign: str, truth: Truth, args: Any) -> None:
        self.port, self.key, self.campaign, self.truth = port, key, campaign, truth
        self.workers, self.batch, self.max_answers = args.workers, args.batch, args.max_answers
        self.timeout = args.answer_timeout
        self.answers = 0
        self.done = False
        self.errors: dict[str, int] = {}
        self.latency: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()
        self.last_check = 0.0

    def start(self) -> Crowd:
        self.thread.start()
        return self

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def _run(self) -> None:
        import asyncio

        async def call(http: _Http, method: str, path: str, body: Any = None) -> tuple[int, Any]:
            try:
                return await asyncio.wait_for(http.request(method, path, body), 60)
            except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError):
                if http.writer is not None:
                    http.writer.close()
                http.reader = http.writer = None
                return 0, None

        async def worker(i: int) -> None:
            wid = f"w{i:04d}"
            http = _Http("127.0.0.1", self.port, self.key)
            deadline = self.started + self.timeout
            while not self.done and time.monotonic() < deadline:
                if self.max_answers and self.answers >= self.max_answers:
                    return
                status, lease = await call(
                    http,
                    "POST",
                    "/v1/leases",
                    {"worker_id": wid, "campaign": self.campaign, "max_questions": self.batch},
                )
                if status != 201:
                    self._error(f"lease {status}")
                    if status == 403:
                        return
                    await asyncio.sleep(0.5)
                    continue
                if not lease["questions"]:
                    if time.monotonic() - self.last_check > 1.0:
                        self.last_check = time.monotonic()
                        st, out = await call(http, "GET", f"/v1/progress?campaign={self.campaign}")
                        if st == 200 and out.get("done"):
                            self.done = True
                    await asyncio.sleep(0.3)
                    continue
                answers = [
                    {"question_id": q["question_id"], "answer": a, "elapsed_ms": 1500}
                    for q, a in zip(lease["questions"], self.truth(lease["questions"]), strict=True)
                ]
                body = {"lease_id": lease["lease_id"], "worker_id": wid, "answers": answers}
                t0 = time.perf_counter()
                status, out = await call(http, "POST", "/v1/answers", body)
                if status == 200:
                    self.latency.append(time.perf_counter() - t0)
                    self.answers += int(out["accepted"])
                else:
                    self._error(f"answers {status}")
                    await asyncio.sleep(0.5)
            if http.writer is not None:
                http.writer.close()

        async def crowd() -> None:
            await asyncio.gather(*(worker(i) for i in range(self.workers)))

        asyncio.run(crowd())

    def join(self) -> dict[str, Any]:
        self.thread.join()
        return {
            "answers": self.answers,
            "campaign_done": self.done,
            "answer_request_p50_ms": round(percentile(self.latency, 50) * 1e3, 1),
            "answer_request_p99_ms": round(percentile(self.latency, 99) * 1e3, 1),
            "errors": self.errors,
        }


# ---------------------------------------------------------------------------- sink
class LineCounter:
    """Label lines in the sink's shards, read incrementally (only new bytes each call)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: dict[Path, tuple[int, int]] = {}  # file -> (bytes read, lines)

    def __call__(self) -> int:
        total = 0
        for f in self.folder.glob("*/labels/*/*.jsonl"):
            size = f.stat().st_size
            pos, lines = self.seen.get(f, (0, 0))
            if size < pos:  # cut back by a restarted sink (a torn line)
                pos, lines = 0, 0
            with open(f, "rb") as fh:
                fh.seek(pos)
                data = fh.read(size - pos)
            complete = data.rfind(b"\n") + 1
            lines += data.count(b"\n", 0, complete)
            self.seen[f] = (pos + complete, lines)
            total += lines
        return total


def healthy(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False


# ---------------------------------------------------------------------------- the run
def wait_for(cond: Any, timeout: float, what: str, services: dict[str, Service]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = []
            for f in sorted(next(iter(services.values())).log_dir.glob("*.log")):
                tails.append(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
            raise SystemExit(f"error: timed out waiting for {what}\n" + "\n".join(tails))
        time.sleep(0.5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    import redis as redis_client
    from maskprop_detector.simulated import wire_pool
    from maskprop_gateway.auth import KeyStore
    from maskprop_gateway.qc_rules import QualityPolicy
    from maskprop_gateway.quality import QualityControl
    from maskprop_gateway.simcrowd import simulated_gold
    from maskprop_search.service import SearchSettings
    from maskprop_sink.dataset import DatasetReader

    from maskprop.simulate.generator import ade_like_pool
    from maskprop_app.cmd_services import simulated_pool
    from maskprop_app.embedded import reference_labels
    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc

    faults = {f.strip() for f in args.faults.split(",") if f.strip()}
    if faults - set(FAULTS):
        raise SystemExit(f"error: --faults: unknown {sorted(faults - set(FAULTS))}; of {FAULTS}")
    if "broker" in faults and args.infra != "private":
        raise SystemExit("error: --faults broker restarts the broker: it needs --infra private")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir or None))
    logs = work / "logs"
    logs.mkdir()
    infra = Infra(args.infra, work)
    tag = uuid.uuid4().hex[:8]
    campaign = f"scale-{tag}"
    namespace = f"benchscale{tag}"
    data = work / "data"
    base = {
        **os.environ,
        "MASKPROP_ENV": "prod",
        "MASKPROP_SINK_ADMIN_TOKEN": uuid.uuid4().hex,
        "MASKPROP_KAFKA_BOOTSTRAP": infra.kafka,
        "MASKPROP_REDIS_URL": infra.redis_url,
        "MASKPROP_TOPIC_NAMESPACE": namespace,
        "MASKPROP_DATA_DIR": str(data),
        "MASKPROP_KAFKA_SESSION_TIMEOUT_MS": "10000",
        "MASKPROP_CONNECT_TIMEOUT_S": "180",
        "MASKPROP_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    grpc_port, http_port, sink_port = free_port(), free_port(), free_port()
    search_env = {"MASKPROP_GRPC_PORT": str(grpc_port), "MASKPROP_METRICS_PORT": str(free_port())}
    if "search" in faults:
        search_env["MASKPROP_LEASE_SECONDS"] = "10"  # questions of a killed search come back
    envs = {
        # INFO: its "tree build started" lines time the kill during class 0's build (one a class)
        "clusterer": {**base, "MASKPROP_GRPC_PORT": str(free_port()), "MASKPROP_LOG_LEVEL": "INFO"},
        "search": {**base, **search_env},
        "sink": {**base, "MASKPROP_GRPC_PORT": str(sink_port)},
        "gateway": {
            **base,
            "MASKPROP_HTTP_PORT": str(http_port),
            "MASKPROP_SEARCH_TARGET": f"127.0.0.1:{grpc_port}",
            "MASKPROP_KEY_PEPPER": PEPPER,
            "MASKPROP_RATE_PER_S": "1000000",
            "MASKPROP_RATE_BURST": "1000000",
            # as deployed (deploy/k8s): settler and forwarder in a child process at nice 10,
            # counted in the gateway's process tree
            "MASKPROP_BACKGROUND": "process",
            "MASKPROP_BACKGROUND_NICE": "10",
        },
    }
    services = {name: Service(MODULES[name], envs[name], logs) for name in SERVICES}
    r = redis_client.Redis.from_url(infra.redis_url)
    report: dict[str, Any] = {
        "masks": args.masks,
        "big_class": args.big_class,
        "classes": args.classes,
        "infra": args.infra,
        "faults": ",".join(f for f in FAULTS if f in faults) or False,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "stages": {},
        "fault_events": [],
    }
    stages = report["stages"]
    sampler: Sampler | None = None

    def event(what: str, **extra: Any) -> None:
        report["fault_events"].append({"what": what, **extra})
        print(f"fault: {what} {extra}", flush=True)

    try:
        for name in ("clusterer", "search", "sink"):
            services[name].start()
        sampler = Sampler(services, r)
        print(f"work dir {work}; campaign {campaign}; redis {infra.redis_url}", flush=True)

        # ---- feed: maskprop feed-simulated (the clusterer stores batches meanwhile)
        t0 = time.monotonic()
        feed_env = {
            **base,
            "MASKPROP_KAFKA_MAX_MESSAGE_BYTES": os.environ.get(
                "MASKPROP_KAFKA_MAX_MESSAGE_BYTES", "1048576"
            ),
        }
        maskprop = Path(sys.executable).parent / "maskprop"
        feed_argv = [str(maskprop), "feed-simulated", "--campaign", campaign]
        feed_argv += ["--masks", str(args.masks), "--classes", str(args.classes)]
        feed_argv += ["--big-class", str(args.big_class), "--seed", str(args.seed)]
        feed_argv += ["--dim", str(args.dim)]
        subprocess.run(feed_argv, env=feed_env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        stages["feed"] = {"wall_s": round(time.monotonic() - t0, 1), **sampler.take()}
        print(f"feed: {stages['feed']['wall_s']} s", flush=True)

        # ---- cluster: until search has every class's tree
        t0 = time.monotonic()
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = search_pb2_grpc.SearchServiceStub(channel)
        trees = data / "trees"
        if "clusterer" in faults:
            # kill -9 of the clusterer's process tree --kill-build-after seconds after it logged
            # "tree build started" for class 0 (the 1M-mask build, in a worker process); the
            # event records whether class 0's tree was stored already (then the kill missed it).
            started_at: list[float] = []

            def building() -> bool:
                if (trees / campaign / "0" / "tree").exists():
                    return True  # built before the kill: killed anyway, reported as missed
                if not started_at:
                    log = logs / f"{MODULES['clusterer']}.{services['clusterer'].starts}.log"
                    for line in log.read_text(errors="replace").splitlines():
                        if '"tree build started"' in line and json.loads(line).get("class_id") == 0:
                            started_at.append(time.monotonic())
                            break
                return (
                    bool(started_at) and time.monotonic() - started_at[0] >= args.kill_build_after
                )

            wait_for(building, 3600, "class 0's build", services)
            was_built = (trees / campaign / "0" / "tree").exists()
            stored = len(list(trees.glob(f"{campaign}/*/tree")))
            kill_tree(services["clusterer"].proc.pid)  # type: ignore[union-attr]
            services["clusterer"].proc.wait(10)  # type: ignore[union-attr]
            event(
                "kill -9 clusterer (process tree) during class 0's build",
                tree_0_stored=was_built,
                trees_stored=stored,
            )
            services["clusterer"].start()

        def opened() -> bool:
            try:
                got = stub.GetProgress(search_pb2.GetProgressRequest(campaign=campaign), timeout=10)
                return len(got.classes) == args.classes
            except grpc.RpcError:
                return False

        wait_for(opened, 3600, "every class's tree in search", services)
        stages["cluster"] = {"wall_s": round(time.monotonic() - t0, 1), **sampler.take()}
        print(f"cluster: {stages['cluster']['wall_s']} s", flush=True)

        # ---- the crowd's truth, the gold, the gateway
        pool = simulated_pool(
            args.masks, args.classes, seed=args.seed, dim=args.dim, big_class=args.big_class
        )
        iou = SearchSettings().iou_threshold
        keys, answers = pool_truth(trees, campaign, pool, iou)
        report["rle_keys_shared"] = int(len(keys) - len(np.unique(keys)))
        # Gold of the campaign's class names; an item whose (class, RLE) a pool mask shows too
        # is left out (a worker could not tell them apart).
        held = replace(
            ade_like_pool(2000, args.classes, seed=99, dim=8), class_names=pool.class_names
        )
        known = set(keys.tolist())
        gold = [
            g
            for g in simulated_gold(held, campaign, args.gold)
            if _key(g.class_name, g.rle_counts) not in known
        ]
        del known
        gold_truth = {_key(g.class_name, g.rle_counts): bool(g.answer) for g in gold}
        api_key = KeyStore(r, PEPPER).create("bench", "Bench Crowd")
        QualityControl(r, QualityPolicy()).import_gold(gold)
        services["gateway"].start()
        wait_for(lambda: _http_ok(http_port), 120, "the gateway", services)

        # ---- answer
        t0 = time.monotonic()
        r.config_resetstat()
        in0 = int(r.info("stats")["total_net_input_bytes"])
        aof0 = r.info("persistence")
        crowd = Crowd(http_port, api_key, campaign, Truth(keys, answers, gold_truth), args).start()
        lines = LineCounter(data / "dataset")
        if faults - {"clusterer"}:
            every = args.kill_search_after or max(args.masks // 60, 500)

            def answered(k: int) -> Any:
                return lambda: crowd.answers >= k or crowd.done

            wait_for(answered(every), 3600, "answers", services)
            if "search" in faults:
                services["search"].kill9()
                event("kill -9 search while answers flow", answers=crowd.answers, done=crowd.done)
                services["search"].start()
            if "sink" in faults:
                held_before = lines()
                wait_for(lambda: lines() > held_before + 1000, 3600, "the sink writing", services)
                services["sink"].kill9()
                event("kill -9 sink while it writes", labels_on_disk=lines(), answers=crowd.answers)
                services["sink"].start()
            if "broker" in faults:
                wait_for(answered(2 * every), 3600, "answers", services)
                at = crowd.answers
                took = infra.restart_broker()
                event("broker restart", answers=at, done=crowd.done, restart_s=round(took, 1))
        stages["answer"] = {}
        crowd_out = crowd.join()
        stages["answer"] = {"wall_s": round(time.monotonic() - t0, 1), **crowd_out}
        in_bytes = int(r.info("stats")["total_net_input_bytes"]) - in0
        stages["answer"]["redis_in_bytes_per_answer"] = round(in_bytes / max(crowd.answers, 1))
        aof1 = r.info("persistence")
        if aof1.get("aof_enabled") and aof1.get("aof_rewrites") == aof0.get("aof_rewrites"):
            # what Redis persisted (scripts replicated by their effects): the writes alone
            aof = int(aof1["aof_current_size"]) - int(aof0["aof_current_size"])
            stages["answer"]["redis_aof_bytes_per_answer"] = round(aof / max(crowd.answers, 1))
        stages["answer"]["answers_per_s"] = round(
            crowd.answers / max(stages["answer"]["wall_s"], 1e-9)
        )
        stages["answer"].update(sampler.take())
        print(f"answer: {stages['answer']}", flush=True)
        if not crowd.done:
            got = stub.GetProgress(search_pb2.GetProgressRequest(campaign=campaign), timeout=30)
            report["undecided_masks"] = int(sum(c.undecided_masks for c in got.classes))
        channel.close()

        # ---- sink drain: until a label per mask is on disk
        t0 = time.monotonic()
        n = len(pool)
        if crowd.done:
            wait_for(lambda: lines() >= n, 1800, "the sink to hold every mask", services)
        else:
            time.sleep(5)
        stages["sink_drain"] = {"wall_s": round(time.monotonic() - t0, 1), **sampler.take()}
        stages["sink_drain"]["labels_on_disk"] = lines()

        # ---- sink restart at the labels held
        services["sink"].stop()
        t0 = time.monotonic()
        services["sink"].start()
        wait_for(lambda: healthy(sink_port), 600, "the sink's health", services)
        stages["sink_restart"] = {
            "wall_s": round(time.monotonic() - t0, 2),
            "labels": lines(),
            **sampler.take(),
        }
        print(f"sink restart: {stages['sink_restart']['wall_s']} s", flush=True)

        # ---- the run's invariants
        labels_bytes = topic_bytes(infra.kafka_data, f"{namespace}.maskprop.labels")
        masks_bytes = topic_bytes(infra.kafka_data, f"{namespace}.maskprop.masks")
        reader = DatasetReader(data / "dataset")
        stats = reader.ledger_stats(campaign)
        report["ledger"] = stats
        report["kafka_bytes_per_label"] = round(labels_bytes / max(stats["labels"], 1))
        report["kafka_labels_topic_mb"] = round(labels_bytes / 2**20, 1)
        report["kafka_bytes_per_mask_fed"] = round(masks_bytes / n)
        report["labels_lost"] = n - stats["unique_masks"]
        report["labels_duplicated"] = stats["duplicate_keys"]
        report["campaign_done"] = crowd.done
        if crowd.done and not args.skip_reference:
            t0 = time.monotonic()
            got = {rec["mask_id"]: int(rec["accepted"]) for rec in reader.labels(campaign)}
            ref_pool = replace(wire_pool(pool), ious=np.where(answers, 1.0, 0.0).astype(np.float32))
            expected = reference_labels(ref_pool, SearchSettings())
            report["labels_equal_library"] = got == expected
            report["labels_differing"] = sum(got.get(k) != v for k, v in expected.items())
            report["reference_s"] = round(time.monotonic() - t0, 1)
        return report
    finally:
        if sampler is not None:
            sampler.stop()
        for s in reversed(list(services.values())):
            s.stop()
        try:
            r.flushdb()
        except Exception:  # a private Redis may be gone already
            pass
        infra.close(namespace)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _http_ok(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def table(rep: dict[str, Any]) -> str:
    rows = [
        f"{rep['masks']:,} masks (largest class {rep['big_class']:,}), {rep['classes']} classes; "
        f"infra {rep['infra']}; faults {rep['faults']}; commit {rep['commit']}",
        f"{'stage':13} {'wall s':>8} {'clusterer':>10} {'search':>8} {'sink':>8} "
        f"{'gateway':>8} {'redis MB':>9} {'redis pk':>9}   (peak RSS MB per process tree)",
    ]
    widths = (10, 8, 8, 8)
    for name, st in rep["stages"].items():
        rss = st.get("peak_rss_mb", {})
        cells = " ".join(f"{rss.get(k, '-'):>{w}}" for k, w in zip(SERVICES, widths, strict=True))
        used, peak = st.get("redis_used_memory_mb", "-"), st.get("redis_used_memory_peak_mb", "-")
        mem = f"{used:>9} {peak:>9}"
        rows.append(f"{name:13} {st.get('wall_s', 0):>8} {cells} {mem}")
    ans = rep["stages"].get("answer", {})
    rows.append(
        f"answers {ans.get('answers')} ({ans.get('answers_per_s')}/s over the stage; request p50 "
        f"{ans.get('answer_request_p50_ms')} ms, p99 {ans.get('answer_request_p99_ms')} ms); "
        f"bytes into Redis per answer {ans.get('redis_in_bytes_per_answer')} (goal <= 1024: "
        f"all clients; appended to the AOF {ans.get('redis_aof_bytes_per_answer')}); "
        f"Kafka bytes per label {rep.get('kafka_bytes_per_label')}; "
        f"sink restart {rep['stages'].get('sink_restart', {}).get('wall_s')} s at "
        f"{rep['stages'].get('sink_restart', {}).get('labels')} labels"
    )
    rows.append(
        f"campaign done {rep.get('campaign_done')}; ledger {rep.get('ledger')}; lost "
        f"{rep.get('labels_lost')}, duplicated {rep.get('labels_duplicated')}; equal to the "
        f"library {rep.get('labels_equal_library')} ({rep.get('labels_differing')} differ); "
        f"RLE keys shared by several masks {rep.get('rle_keys_shared')}"
    )
    for ev in rep["fault_events"]:
        rows.append(f"fault: {ev}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--masks", type=int, default=60_000, help="masks in the campaign")
    ap.add_argument("--big-class", type=int, default=20_000, help="masks of class 0")
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--gold", type=int, default=400)
    ap.add_argument("--max-answers", type=int, default=0, help="the crowd's budget (0: none)")
    ap.add_argument("--answer-timeout", type=float, default=3600.0)
    ap.add_argument("--infra", choices=["shared", "private"], default="shared")
    ap.add_argument(
        "--faults",
        nargs="?",
        const=",".join(FAULTS),
        default="",
        help=f"the faults to inject, comma-separated, of {','.join(FAULTS)} (alone: all)",
    )
    ap.add_argument("--kill-build-after", type=float, default=2.0, help="s into the build")
    ap.add_argument(
        "--kill-search-after",
        type=int,
        default=0,
        help="answers before search is killed (the broker restarts at twice as many; "
        "0: masks / 60)",
    )
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    rep = run(args)
    print(table(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
