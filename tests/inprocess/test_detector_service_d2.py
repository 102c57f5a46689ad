"""The detector service with the detectron2 (PointRend) backend on the in-memory bus: weights
of that backend are served with the same events as the torchvision backend's, and the
service's backend setting refuses weights of the other backend."""

import fakeredis
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the detector needs torch")
pytest.importorskip("detectron2", reason="bash scripts/bootstrap.sh detectron2")

from maskprop_detector.model import DetectorConfig, build_model  # noqa: E402
from maskprop_detector.service import DetectorSettings, build_detector  # noqa: E402
from maskprop_detector.train import save_checkpoint  # noqa: E402

from maskprop.data.synth import synth_scenes  # noqa: E402
from maskprop.errors import MaskpropError  # noqa: E402
from maskprop_runtime import topics  # noqa: E402
from maskprop_runtime.bus import InMemoryBus  # noqa: E402
from maskprop_runtime.loop import run_until_idle  # noqa: E402
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2  # noqa: E402

CLASSES = ("disc", "square")


@pytest.fixture
def weights(tmp_path):
    torch.set_num_threads(1)
    synth_scenes(3, tmp_path / "synth", size=64, classes=CLASSES, split={"pool": 1.0})
    cfg = DetectorConfig(
        classes=CLASSES, image_size=64, fpn_channels=32, feature_dim=8, backend="detectron2",
        score_threshold=0.0, min_box_area=0.0, max_detections=5,
    )  # fmt: skip
    save_checkpoint(tmp_path / "w.pt", build_model(cfg), cfg)
    return tmp_path


def test_pointrend_weights_are_served_as_masks_with_features(weights):
    bus, redis = InMemoryBus(), fakeredis.FakeRedis()
    settings = DetectorSettings(
        detector_weights=weights / "w.pt", image_root=weights / "synth/images/pool",
        device="cpu", detector_batch_size=2, detector_backend="detectron2",
    )  # fmt: skip
    detector = build_detector(settings, bus, redis)
    batch = detector_pb2.ImageBatch(
        event_id="images.cam.0", campaign="cam", batch_index=0, batch_count=1,
        class_names=list(CLASSES),
        images=[detector_pb2.ImageRef(image_id=f"i{k}", uri=f"{k:06d}.png") for k in (1, 2, 3)],
    )  # fmt: skip
    p = bus.producer()
    p.send(topics.IMAGES, b"cam", batch.SerializeToString())
    p.flush()
    run_until_idle([detector])
    events = [detector_pb2.MaskStreamEvent.FromString(r.value) for r in bus.read(topics.MASKS)]
    masks = [m for e in events if e.WhichOneof("body") == "masks" for m in e.masks.masks]
    assert masks, "an untrained model with the filters off still finds masks"
    for m in masks:
        assert m.rle.height == 64 and m.rle.width == 64 and 0 <= m.score <= 1
        f = np.frombuffer(m.feature_f16, dtype="<f2").astype(np.float32)
        assert f.shape == (8,) and abs(float(np.linalg.norm(f)) - 1.0) < 1e-2
    assert not bus.read(topics.DEADLETTER)


def test_backend_setting_refuses_weights_of_the_other_backend(weights):
    settings = DetectorSettings(detector_weights=weights / "w.pt", detector_backend="torchvision")
    with pytest.raises(MaskpropError, match="'detectron2' detector weights"):
        build_detector(settings, InMemoryBus(), None)
