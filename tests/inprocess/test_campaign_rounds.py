"""A campaign's round 2 in distributed mode, in one process (in-memory bus, fakeredis): the pool
published again as ``<name>.r2`` with retrained weights the real detector loads from its models
root, new trees in the real clusterer and search opened with the campaign's parameters, one
budget across rounds, and weights outside the root or missing dead-lettered."""

from __future__ import annotations

import shutil
from pathlib import Path

import fakeredis
import pytest

torch = pytest.importorskip("torch", reason="the detector needs torch")

from maskprop_clusterer.service import ClustererSettings, build_clusterer  # noqa: E402
from maskprop_detector.service import DetectorSettings, build_detector  # noqa: E402
from maskprop_search.budget import SPENT, CampaignGate  # noqa: E402
from maskprop_search.service import SearchSettings, build_search  # noqa: E402

from maskprop.campaign_spec import Budget, CampaignSpec  # noqa: E402
from maskprop.params import AnnotationParams  # noqa: E402
from maskprop_runtime import topics  # noqa: E402
from maskprop_runtime.bus import InMemoryBus  # noqa: E402
from maskprop_runtime.campaigns import CampaignError, CampaignRegistry  # noqa: E402
from maskprop_runtime.ingest import (  # noqa: E402
    IngestSettings,
    campaign_status,
    check_images,
    publish_plan,
    read_plan,
    record_plan,
)
from maskprop_runtime.loop import run_until_idle  # noqa: E402
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2  # noqa: E402
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2  # noqa: E402
from tests.unit.detector.conftest import untrained_pool  # noqa: E402

CLASSES = ("disc", "square")


def _masks_per_image(bus: InMemoryBus, campaign: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in bus.read(topics.MASKS):
        e = detector_pb2.MaskStreamEvent.FromString(r.value)
        if e.WhichOneof("body") == "masks" and e.masks.campaign == campaign:
            for m in e.masks.masks:
                out[m.image_id] = out.get(m.image_id, 0) + 1
    return out


def test_round_two_re_detects_with_its_weights_into_new_trees(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    weights = untrained_pool(tmp_path, 6, max_detections=12, classes=CLASSES)
    root = tmp_path / "synth" / "images" / "pool"
    models = tmp_path / "models"
    # "retrained" weights: another model (at most 3 detections an image) in the models root
    untrained_pool(tmp_path / "r2", 1, max_detections=3, classes=CLASSES)
    models.mkdir()
    shutil.copy(tmp_path / "r2" / "w.pt", models / "shapes-r2.pt")
    bus, redis = InMemoryBus(), fakeredis.FakeRedis()
    registry = CampaignRegistry(redis)
    params = AnnotationParams(samples_per_cluster=4, accept_threshold=0.9)
    spec = CampaignSpec(
        name="shapes", classes=CLASSES, images_root=root, detector_weights=weights,
        params=params, budget=Budget(questions=30, rounds=2), strategy="bfs", seed=5,
    )  # fmt: skip
    registry.create(spec)
    record_plan(registry, "shapes", check_images(spec, redis, IngestSettings()), batch_size=4)
    assert publish_plan(registry, "shapes", bus.producer(), batches_per_s=1e6).done
    with pytest.raises(CampaignError, match="round 2 of 'shapes' needs its retrained weights"):
        publish_plan(registry, "shapes", bus.producer(), batches_per_s=1e6, round_=2)

    detector = build_detector(
        DetectorSettings(
            detector_weights=weights, image_root=root, device="cpu", models_root=models
        ),
        bus,
        redis,
    )
    clusterer = build_clusterer(ClustererSettings(data_dir=tmp_path / "state"), bus, redis)
    core, search = build_search(SearchSettings(data_dir=tmp_path / "state"), bus, redis)
    run_until_idle([detector, clusterer, search])
    round1 = core.classes("shapes")
    assert round1 and core.classes("shapes.r2") == []

    plan = publish_plan(
        registry, "shapes", bus.producer(), batches_per_s=1e6, round_=2, weights="shapes-r2.pt"
    )
    assert plan.done and plan.batch_count == 2
    plans = read_plan(redis, "shapes", 1), read_plan(redis, "shapes", 2)
    assert plans[0] is not None and plans[1] is not None
    assert plans[0].published == plans[1].published == 2  # each round counts its own
    sent = [detector_pb2.ImageBatch.FromString(r.value) for r in bus.read(topics.IMAGES)]
    assert [b.event_id for b in sent] == [
        "images.shapes.r1.0", "images.shapes.r1.1", "images.shapes.r2.0", "images.shapes.r2.1",
    ]  # fmt: skip
    assert {b.campaign for b in sent[2:]} == {"shapes.r2"} and sent[2].weights == "shapes-r2.pt"
    run_until_idle([detector, clusterer, search])
    assert not bus.read(topics.DEADLETTER)

    first, second = _masks_per_image(bus, "shapes"), _masks_per_image(bus, "shapes.r2")
    assert set(second) <= set(first) and second  # the same images (same ids), detected again
    assert max(second.values()) <= 3 < max(first.values())  # ... by the round's weights
    round2 = core.classes("shapes.r2")
    assert round2  # new trees: the clusterer closed round 2's classes apart from round 1's
    for k in round2:
        with core.store.locked("shapes.r2", [k]) as batch:
            loaded = batch.held[k].loaded
            assert loaded is not None  # opened with the campaign's parameters, not the process's
            assert loaded.session.params == params and loaded.session.strategy == "bfs"

    status = campaign_status(registry, "shapes")
    stages = {st.stage: (st.done, st.total) for st in status.stages}
    assert stages["batches detected"] == stages["round 2 batches detected"] == (2, 2)
    assert stages["round 2 batches published"] == (2, 2)
    assert stages["round 2 masks detected"][0] == sum(second.values())
    assert stages["round 2 classes in search"] == (len(round2), 2)
    assert status.budget.masks == stages["masks detected"][0] + sum(second.values())

    # one budget across rounds: round 2's leases count against the campaign's 30 questions
    gate = CampaignGate(redis)
    assert gate.reserve("shapes.r2", 25).questions == 25
    assert gate.reserve("shapes", 25).questions == 5
    spent = gate.reserve("shapes.r2", 1)
    assert spent.questions == 0 and spent.code == SPENT


def test_round_weights_outside_the_models_root_or_missing_are_dead_lettered(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    weights = untrained_pool(tmp_path, 2, max_detections=4, classes=CLASSES)
    (tmp_path / "models").mkdir()
    bus, redis = InMemoryBus(), fakeredis.FakeRedis()
    detector = build_detector(
        DetectorSettings(
            detector_weights=weights, image_root=tmp_path / "synth/images/pool", device="cpu",
            models_root=tmp_path / "models",
        ),
        bus,
        redis,
    )  # fmt: skip
    p = bus.producer()
    for i, w in enumerate(["../w.pt", str(weights), "nope.pt"]):
        batch = detector_pb2.ImageBatch(
            event_id=f"images.cam.r2.{i}", campaign="cam.r2", batch_index=0, batch_count=1,
            images=[detector_pb2.ImageRef(image_id="i1", uri="000001.png")], weights=w,
        )  # fmt: skip
        p.send(topics.IMAGES, b"cam.r2", batch.SerializeToString())
    p.flush()
    run_until_idle([detector])
    reasons = [
        common_pb2.DeadLetter.FromString(r.value).reason for r in bus.read(topics.DEADLETTER)
    ]
    assert reasons == [
        "weights '../w.pt' are not under the models root",
        f"weights {str(weights)!r} are not under the models root",
        "weights 'nope.pt' do not exist under the models root",
    ]
    assert not bus.read(topics.MASKS)
