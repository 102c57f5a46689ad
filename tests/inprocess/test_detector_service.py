"""The detector service on the in-memory bus: image references in, masks out, the campaign's
classes closed after its last batch, trees built by the real clusterer."""

import shutil

import fakeredis
import pytest

torch = pytest.importorskip("torch", reason="the detector needs torch")

from maskprop_clusterer.service import ClustererSettings, build_clusterer  # noqa: E402
from maskprop_detector.service import DetectorSettings, build_detector  # noqa: E402

from maskprop_runtime import topics  # noqa: E402
from maskprop_runtime.bus import InMemoryBus  # noqa: E402
from maskprop_runtime.loop import run_until_idle  # noqa: E402
from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2  # noqa: E402
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2  # noqa: E402
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2  # noqa: E402
from tests.unit.detector.conftest import untrained_pool  # noqa: E402

CLASSES = ("disc", "square")


@pytest.fixture
def stack(tmp_path):
    torch.set_num_threads(1)
    untrained_pool(tmp_path, 8, max_detections=20, classes=CLASSES)
    bus, redis = InMemoryBus(), fakeredis.FakeRedis()
    settings = DetectorSettings(
        detector_weights=tmp_path / "w.pt", image_root=tmp_path / "synth/images/pool",
        device="cpu", detector_batch_size=3,
    )  # fmt: skip
    detector = build_detector(settings, bus, redis)
    clusterer = build_clusterer(ClustererSettings(data_dir=tmp_path / "state"), bus, redis)
    return bus, detector, clusterer, tmp_path


def _batch(index, count, ids, campaign="cam", classes=CLASSES, event=None):
    return detector_pb2.ImageBatch(
        event_id=event or f"images.{campaign}.{index}",
        campaign=campaign,
        images=[detector_pb2.ImageRef(image_id=f"i{k}", uri=f"{k:06d}.png") for k in ids],
        batch_index=index,
        batch_count=count,
        class_names=list(classes),
    )


def _send(bus, *batches):
    p = bus.producer()
    for b in batches:
        p.send(topics.IMAGES, b.campaign.encode(), b.SerializeToString())
    p.flush()


def _masks(bus):
    return [detector_pb2.MaskStreamEvent.FromString(r.value) for r in bus.read(topics.MASKS)]


def test_batches_become_masks_then_closed_then_trees(stack):
    bus, detector, clusterer, _ = stack
    _send(bus, _batch(0, 2, [1, 2, 3, 4]))
    run_until_idle([detector])
    first = _masks(bus)
    assert first and all(e.WhichOneof("body") == "masks" for e in first)
    _send(bus, _batch(1, 2, [5, 6, 7, 8]), _batch(0, 2, [1, 2, 3, 4], event="images.cam.0.again"))
    run_until_idle([detector, clusterer])
    events = _masks(bus)
    detected = {c: 0 for c in range(len(CLASSES))}
    closed = {}
    for e in events:
        if e.WhichOneof("body") == "masks":
            assert e.event_id not in closed  # masks of a class never follow its "closed"
            detected[e.masks.class_id] += len(e.masks.masks)
            for m in e.masks.masks:
                assert m.rle.height == 64 and m.rle.width == 64 and 0 <= m.score <= 1
                assert m.image_id in {f"i{k}" for k in range(1, 9)}
        else:
            closed[e.closed.class_id] = e.closed.expected_masks
    # batch 0 was redelivered under a new id: it rewrote its count, it did not add to it
    first_counts = {
        c: sum(len(e.masks.masks) for e in first if e.masks.class_id == c) for c in detected
    }
    assert closed == {c: n - first_counts[c] for c, n in detected.items() if n - first_counts[c]}
    trees = [clusterer_pb2.TreeBuilt.FromString(r.value) for r in bus.read(topics.TREES)]
    assert {t.class_id for t in trees} == set(closed)
    assert {t.class_id: t.n_masks for t in trees} == closed
    assert not bus.read(topics.DEADLETTER)


def test_bad_batches_are_dead_lettered_and_bad_images_skipped(stack):
    bus, detector, _, tmp_path = stack
    shutil.copy(tmp_path / "synth/images/pool/000001.png", tmp_path / "outside.png")
    bad_classes = _batch(0, 1, [1], campaign="c2", classes=("disc", "star"))
    traversal = _batch(0, 1, [1], campaign="c3")
    traversal.images[0].uri = "../../outside.png"
    _send(bus, bad_classes, _batch(3, 2, [1], campaign="c4"), traversal)
    run_until_idle([detector])
    dead = [common_pb2.DeadLetter.FromString(r.value) for r in bus.read(topics.DEADLETTER)]
    reasons = " | ".join(d.reason for d in dead)
    assert len(dead) == 2 and "differ from the model's" in reasons and "batch_index" in reasons
    # the traversal image was skipped (logged), the batch still completed and closed nothing
    assert all(e.WhichOneof("body") != "masks" or e.masks.campaign != "c3" for e in _masks(bus))


def test_missing_weights_is_one_clear_error(tmp_path):
    from maskprop.errors import MaskpropError

    with pytest.raises(MaskpropError, match="detector weights not found"):
        build_detector(DetectorSettings(detector_weights=tmp_path / "none.pt"), InMemoryBus(), None)


def test_masks_no_event_can_carry_are_dead_lettered_and_left_out_of_the_count(stack):
    bus, detector, _, _ = stack
    handler = detector.handlers[topics.IMAGES].__self__
    assert handler.max_bytes == topics.record_limit()  # kafka_max_message_bytes' default
    handler.max_bytes = 1  # no mask fits: every one must be parked, none may block
    _send(bus, _batch(0, 1, [1, 2, 3]))
    run_until_idle([detector])
    dead = [common_pb2.DeadLetter.FromString(r.value) for r in bus.read(topics.DEADLETTER)]
    assert dead and all("exceeds maskprop.masks' limit of 1" in d.reason for d in dead)
    assert all(d.service == "detector" and d.source_topic == topics.IMAGES for d in dead)
    letters = [detector_pb2.MaskStreamEvent.FromString(d.payload) for d in dead]
    assert len({e.masks.masks[0].mask_id for e in letters}) == len(dead)
    # nothing sent, so no class expects masks: none is closed with a count it never gets
    assert _masks(bus) == []


def test_a_long_batch_keeps_the_consumer_alive_between_inference_batches(stack, monkeypatch):
    """A batch of many images on a CPU outlasts the group's max.poll.interval: the handler
    calls the loop's keep-alive (which also beats its watchdog) while the model works."""
    import maskprop_detector.service as service

    bus, detector, _, _ = stack
    monkeypatch.setattr(service, "KEEP_ALIVE_S", 0.0)  # every image, instead of every 5 s
    handler = detector.handlers[topics.IMAGES].__self__
    assert handler.keep_alive == detector.keep_alive  # wired by build_detector
    beats = []
    beat = detector.heartbeat.beat
    monkeypatch.setattr(detector.heartbeat, "beat", lambda: (beats.append(1), beat()))
    _send(bus, _batch(0, 1, [1, 2, 3, 4, 5, 6, 7]))
    run_until_idle([detector])
    assert len(beats) >= 6  # before each image the model takes but the first
    assert _masks(bus)
