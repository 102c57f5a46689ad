"""The detector as its own process on the real broker and Redis, in front of the clusterer,
search and sink processes: image references in, labels in the dataset out."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("torch", reason="the detector needs torch")

from maskprop_sink.dataset import DatasetReader

from maskprop_runtime import topics
from maskprop_runtime.bus import KafkaBus
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc
from tests.integration.conftest import Deployment, Service, free_port, wait_for
from tests.integration.test_distributed import call, sink_stats
from tests.unit.detector.conftest import untrained_pool

pytestmark = pytest.mark.integration
CLASSES = ("disc", "square")


def test_detector_process_feeds_the_pipeline(infra, tmp_path):
    untrained_pool(tmp_path, 12, max_detections=10, classes=CLASSES)
    dep = Deployment(infra, tmp_path)
    detector = Service(
        "maskprop_detector",
        {
            **dep.env,
            "MASKPROP_GRPC_PORT": str(free_port()),
            "MASKPROP_DETECTOR_WEIGHTS": str(tmp_path / "w.pt"),
            "MASKPROP_IMAGE_ROOT": str(tmp_path / "synth/images/pool"),
            "MASKPROP_DEVICE": "cpu",
        },
        dep.logs,
    )
    dep.services["detector"] = detector
    dep.start()
    try:
        bus = KafkaBus(
            dep.env["MASKPROP_KAFKA_BOOTSTRAP"], namespace=dep.env["MASKPROP_TOPIC_NAMESPACE"]
        )
        producer = bus.producer()
        for b, ids in enumerate(([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12])):
            batch = detector_pb2.ImageBatch(
                event_id=f"images.{dep.campaign}.{b}", campaign=dep.campaign,
                images=[detector_pb2.ImageRef(image_id=f"i{k}", uri=f"{k:06d}.png") for k in ids],
                batch_index=b, batch_count=2, class_names=list(CLASSES),
            )  # fmt: skip
            producer.send(topics.IMAGES, dep.campaign.encode(), batch.SerializeToString())
        producer.close()

        import redis as redis_client

        r = redis_client.Redis.from_url(dep.env["MASKPROP_REDIS_URL"])
        key = f"maskprop:detector:{dep.campaign}:counts"
        wait_for(lambda: r.hlen(key) == 2, 240, "the detector to handle both batches", dep)
        counts: dict[int, int] = {}
        for raw in r.hvals(key):
            for c, n in json.loads(raw).items():
                counts[int(c)] = counts.get(int(c), 0) + n
        expected = {c: n for c, n in counts.items() if n}
        assert expected, "the untrained detector found no masks at all"

        stub = search_pb2_grpc.SearchServiceStub(dep.channel())

        def classes():
            resp = call(stub.GetProgress, search_pb2.GetProgressRequest(campaign=dep.campaign), dep)
            return {c.class_id: c.masks for c in resp.classes}

        wait_for(lambda: classes() == expected, 180, "trees of the detected masks in search", dep)
        while True:  # a crowd that says yes to everything
            resp = call(
                stub.LeaseQuestions,
                search_pb2.LeaseQuestionsRequest(
                    campaign=dep.campaign, max_questions=50, lease_owner="it"
                ),
                dep,
            )  # fmt: skip
            if resp.campaign_done:
                break
            if not resp.questions:
                time.sleep(0.2)
                continue
            answers = [
                search_pb2.AnswerItem(question_id=q.question_id, is_correct=True)
                for q in resp.questions
            ]
            call(stub.SubmitAnswers, search_pb2.SubmitAnswersRequest(answers=answers), dep)
        total = sum(expected.values())
        wait_for(
            lambda: sink_stats(dep)["unique_masks"] == total, 120, "all labels in the sink", dep
        )
        stats = sink_stats(dep)
        assert stats["labels"] == total and stats["duplicate_keys"] == 0
        images = {
            rec["image_id"] for rec in DatasetReader(dep.data / "dataset").labels(dep.campaign)
        }
        assert images <= {f"i{k}" for k in range(1, 13)}
        assert detector.alive()
    finally:
        dep.stop()
