"""A campaign over a folder, end to end in one process (in-memory bus, fakeredis): the
registry, ``add-images`` (checks, records, publishes), the real detector (a tiny untrained
model), clusterer and search; search opens the classes' sessions with the campaign's own
parameters, and ``status`` counts every stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import fakeredis
import pytest

torch = pytest.importorskip("torch", reason="the detector needs torch")

from maskprop_clusterer.service import ClustererSettings, build_clusterer  # noqa: E402
from maskprop_detector.service import DetectorSettings, build_detector  # noqa: E402
from maskprop_search.service import SearchSettings, build_search  # noqa: E402

from maskprop.campaign_spec import Budget, CampaignSpec  # noqa: E402
from maskprop.params import AnnotationParams  # noqa: E402
from maskprop_runtime import topics  # noqa: E402
from maskprop_runtime.bus import InMemoryBus  # noqa: E402
from maskprop_runtime.campaigns import CampaignRegistry  # noqa: E402
from maskprop_runtime.ingest import (  # noqa: E402
    DUPLICATE,
    IngestSettings,
    campaign_status,
    check_images,
    publish_plan,
    record_plan,
)
from maskprop_runtime.loop import run_until_idle  # noqa: E402
from tests.unit.detector.conftest import untrained_pool  # noqa: E402

CLASSES = ("disc", "square")


def test_a_folder_becomes_search_sessions_with_the_campaigns_parameters(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    weights = untrained_pool(tmp_path, 6, max_detections=12, classes=CLASSES)
    root = tmp_path / "synth" / "images" / "pool"
    shutil.copy(root / "000001.png", root / "again.png")  # a duplicate, refused
    bus, redis = InMemoryBus(), fakeredis.FakeRedis()
    registry = CampaignRegistry(redis)
    params = AnnotationParams(samples_per_cluster=4, accept_threshold=0.9)
    spec = CampaignSpec(
        name="shapes", classes=CLASSES, images_root=root, detector_weights=weights,
        params=params, budget=Budget(questions=100), strategy="bfs", seed=5,
    )  # fmt: skip
    registry.create(spec)

    report = check_images(spec, redis, IngestSettings())
    assert len(report.accepted) == 6 and dict(report.refused) == {DUPLICATE: 1}
    record_plan(registry, "shapes", report, batch_size=4)
    assert publish_plan(registry, "shapes", bus.producer(), batches_per_s=1e6).done

    detector = build_detector(
        DetectorSettings(detector_weights=weights, image_root=root, device="cpu"), bus, redis
    )
    clusterer = build_clusterer(ClustererSettings(data_dir=tmp_path / "state"), bus, redis)
    core, search = build_search(SearchSettings(data_dir=tmp_path / "state"), bus, redis)
    run_until_idle([detector, clusterer, search])
    assert not bus.read(topics.DEADLETTER)

    stages = {s.stage: (s.done, s.total) for s in campaign_status(registry, "shapes").stages}
    assert stages["batches published"] == stages["batches detected"] == (2, 2)
    assert stages["masks detected"][0] > 0
    classes = core.classes("shapes")
    assert classes and stages["classes in search"] == (len(classes), 2)
    for k in classes:
        with core.store.locked("shapes", [k]) as batch:
            loaded = batch.held[k].loaded
            assert loaded is not None
            session = loaded.session
            assert session.params == params and session.strategy == "bfs"
