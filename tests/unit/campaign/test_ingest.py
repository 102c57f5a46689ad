"""``add-images`` on a synthetic folder, publishing to the in-memory bus: unreadable,
oversized, duplicate and escaping images refused with their reasons, nothing of them recorded
or published; batches in the detector's contract, at a bounded rate, resumable."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import fakeredis
import pytest
from maskprop_detector.service import DetectorHandler

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop_runtime import topics
from maskprop_runtime.bus import InMemoryBus
from maskprop_runtime.campaigns import CampaignError, CampaignRegistry
from maskprop_runtime.files import resolve_under
from maskprop_runtime.ingest import (
    DUPLICATE,
    OUTSIDE,
    TOO_LARGE,
    TOO_MANY_PIXELS,
    UNREADABLE,
    IngestSettings,
    campaign_status,
    check_images,
    publish_plan,
    read_plan,
    record_plan,
)
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2

from .conftest import GOOD_IMAGES

CLASSES = ("circle", "square")


def settings(**kw: object) -> IngestSettings:
    values: dict[str, object] = {
        "ingest_max_image_bytes": 200_000,
        "ingest_max_image_pixels": 1_000_000,
        "ingest_batch_size": 4,
        **kw,
    }
    return IngestSettings(**values)  # type: ignore[arg-type]


def spec_for(root: Path, manifest: Path | None = None) -> CampaignSpec:
    return CampaignSpec(
        name="shapes",
        classes=CLASSES,
        images_root=root,
        manifest=manifest,
        detector_weights=Path("/models/d.pt"),
        budget=Budget(questions=10),
    )


@pytest.fixture
def registry() -> CampaignRegistry:
    return CampaignRegistry(fakeredis.FakeRedis())


def batches(bus: InMemoryBus) -> list[detector_pb2.ImageBatch]:
    return [detector_pb2.ImageBatch.FromString(r.value) for r in bus.read(topics.IMAGES)]


def test_check_refuses_each_bad_image_with_its_reason(pool: Path, registry: CampaignRegistry):
    report = check_images(spec_for(pool), registry.redis, settings())
    assert len(report.accepted) == GOOD_IMAGES
    assert dict(report.refused) == {
        DUPLICATE: 1,
        UNREADABLE: 2,  # garbage.png, truncated.png
        TOO_MANY_PIXELS: 1,
        TOO_LARGE: 1,
        OUTSIDE: 1,
    }
    assert report.examples[OUTSIDE] == ["escape.png"]
    assert set(report.examples[UNREADABLE]) == {"garbage.png", "truncated.png"}
    assert report.examples[DUPLICATE] == ["z_dups/copy_of_first.png"]  # walked after pool/
    assert len({a.sha256 for a in report.accepted}) == GOOD_IMAGES
    assert all(a.path.startswith("pool/") for a in report.accepted)
    assert registry.redis.keys("*") == []  # checking writes nothing


def test_manifest_paths_escaping_the_root_are_refused(pool: Path, registry: CampaignRegistry):
    inside = sorted(p.relative_to(pool).as_posix() for p in pool.glob("pool/*.png"))
    manifest = pool.parent / "list.txt"
    manifest.write_text(
        "\n".join([*inside[:3], "../../secret.png", "/etc/passwd", "# a comment", "", "nope.png"])
    )
    report = check_images(spec_for(pool, manifest), registry.redis, settings())
    assert [a.path for a in report.accepted] == inside[:3]
    assert report.refused[OUTSIDE] == 2
    assert report.refused["not a readable file"] == 1


def test_folder_checks(tmp_path: Path, pool: Path, registry: CampaignRegistry):
    with pytest.raises(CampaignError, match="does not exist"):
        check_images(spec_for(tmp_path / "gone"), registry.redis, settings())
    with pytest.raises(CampaignError, match="not under MASKPROP_IMAGE_ROOT"):
        check_images(spec_for(pool), registry.redis, settings(image_root=tmp_path / "other"))
    # an image root above the folder: refs are relative to it, as the detector reads them
    report = check_images(spec_for(pool), registry.redis, settings(image_root=tmp_path))
    assert all(a.path.startswith("pool/images/pool/") for a in report.accepted)


def test_record_and_publish_batches_the_detector_accepts(pool: Path, registry: CampaignRegistry):
    registry.create(spec_for(pool))
    report = check_images(spec_for(pool), registry.redis, settings())
    plan = record_plan(registry, "shapes", report, batch_size=4)
    assert (plan.images, plan.batch_count, plan.published) == (GOOD_IMAGES, 2, 0)
    assert registry.state("shapes") == "running"
    bus = InMemoryBus()
    waits: list[float] = []
    now = [0.0]

    def sleep(s: float) -> None:
        waits.append(s)
        now[0] += s

    done = publish_plan(
        registry, "shapes", bus.producer(), batches_per_s=2.0, clock=lambda: now[0], sleep=sleep
    )
    assert done.done and done.published == 2
    assert sum(waits) == pytest.approx(0.5)  # 2 batches at 2 a second: the second waits 0.5 s
    sent = batches(bus)
    assert [(b.batch_index, b.batch_count) for b in sent] == [(0, 2), (1, 2)]
    assert [b.event_id for b in sent] == ["images.shapes.r1.0", "images.shapes.r1.1"]
    refs = [ref for b in sent for ref in b.images]
    assert [ref.image_id for ref in refs] == [a.image_id for a in report.accepted]
    handler = DetectorHandler(None, SimpleNamespace(classes=CLASSES), None, image_root=pool)
    for b in sent:
        assert tuple(b.class_names) == CLASSES
        handler._check(b)  # the detector's own validation of an ImageBatch
        for ref in b.images:
            assert resolve_under(pool, ref.uri) is not None
    status = campaign_status(registry, "shapes")
    stages = {s.stage: (s.done, s.total) for s in status.stages}
    assert stages["images accepted"] == (GOOD_IMAGES, GOOD_IMAGES)
    assert stages["batches published"] == (2, 2)
    assert stages["batches detected"] == (0, 2)
    assert stages["classes in search"] == (0, 2)
    assert dict(status.refused)[TOO_LARGE] == 1


def test_a_second_call_finds_the_images_already_there(pool: Path, registry: CampaignRegistry):
    registry.create(spec_for(pool))
    first = check_images(spec_for(pool), registry.redis, settings())
    record_plan(registry, "shapes", first, batch_size=4)
    again = check_images(spec_for(pool), registry.redis, settings())
    assert again.accepted == [] and again.refused[DUPLICATE] == GOOD_IMAGES + 1
    with pytest.raises(CampaignError, match="already has its images"):
        record_plan(registry, "shapes", first, batch_size=4)


class FlakyProducer:
    """The in-memory producer whose flush fails once after ``fail_at`` sends (a broker that
    goes away mid-publish)."""

    def __init__(self, bus: InMemoryBus, fail_at: int) -> None:
        self.inner, self.fail_at, self.sent = bus.producer(), fail_at, 0

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent += 1
        self.inner.send(topic, key, value)

    def flush(self) -> None:
        if self.sent == self.fail_at:
            raise ConnectionError("broker went away")
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def test_publishing_resumes_after_a_failure_and_a_pause(pool: Path, registry: CampaignRegistry):
    registry.create(spec_for(pool))
    report = check_images(spec_for(pool), registry.redis, settings())
    record_plan(registry, "shapes", report, batch_size=1)  # 6 batches
    bus = InMemoryBus()
    with pytest.raises(ConnectionError):
        publish_plan(registry, "shapes", FlakyProducer(bus, 3), batches_per_s=1e6)
    plan = read_plan(registry.redis, "shapes")
    assert plan is not None and plan.published == 2  # the third was not acknowledged

    def pause_after_four(label: str, done: int, total: int) -> None:
        if done == 4:
            registry.set_state("shapes", "paused")

    paused = publish_plan(
        registry, "shapes", bus.producer(), batches_per_s=1e6, progress=pause_after_four
    )
    assert paused.published == 4 and not paused.done
    registry.set_state("shapes", "running")
    assert publish_plan(registry, "shapes", bus.producer(), batches_per_s=1e6).done
    ids = [b.event_id for b in batches(bus)]
    # the unacknowledged batch 2 was sent again on resume (a broker that had kept it would
    # hold it twice under one event id, and the detector's dedup drops the second)
    assert ids == [f"images.shapes.r1.{b}" for b in range(6)]


def test_paused_or_stopped_campaigns_take_no_images(pool: Path, registry: CampaignRegistry):
    registry.create(spec_for(pool))
    report = check_images(spec_for(pool), registry.redis, settings())
    registry.set_state("shapes", "paused")
    with pytest.raises(CampaignError, match="is paused"):
        record_plan(registry, "shapes", report, batch_size=4)
    assert read_plan(registry.redis, "shapes") is None
    assert registry.redis.exists("maskprop:campaign:shapes:images") == 0


def test_a_pause_between_check_and_record_refuses_the_whole_plan(pool: Path):
    """Another client pauses the campaign after record_plan read its state but before the
    MULTI runs: WATCH makes the MULTI fail whole, nothing of the plan is written."""
    server = fakeredis.FakeServer()
    registry = CampaignRegistry(fakeredis.FakeRedis(server=server))
    other = CampaignRegistry(fakeredis.FakeRedis(server=server))
    registry.create(spec_for(pool))
    report = check_images(spec_for(pool), registry.redis, settings())
    real_pipeline = registry.redis.pipeline

    class Racing:
        def __init__(self, *args: object, **kw: object) -> None:
            self.inner = real_pipeline(*args, **kw)

        def __enter__(self) -> Racing:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def multi(self) -> None:
            other.set_state("shapes", "paused")  # the concurrent pause
            self.inner.multi()

        def __getattr__(self, attr: str) -> object:
            return getattr(self.inner, attr)

    registry.redis.pipeline = Racing  # type: ignore[method-assign]
    with pytest.raises(CampaignError, match="changed while its images were being added"):
        record_plan(registry, "shapes", report, batch_size=4)
    assert other.state("shapes") == "paused"
    assert read_plan(other.redis, "shapes") is None
    assert other.redis.exists("maskprop:campaign:shapes:images") == 0
