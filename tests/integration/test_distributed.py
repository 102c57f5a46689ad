"""clusterer, search and sink as separate processes on the real broker and Redis.

The sink must end up holding exactly the labels the library computes in-process for the same
pool and seed: same masks, same labels, none missing, none twice, also across kill -9 of the
search service and the sink and a restart of the broker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid

import grpc
import pytest
from maskprop_detector.simulated import pool_events, wire_pool
from maskprop_search.service import SearchSettings
from maskprop_sink.dataset import DatasetReader

from maskprop.simulate.generator import ade_like_pool
from maskprop.simulate.scenes import pool_index
from maskprop_app.embedded import reference_labels
from maskprop_runtime import topics
from maskprop_runtime.bus import KafkaBus
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc
from tests.integration.conftest import ROOT, Deployment, wait_for

pytestmark = pytest.mark.integration

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def feed(dep: Deployment, pool) -> None:
    bus = KafkaBus(
        dep.env["MASKPROP_KAFKA_BOOTSTRAP"], namespace=dep.env["MASKPROP_TOPIC_NAMESPACE"]
    )
    producer = bus.producer()
    for key, ev in pool_events(pool, dep.campaign, batch_size=250):
        producer.send(topics.MASKS, key, ev.SerializeToString())
    producer.close()


def call(fn, request, dep: Deployment, timeout: float = 120.0):
    """A gRPC call retried while the service is down (a crowd client would do the same)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn(request, timeout=20)
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                raise AssertionError(f"{exc.code()}: {exc.details()}\n{dep.log_tail()}") from None
            time.sleep(0.5)


def sink_stats(dep: Deployment) -> dict[str, int]:
    try:
        return DatasetReader(dep.data / "dataset").ledger_stats(dep.campaign)
    except (FileNotFoundError, ValueError):
        return {"labels": 0, "accepted": 0, "unique_masks": 0, "duplicate_keys": 0}


def annotate(dep: Deployment, pool, stub, *, until_fraction: float = 1.0, batch: int = 40) -> None:
    """Answer questions from ground truth until the campaign is done (or enough is decided)."""
    truth = pool.ious >= 0.75
    n = len(pool)
    while True:
        resp = call(
            stub.LeaseQuestions,
            search_pb2.LeaseQuestionsRequest(
                campaign=dep.campaign, max_questions=batch, lease_owner="it"
            ),
            dep,
        )
        if resp.campaign_done:
            return
        if not resp.questions:
            time.sleep(0.2)  # questions may be out on expired leases; they come back
            continue
        answers = [
            search_pb2.AnswerItem(
                question_id=q.question_id, is_correct=bool(truth[pool_index(q.mask_id)])
            )
            for q in resp.questions
        ]
        call(stub.SubmitAnswers, search_pb2.SubmitAnswersRequest(answers=answers), dep)
        if until_fraction < 1.0:
            progress = call(
                stub.GetProgress, search_pb2.GetProgressRequest(campaign=dep.campaign), dep
            )
            decided = sum(c.accepted_masks + c.rejected_masks for c in progress.classes)
            if decided >= until_fraction * n:
                return


def check_sink_equals_library(dep: Deployment, pool, search: SearchSettings) -> dict[str, int]:
    n = len(pool)
    wait_for(lambda: sink_stats(dep)["unique_masks"] >= n, 180, "the sink to hold every mask", dep)
    stats = sink_stats(dep)
    labels = {
        r["mask_id"]: int(r["accepted"])
        for r in DatasetReader(dep.data / "dataset").labels(dep.campaign)
    }
    expected = reference_labels(wire_pool(pool), search)
    assert stats["duplicate_keys"] == 0
    assert stats["labels"] == n  # none twice
    assert set(labels) == set(expected)  # none missing
    assert labels == expected  # the same labels as the library in-process
    return stats


def start_and_open(dep: Deployment, pool, classes: int):
    dep.start()
    feed(dep, pool)
    channel = dep.channel()
    stub = search_pb2_grpc.SearchServiceStub(channel)

    def opened():
        resp = call(stub.GetProgress, search_pb2.GetProgressRequest(campaign=dep.campaign), dep)
        return len(resp.classes) == classes

    wait_for(opened, 180, "trees of every class in the search service", dep)
    return channel, stub


def test_services_on_kafka_and_redis_match_the_library(infra, tmp_path):
    pool = ade_like_pool(2400, 4, seed=11, dim=16)
    dep = Deployment(infra, tmp_path)
    try:
        channel, stub = start_and_open(dep, pool, 4)
        annotate(dep, pool, stub)
        stats = check_sink_equals_library(dep, pool, SearchSettings())
        assert stats["accepted"] > 0
        with pytest.raises(grpc.RpcError) as bad:
            stub.LeaseQuestions(
                search_pb2.LeaseQuestionsRequest(campaign="../x", max_questions=5), timeout=10
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        channel.close()
    finally:
        dep.stop()
    for name, svc in dep.services.items():
        assert svc.proc is not None and svc.proc.returncode == 0, f"{name} did not drain cleanly"


def test_kill9_of_search_and_sink_and_a_broker_restart_lose_and_duplicate_nothing(infra, tmp_path):
    pool = ade_like_pool(2400, 4, seed=12, dim=16)
    # Short leases: answers lost with a killed search process come back quickly.
    dep = Deployment(infra, tmp_path, MASKPROP_LEASE_SECONDS="3")
    try:
        channel, stub = start_and_open(dep, pool, 4)
        annotate(dep, pool, stub, until_fraction=0.3)
        dep.services["search"].kill9()
        dep.services["sink"].kill9()
        dep.services["search"].start()
        dep.services["sink"].start()
        annotate(dep, pool, stub, until_fraction=0.6)
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "dev-infra.sh"), "restart-kafka"],
            check=True,
            capture_output=True,
            timeout=180,
        )
        annotate(dep, pool, stub)
        check_sink_equals_library(dep, pool, SearchSettings())
        channel.close()
    finally:
        dep.stop()


def test_a_relay_process_publishes_every_label_once_across_its_kill9(infra, tmp_path):
    """search with ``label_relay=process`` publishes nothing itself: with the relay process
    killed, decided labels wait in the outboxes; a new relay sends each exactly once."""
    import redis as redis_client
    from maskprop_search.store import LabelOutboxes

    pool = ade_like_pool(2400, 4, seed=13, dim=16)
    dep = Deployment(infra, tmp_path, relay_process=True)
    outboxes = LabelOutboxes(redis_client.Redis.from_url(dep.redis_url))
    try:
        channel, stub = start_and_open(dep, pool, 4)
        annotate(dep, pool, stub, until_fraction=0.3)
        wait_for(lambda: sink_stats(dep)["unique_masks"] > 0, 60, "the relay's first labels", dep)
        dep.services["relay"].kill9()
        annotate(dep, pool, stub, until_fraction=0.7)
        time.sleep(1.0)  # a search that published its own labels would have emptied them
        waiting = outboxes.pending()
        assert waiting > 0, dep.log_tail()
        # search's gauge shows the records a missing relay leaves
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{dep.search_metrics_port}/metrics", timeout=10
        ).read()
        (gauge,) = [
            line
            for line in metrics.decode().splitlines()
            if line.startswith("maskprop_label_outbox_pending ")
        ]
        assert float(gauge.split()[1]) == waiting
        dep.services["relay"].start()
        annotate(dep, pool, stub)
        check_sink_equals_library(dep, pool, SearchSettings())
        wait_for(lambda: outboxes.pending() == 0, 30, "the outboxes to empty", dep)
        channel.close()
    finally:
        dep.stop()
    for name, svc in dep.services.items():
        assert svc.proc is not None and svc.proc.returncode == 0, f"{name} did not drain cleanly"


def test_a_service_that_cannot_reach_redis_says_so(infra, tmp_path):
    dep = Deployment(infra, tmp_path)
    env = {
        **dep.services["search"].env,
        "MASKPROP_REDIS_URL": "redis://127.0.0.1:1/0",
        "MASKPROP_CONNECT_TIMEOUT_S": "3",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "maskprop_search"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "cannot reach Redis at 127.0.0.1:1/0" in proc.stderr
    assert "retrying" in proc.stderr


def test_embedded_and_distributed_modes_give_identical_outputs(infra, tmp_path):
    from maskprop_sink.dataset import DatasetReader

    from maskprop_app.embedded import RunConfig, run_pipeline
    from maskprop_runtime.settings import RuntimeSettings

    dep = Deployment(infra, tmp_path / "d")  # for its namespace and flushed Redis database
    cfg = RunConfig(campaign=dep.campaign, masks=2000, classes=4, seed=21, dim=8)
    embedded = run_pipeline(cfg, tmp_path / "embedded", RuntimeSettings())
    distributed = run_pipeline(
        cfg,
        tmp_path / "distributed",
        RuntimeSettings(
            kafka_bootstrap=infra["kafka"],
            redis_url=dep.env["MASKPROP_REDIS_URL"],
            topic_namespace=dep.env["MASKPROP_TOPIC_NAMESPACE"],
            kafka_session_timeout_ms=6000,
        ),
    )
    assert embedded["mode"] == "embedded" and distributed["mode"] == "distributed"
    for key in ("labels_in_sink", "accepted", "questions", "sq", "precision", "coco"):
        assert embedded[key] == distributed[key], key

    def labels(root):
        return {
            r["mask_id"]: (r["accepted"], r["source"], r["node"])
            for r in DatasetReader(root / "dataset").labels(cfg.campaign)
        }

    assert labels(tmp_path / "embedded") == labels(tmp_path / "distributed")

    def coco(root):
        doc = json.loads((root / "annotations.json").read_text())
        files = {im["id"]: im["file_name"] for im in doc["images"]}
        return sorted(
            (files[a["image_id"]], a["category_id"], a["segmentation"]["counts"], a["area"])
            for a in doc["annotations"]
        ), sorted(c["name"] for c in doc["categories"])

    # Shard order follows partitions, so compare the exported content, not byte order.
    assert coco(tmp_path / "embedded") == coco(tmp_path / "distributed")


def test_a_namespace_is_dropped_with_its_topics_and_nothing_else(infra):
    ours, other = (KafkaBus(infra["kafka"], namespace=f"drop{uuid.uuid4().hex[:8]}") for _ in "ab")
    ours.ensure_topics([topics.MASKS, topics.LABELS])
    other.ensure_topics([topics.MASKS])
    dropped = ours.drop_namespace()
    assert dropped == sorted([ours.physical(topics.LABELS), ours.physical(topics.MASKS)])
    assert ours.drop_namespace() == []  # gone; the other namespace's topic stays
    assert other.drop_namespace() == [other.physical(topics.MASKS)]
    with pytest.raises(ValueError, match="needs a namespace"):
        KafkaBus(infra["kafka"]).drop_namespace()
