"""Two campaigns with different parameters at once on the same clusterer, search and sink
processes, on the real broker and Redis (issue #16, "Must show"): search opens each campaign's
sessions with the parameters in the campaign registry, not its process settings; a crowd
answers both campaigns' questions by turns over search's gRPC; the sink ends up holding, for
each campaign, exactly the labels the library decides for that campaign's own parameters."""

from __future__ import annotations

import pytest
import redis as redis_client
from maskprop_detector.simulated import pool_events, wire_pool
from maskprop_search.service import SearchSettings
from maskprop_sink.dataset import DatasetReader

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop.params import AnnotationParams
from maskprop.simulate.generator import ade_like_pool
from maskprop.simulate.scenes import pool_index
from maskprop_app.embedded import reference_labels
from maskprop_runtime import topics
from maskprop_runtime.bus import KafkaBus
from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2, search_pb2_grpc
from tests.inprocess.test_campaign_search import CAMPAIGNS  # the in-process test's parameters
from tests.integration.conftest import Deployment, wait_for
from tests.integration.test_distributed import call

pytestmark = pytest.mark.integration


def test_two_campaigns_with_their_own_parameters_on_the_same_services(infra, tmp_path) -> None:
    pool = ade_like_pool(1500, 3, seed=21, dim=16)
    dep = Deployment(infra, tmp_path)
    names = {key: f"{dep.campaign}-{key}" for key in CAMPAIGNS}
    registry = CampaignRegistry(redis_client.Redis.from_url(dep.env["MASKPROP_REDIS_URL"]))
    for key, values in CAMPAIGNS.items():
        kw = dict(values)
        seed, strategy = kw.pop("seed"), kw.pop("strategy")
        registry.create(
            CampaignSpec(
                name=names[key], classes=tuple(pool.class_names), images_root=tmp_path,
                detector_weights=tmp_path / "d.pt", params=AnnotationParams(**kw),
                budget=Budget(questions=100_000), seed=int(seed), strategy=str(strategy),
            )
        )  # fmt: skip
    dep.start()
    try:
        bus = KafkaBus(
            dep.env["MASKPROP_KAFKA_BOOTSTRAP"], namespace=dep.env["MASKPROP_TOPIC_NAMESPACE"]
        )
        producer = bus.producer()
        for name in names.values():  # both pools in flight at once
            for key, ev in pool_events(pool, name, batch_size=250):
                producer.send(topics.MASKS, key, ev.SerializeToString())
        producer.close()
        channel = dep.channel()
        stub = search_pb2_grpc.SearchServiceStub(channel)

        def opened() -> bool:
            return all(
                len(call(stub.GetProgress, search_pb2.GetProgressRequest(campaign=n), dep).classes)
                == len(pool.class_names)
                for n in names.values()
            )

        wait_for(opened, 180, "trees of both campaigns in search", dep)
        truth = wire_pool(pool).ious >= 0.75
        open_ = set(names.values())
        while open_:  # one lease of each open campaign by turns
            for name in sorted(open_):
                resp = call(
                    stub.LeaseQuestions,
                    search_pb2.LeaseQuestionsRequest(
                        campaign=name, max_questions=40, lease_owner="it"
                    ),
                    dep,
                )
                if resp.campaign_done:
                    open_.discard(name)
                    continue
                answers = [
                    search_pb2.AnswerItem(
                        question_id=q.question_id, is_correct=bool(truth[pool_index(q.mask_id)])
                    )
                    for q in resp.questions
                ]
                if answers:
                    call(stub.SubmitAnswers, search_pb2.SubmitAnswersRequest(answers=answers), dep)
        channel.close()
        reader = DatasetReader(dep.data / "dataset")

        def held(name: str) -> int:
            try:
                return reader.ledger_stats(name)["unique_masks"]
            except (FileNotFoundError, ValueError):
                return 0

        labels: dict[str, dict[str, int]] = {}
        for key, name in names.items():
            wait_for(lambda n=name: held(n) >= len(pool), 180, f"the sink to hold {name}", dep)
            assert reader.ledger_stats(name)["duplicate_keys"] == 0
            labels[key] = {r["mask_id"]: int(r["accepted"]) for r in reader.labels(name)}
    finally:
        dep.stop()
    for key, values in CAMPAIGNS.items():
        assert labels[key] == reference_labels(wire_pool(pool), SearchSettings(**values)), key
    assert labels["strict"] != labels["loose"]
    # neither is what the search process's own (paper) settings decide
    assert labels["strict"] != reference_labels(wire_pool(pool), SearchSettings())
