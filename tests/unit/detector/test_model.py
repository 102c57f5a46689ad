"""The detector model on CPU: a small randomly initialised model trains and predicts; the
mask-IoU head's target is right on hand-made masks; GPU paths run only with a GPU."""

import pytest
import torch
from maskprop_detector.model import (
    DetectorConfig,
    _inside_fraction,
    build_model,
    mask_iou_targets,
)

from maskprop.errors import MaskpropError
from tests.unit.detector.conftest import scene_batch


def test_forward_backward_on_cpu(tiny_cfg):
    model = build_model(tiny_cfg)
    model.train()
    images, targets = scene_batch(2)
    losses = model(images, targets)
    assert set(losses) == {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_mask_iou",
        "loss_objectness", "loss_rpn_box_reg",
    }  # fmt: skip
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    heads = model.roi_heads
    for module in (heads.mask_iou_head, heads.mask_head, heads.box_predictor, model.backbone):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)


def test_inference_outputs_score_iou_and_unit_features():
    cfg = DetectorConfig(classes=("disc", "square"), image_size=64, fpn_channels=16, feature_dim=8)
    model = build_model(cfg).eval()
    images, _ = scene_batch(2)
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for r in out:
        n = r["boxes"].shape[0]
        assert r["masks"].shape == (n, 1, 64, 64)
        assert r["features"].shape == (n, 8)
        assert torch.allclose(r["scores"], r["class_scores"] * r["mask_iou"])
        assert ((r["mask_iou"] >= 0) & (r["mask_iou"] <= 1)).all()
        if n:
            assert torch.allclose(r["features"].norm(dim=1), torch.ones(n), atol=1e-4)


def test_plain_baseline_has_no_scoring_head(tiny_cfg):
    plain = build_model(tiny_cfg, scoring=False)
    assert not hasattr(plain.roi_heads, "mask_iou_head")
    ours = build_model(tiny_cfg)
    # same backbone: identical parameter shapes outside the added head
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items() if k in shapes} == shapes


def test_projection_is_fixed_by_the_seed(tiny_cfg):
    a, b = build_model(tiny_cfg), build_model(tiny_cfg)
    assert torch.equal(a.roi_heads.projection, b.roi_heads.projection)


def _square(m, y0, y1, x0, x1):
    out = torch.zeros(m, m)
    out[y0:y1, x0:x1] = 1.0
    return out


def test_mask_iou_target_on_hand_made_masks():
    pred = torch.stack([_square(28, 0, 10, 0, 10), _square(28, 0, 10, 0, 10), torch.zeros(28, 28)])
    gt = torch.stack(
        [_square(28, 0, 10, 0, 10), _square(28, 0, 10, 5, 15), _square(28, 0, 4, 0, 4)]
    )
    inside = torch.tensor([1.0, 1.0, 1.0])
    iou = mask_iou_targets(pred * 0.9, gt, inside)  # probabilities above 0.5 count as mask
    # identical: 1; shifted by half: 50 / (100 + 100 - 50); empty prediction: 0
    assert torch.allclose(iou, torch.tensor([1.0, 50 / 150, 0.0]))
    # half of the object lies outside the ROI: its hidden 100 pixels join the union
    half = mask_iou_targets(pred[:1], gt[:1], torch.tensor([0.5]))
    assert torch.allclose(half, torch.tensor([100 / 200]))


def test_probabilities_at_or_below_half_are_background():
    pred = _square(28, 0, 10, 0, 10) * 0.5
    iou = mask_iou_targets(pred[None], _square(28, 0, 10, 0, 10)[None], torch.ones(1))
    assert float(iou) == 0.0


def test_inside_fraction():
    masks = torch.zeros(2, 20, 20, dtype=torch.uint8)
    masks[0, 0:10, 0:10] = 1
    masks[1, 0:10, 0:10] = 1
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 10.0]])
    assert torch.allclose(_inside_fraction(masks, boxes), torch.tensor([1.0, 0.5]))


def test_config_validation_and_backends():
    with pytest.raises(MaskpropError, match="unknown detector backend"):
        DetectorConfig(classes=("a",), backend="mmdet")
    with pytest.raises(MaskpropError, match="distinct"):
        DetectorConfig(classes=("a", "a"))
    with pytest.raises(MaskpropError, match="fpn_channels must be a multiple of 32"):
        build_model(DetectorConfig(classes=("a",), backend="detectron2", fpn_channels=16))
    with pytest.raises(MaskpropError, match="unknown detector config keys"):
        DetectorConfig.from_dict({"classes": ["a"], "colour": "red"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_forward_backward_on_gpu_with_mixed_precision(tiny_cfg):
    model = build_model(tiny_cfg).cuda().train()
    images, targets = scene_batch(2)
    images = [i.cuda() for i in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    with torch.autocast("cuda"):
        losses = model(images, targets)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda"):
        out = model(images)
    assert out[0]["features"].device.type == "cuda"


def test_box_only_labels_teach_boxes_and_classes_but_no_mask(tiny_cfg):
    model = build_model(tiny_cfg).train()
    images, targets = scene_batch(2)
    for t in targets:
        t["mask_valid"] = torch.zeros(len(t["labels"]), dtype=torch.bool)
    losses = model(images, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_mask_iou"].item() == 0.0
    assert losses["loss_classifier"].item() > 0.0
    sum(losses.values()).backward()  # still a valid graph


def test_ignore_boxes_are_neither_positive_nor_negative(tiny_cfg):
    from maskprop_detector.model import MaskScoringRoIHeads

    heads = build_model(tiny_cfg).roi_heads
    assert isinstance(heads, MaskScoringRoIHeads)
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0]])]
    _, labels = heads.assign_targets_to_proposals(proposals, [box], [torch.tensor([-1])])
    assert labels[0].tolist() == [-1, 0]  # on the ignore box: skipped by the sampler; else bg


def test_a_partially_labelled_image_teaches_no_background(tiny_cfg):
    """Propagated labels cover some objects of a pool image: neither the RPN's anchors nor the
    ROI heads' proposals there become negatives, while a fully labelled image's still do."""
    model = build_model(tiny_cfg).train()
    images, targets = scene_batch(2)
    targets[0]["partial"] = torch.ones((), dtype=torch.bool)
    anchors = [
        torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 9.0, 9.0], [40.0, 40.0, 60.0, 60.0]])
    ] * 2
    far = {
        "boxes": torch.tensor([[40.0, 40.0, 60.0, 60.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.zeros((1, 64, 64), dtype=torch.uint8),
    }
    labels, _ = model.rpn.assign_targets_to_anchors(
        anchors, [{**far, "partial": targets[0]["partial"]}, far]
    )
    assert labels[0].tolist() == [-1.0, -1.0, 1.0] and labels[1].tolist() == [0.0, 0.0, 1.0]
    proposals = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [40.0, 40.0, 60.0, 60.0]])] * 2
    heads = model.roi_heads
    _, _, sampled, _ = heads.select_training_samples([p.clone() for p in proposals], [
        {**far, "partial": targets[0]["partial"]}, far
    ])  # fmt: skip
    assert 0 not in sampled[0].tolist() and 1 in sampled[0].tolist()
    assert 0 in sampled[1].tolist()
    losses = model(images, targets)
    sum(losses.values()).backward()
