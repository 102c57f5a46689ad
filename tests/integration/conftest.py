"""Integration tier: services as separate processes on the real Kafka broker and Redis
server that scripts/test.sh starts (scripts/dev-infra.sh).  Outside CI, without them, the
tier is skipped with the command that starts them; in CI a missing server is a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from maskprop_runtime.server import free_port

ROOT = Path(__file__).resolve().parents[2]
# Every sink here runs with MASKPROP_ENV=prod, which needs its Dataset service's admin token.
SINK_TOKEN = "sink-admin-token-for-tests"


@pytest.fixture(scope="session")
def infra() -> dict[str, str]:
    kafka = os.environ.get("MASKPROP_IT_KAFKA")
    redis = os.environ.get("MASKPROP_IT_REDIS")
    if not (kafka and redis):
        msg = "no broker: run `bash scripts/dev-infra.sh up && source .cache/dev-infra/env`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return {"kafka": kafka, "redis": redis}


class Service:
    """One service process (``python -m <module>``) with its log in the test's tmp dir."""

    def __init__(self, module: str, env: dict[str, str], log_dir: Path) -> None:
        self.module = module
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Service:
        self.starts += 1
        log = open(self.log_dir / f"{self.module}.{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module], env=self.env, stdout=log, stderr=log
        )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Deployment:
    """clusterer + search + sink for one campaign, isolated by a topic namespace;
    ``relay_process``: search's labels go out through ``maskprop_search.relay`` ("relay")."""

    def __init__(
        self, infra: dict[str, str], tmp: Path, *, relay_process: bool = False, **search_env: str
    ) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.campaign = f"it-{self.tag}"
        self.grpc_port = free_port()
        self.data = tmp / "data"
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True)
        # A Redis database of its own (1-15), emptied first: no state of earlier runs.
        db = 1 + int(self.tag, 16) % 15
        redis_url = infra["redis"].rsplit("/", 1)[0] + f"/{db}"
        import redis as redis_client

        redis_client.Redis.from_url(redis_url).flushdb()
        base = {
            **os.environ,
            "MASKPROP_ENV": "prod",
            "MASKPROP_SINK_ADMIN_TOKEN": SINK_TOKEN,
            "MASKPROP_KAFKA_BOOTSTRAP": infra["kafka"],
            "MASKPROP_REDIS_URL": redis_url,
            "MASKPROP_TOPIC_NAMESPACE": f"it{self.tag}",
            "MASKPROP_DATA_DIR": str(self.data),
            "MASKPROP_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "MASKPROP_CONNECT_TIMEOUT_S": "120",
            "PYTHONUNBUFFERED": "1",
        }
        self.env = base
        self.redis_url = redis_url
        self.search_metrics_port: int | None = None  # search's /metrics, with relay_process
        if relay_process:
            self.search_metrics_port = free_port()
            search_env = {
                **search_env,
                "MASKPROP_LABEL_RELAY": "process",
                "MASKPROP_METRICS_PORT": str(self.search_metrics_port),
            }
        self.services = {
            "clusterer": Service(
                "maskprop_clusterer", {**base, "MASKPROP_GRPC_PORT": str(free_port())}, self.logs
            ),
            "search": Service(
                "maskprop_search",
                {**base, "MASKPROP_GRPC_PORT": str(self.grpc_port), **search_env},
                self.logs,
            ),
            "sink": Service(
                "maskprop_sink", {**base, "MASKPROP_GRPC_PORT": str(free_port())}, self.logs
            ),
        }
        if relay_process:
            self.services["relay"] = Service(
                "maskprop_search.relay",
                {**base, "MASKPROP_GRPC_PORT": str(free_port())},
                self.logs,
            )

    def start(self) -> Deployment:
        for s in self.services.values():
            s.start()
        return self

    def stop(self) -> None:
        for s in self.services.values():
            s.stop()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    def log_tail(self, n: int = 30) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


def wait_for(cond, timeout: float, what: str, dep: Deployment | None = None, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    tail = dep.log_tail() if dep else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
