"""The detectron2 backend (PointRend R50-FPN + mask-IoU head + mask-attention feature) on CPU:
a small random-weight model trains through ``train.train``, predicts with the torchvision
backend's keys and shapes, round-trips through a checkpoint and runs under ``infer.detect``.
Skipped only where detectron2 is not installed (CI installs it: scripts/test.sh bootstraps the
``detectron2`` extra); the missing-install error is tested everywhere."""

import sys

import pytest
import torch
from maskprop_detector.data import InstanceDataset, LabelledSet, read_image
from maskprop_detector.infer import detect
from maskprop_detector.model import DetectorConfig, build_model
from maskprop_detector.train import TrainConfig, load_model, save_checkpoint, train

from maskprop.data.synth import synth_scenes
from maskprop.errors import MaskpropError
from tests.unit.detector.conftest import scene_batch


def d2_cfg(**kw):
    args = {
        "classes": ("disc", "square"), "image_size": 64, "fpn_channels": 32, "feature_dim": 8,
        "backend": "detectron2", "max_detections": 8,
    }  # fmt: skip
    return DetectorConfig(**{**args, **kw})


def test_missing_detectron2_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # import detectron2 -> ImportError
    with pytest.raises(MaskpropError, match=r"bash scripts/bootstrap\.sh detectron2"):
        build_model(d2_cfg())


@pytest.fixture(scope="module")
def d2():
    return pytest.importorskip("detectron2", reason="bash scripts/bootstrap.sh detectron2")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth_scenes(6, out, size=64, classes=("disc", "square"), max_objects=3, split={"train": 1.0})
    return out


def test_forward_backward_reaches_every_head(d2):
    model = build_model(d2_cfg()).train()
    images, targets = scene_batch(2)
    losses = model(images, targets)
    assert set(losses) == {
        "loss_cls", "loss_box_reg", "loss_mask", "loss_mask_point", "loss_mask_iou",
        "loss_rpn_cls", "loss_rpn_loc",
    }  # fmt: skip
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_mask"]) > 0 and float(losses["loss_mask_iou"]) > 0
    sum(losses.values()).backward()
    heads = model.roi_heads
    for module in (
        heads.mask_iou_head, heads.mask_head.coarse_head, heads.mask_head.point_head,
        heads.box_predictor, model.model.backbone,
    ):  # fmt: skip
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)


def test_box_only_and_ignore_labels_teach_no_mask(d2):
    model = build_model(d2_cfg()).train()
    images, targets = scene_batch(2)
    for t in targets:
        t["mask_valid"] = torch.zeros(len(t["labels"]), dtype=torch.bool)
    targets[0]["labels"][0] = -1  # an ignore region
    losses = model(images, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_mask_iou"].item() == 0.0
    assert losses["loss_cls"].item() > 0.0
    sum(losses.values()).backward()  # still a valid graph


def test_inference_has_the_torchvision_backends_keys_and_shapes(d2):
    images, _ = scene_batch(2)
    torch_cfg = DetectorConfig(classes=("disc", "square"), image_size=64, fpn_channels=16,
                               feature_dim=8)  # fmt: skip
    with torch.no_grad():
        ours = build_model(d2_cfg()).eval()(images)
        theirs = build_model(torch_cfg).eval()(images)
    assert len(ours) == 2
    for r, ref in zip(ours, theirs, strict=True):
        assert set(r) == set(ref)
        n = r["boxes"].shape[0]
        assert n > 0  # random weights still give detections above the 0.05 box threshold
        for key, value in r.items():
            assert value.shape[1:] == ref[key].shape[1:] and value.shape[0] == n, key
            assert value.dtype == ref[key].dtype, key
        assert set(r["masks"].unique().tolist()) <= {0.0, 1.0}
        assert torch.allclose(r["scores"], r["class_scores"] * r["mask_iou"])
        assert ((r["mask_iou"] >= 0) & (r["mask_iou"] <= 1)).all()
        assert ((r["labels"] >= 1) & (r["labels"] <= 2)).all()
        assert torch.allclose(r["features"].norm(dim=1), torch.ones(n), atol=1e-4)


def test_trains_through_the_training_loop_and_round_trips_a_checkpoint(d2, synth, tmp_path):
    cfg = d2_cfg()
    data = LabelledSet.from_coco(synth / "annotations/train.json", synth / "images/train")
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train(
        model, cfg, InstanceDataset(data, cfg.classes, flip=True),
        TrainConfig(steps=2, batch_size=2, warmup=1), checkpoint=tmp_path / "w.pt",
    )  # fmt: skip
    assert "loss_mask_iou" in losses and all(v == v for v in losses.values())
    after = model.state_dict()
    assert not torch.equal(before["model.roi_heads.mask_iou_head.fc.3.weight"],
                           after["model.roi_heads.mask_iou_head.fc.3.weight"])  # fmt: skip
    loaded, loaded_cfg = load_model(tmp_path / "w.pt", backend="detectron2")
    assert loaded_cfg == cfg
    for k, v in after.items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(MaskpropError, match="'detectron2' detector weights"):
        load_model(tmp_path / "w.pt", backend="torchvision")
    pixels = [(int(im["id"]), read_image(data.image_root, im["file_name"])) for im in data.images]
    table = detect(loaded, loaded_cfg, pixels[:2], batch_size=2)
    assert table.features.shape[1] == cfg.feature_dim
    assert set(table.image_ids.tolist()) <= {pixels[0][0], pixels[1][0]}


def test_projection_is_fixed_by_the_seed_and_saved(d2, tmp_path):
    a, b = build_model(d2_cfg()), build_model(d2_cfg())
    assert torch.equal(a.roi_heads.projection, b.roi_heads.projection)
    c = build_model(d2_cfg(projection_seed=1))
    assert not torch.equal(a.roi_heads.projection, c.roi_heads.projection)
    save_checkpoint(tmp_path / "w.pt", a, d2_cfg())
    assert "model.roi_heads.projection" in torch.load(tmp_path / "w.pt", weights_only=True)["model"]


def test_group_norm_needs_channels_in_32s(d2):
    with pytest.raises(MaskpropError, match="multiple of 32"):
        build_model(d2_cfg(fpn_channels=48))
