"""Users' pretrained weights: randomly initialised checkpoints saved in the real formats
(torchvision's COCO Mask R-CNN v1/v2 and ImageNet ResNet-50 ``state_dict``, detectron2's
model-zoo ``{"model": {name: ndarray}}`` pickle) load into the matching architecture with the
class-specific layers re-initialised; other layouts and pickles that run code are refused."""

import os
import pickle

import pytest
import torch
from maskprop_detector.model import DetectorConfig, build_model
from maskprop_detector.pretrained import load_pretrained
from torchvision.models import resnet50
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from maskprop.errors import MaskpropError
from tests.unit.detector.conftest import scene_batch

CLASSES = ("disc", "square")


def cfg_of(arch, **kw):
    return DetectorConfig(classes=CLASSES, image_size=64, architecture=arch, **kw)


@pytest.fixture(scope="module")
def coco_v1(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "maskrcnn_resnet50_fpn_coco.pth"
    torch.manual_seed(1)
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), path)
    return path


def test_torchvision_coco_checkpoint_loads_with_new_class_layers(coco_v1):
    source = torch.load(coco_v1, weights_only=True)
    cfg = cfg_of("maskrcnn_resnet50_fpn")
    model = build_model(cfg)
    done = load_pretrained(model, cfg, coco_v1)
    assert done["kind"] == "detector"
    assert done["reinitialised"] == sorted(
        f"roi_heads.{k}" for k in (
            "box_predictor.bbox_pred.bias", "box_predictor.bbox_pred.weight",
            "box_predictor.cls_score.bias", "box_predictor.cls_score.weight",
            "mask_predictor.mask_fcn_logits.bias", "mask_predictor.mask_fcn_logits.weight",
        )
    )  # fmt: skip
    state = model.state_dict()
    for k, v in source.items():
        if k not in done["reinitialised"]:
            assert torch.equal(state[k], v), k
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == len(CLASSES) + 1
    assert "roi_heads.mask_iou_head.fc.3.weight" in state  # the IoU head is added
    model.train()
    images, targets = scene_batch(1)
    losses = model(images, targets)
    assert "loss_mask_iou" in losses
    sum(losses.values()).backward()


def test_v2_checkpoint_fits_v2_and_not_v1(tmp_path, coco_v1):
    path = tmp_path / "v2.pth"
    torch.save(maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), path)
    cfg = cfg_of("maskrcnn_resnet50_fpn_v2")
    assert load_pretrained(build_model(cfg), cfg, path)["loaded"] > 300
    v1 = cfg_of("maskrcnn_resnet50_fpn")
    with pytest.raises(MaskpropError, match="does not fit the torchvision architecture"):
        load_pretrained(build_model(v1), v1, path)
    small = cfg_of("")
    with pytest.raises(MaskpropError, match="does not fit"):
        load_pretrained(build_model(small), small, coco_v1)


def test_imagenet_backbone_checkpoint_loads_into_the_backbone(tmp_path):
    path = tmp_path / "resnet50_imagenet.pth"
    source = resnet50(weights=None).state_dict()
    torch.save(source, path)
    cfg = cfg_of("maskrcnn_resnet50_fpn")
    model = build_model(cfg)
    done = load_pretrained(model, cfg, path)
    assert done["kind"] == "imagenet-backbone" and not done["reinitialised"]
    body = model.backbone.body.state_dict()
    assert set(body) == {k for k in source if not k.startswith("fc.")}
    assert all(torch.equal(body[k], source[k]) for k in body)
    small = cfg_of("")
    with pytest.raises(MaskpropError, match="ImageNet ResNet-50"):
        load_pretrained(build_model(small), small, path)


def test_detectron2_model_zoo_pickle_loads(tmp_path):
    pytest.importorskip("detectron2", reason="bash scripts/bootstrap.sh detectron2")
    zoo = DetectorConfig(
        classes=("a", "b", "c"), image_size=64, backend="detectron2",
        architecture="pointrend_r50_fpn",
    )  # fmt: skip
    source = build_model(zoo).model.state_dict()  # GeneralizedRCNN's own names, as the zoo's
    arrays = {k: v.numpy() for k, v in source.items() if "mask_iou_head" not in k}
    arrays.pop("roi_heads.projection")
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}))
    cfg = DetectorConfig(
        classes=CLASSES, image_size=64, backend="detectron2", architecture="pointrend_r50_fpn",
    )  # fmt: skip
    model = build_model(cfg)
    done = load_pretrained(model, cfg, path)
    assert "model.roi_heads.box_predictor.cls_score.weight" in done["reinitialised"]
    state = model.state_dict()
    key = "model.backbone.bottom_up.res2.0.conv1.weight"
    assert torch.equal(state[key], source[key.removeprefix("model.")])
    gn = DetectorConfig(classes=CLASSES, image_size=64, backend="detectron2", fpn_channels=32)
    with pytest.raises(MaskpropError, match="does not fit the detectron2 architecture"):
        load_pretrained(build_model(gn), gn, path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_that_run_code_are_refused(tmp_path):
    cfg = cfg_of("")
    model = build_model(cfg)
    marker = tmp_path / "ran"
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"w": _Payload(marker)}}))
    with pytest.raises(MaskpropError, match=r"posix\.system is not allowed|os\.system"):
        load_pretrained(model, cfg, pkl)
    pt = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, pt)
    with pytest.raises(MaskpropError, match="refused as weights"):
        load_pretrained(model, cfg, pt)
    assert not marker.exists()
    with pytest.raises(MaskpropError, match="not found"):
        load_pretrained(model, cfg, tmp_path / "none.pth")


def test_unknown_architecture_is_refused():
    with pytest.raises(MaskpropError, match="unknown torchvision architecture"):
        cfg_of("pointrend_r50_fpn")
