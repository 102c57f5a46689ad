"""The detectron2 backend: PointRend R50-FPN (the paper's detector) with the mask-IoU head and
the mask-attention feature.

The config is built in code (PointRend's yaml files are not in the installed sdist): detectron2's
Base-RCNN-FPN with ``add_pointrend_config``, ``PointRendROIHeads``/``PointRendMaskHead``
(coarse 7 x 7 head on p2 + point head, adaptive subdivision at inference), bitmask targets.
Since the weights start from random (or a user's checkpoint), norms are GroupNorm (frozen
BatchNorm diverges from scratch), anchors and RPN sizes follow the torchvision backend (objects
of 15-60 px on ``image_size`` images), and the FPN is ``fpn_channels`` wide.

The paper's additions, shared with the torchvision backend (:mod:`maskprop_detector.model`):

* :class:`~maskprop_detector.model.MaskIoUHead` on the 14 x 14 p2 ROI features and the mask
  probabilities on a 28 x 28 ROI grid, trained with the L2 loss against
  :func:`~maskprop_detector.model.mask_iou_targets` (``loss_mask_iou``); at inference
  s = class score x predicted IoU;
* f = :func:`~maskprop_detector.model.attention_features` of the same ROI features and mask
  probabilities, projected with the seeded :func:`~maskprop_detector.model.random_projection`.

:class:`PointRendDetector` wraps detectron2's ``GeneralizedRCNN`` behind the torchvision
interface, so ``train.train``, ``infer.detect``, the checkpoints and the service work with
either backend: images float[3, h, w] in [0, 1] (RGB), targets ``boxes``/``labels`` (1-based,
-1 = ignore region)/``masks``/optional ``mask_valid``; training returns a dict of losses,
inference per image ``boxes``, ``labels`` (1-based), ``class_scores``, ``mask_iou``,
``scores`` (= s), ``masks`` float[n, 1, h, w] in {0, 1}, ``features`` float[n, d].

Importing this module needs detectron2; :func:`build_pointrend` turns its absence into one
:class:`~maskprop.errors.MaskpropError` naming the install command.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskprop.errors import MaskpropError
from maskprop_detector.model import (
    MASK_RESOLUTION,
    ROI_RESOLUTION,
    DetectorConfig,
    MaskIoUHead,
    _inside_fraction,
    attention_features,
    mask_iou_targets,
    random_projection,
)

INSTALL_HINT = "install it with: bash scripts/bootstrap.sh detectron2"
# ImageNet statistics in 0-255 RGB (inputs are RGB in [0, 1], scaled by 255 here).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# detectron2's model zoo (MSRA ResNets): BGR, mean only.
ZOO_PIXEL_MEAN = (103.53, 116.28, 123.675)


def fpn_channels(cfg: DetectorConfig) -> int:
    """FPN width: ``cfg.fpn_channels``, or 256 for the model-zoo layout."""
    return 256 if cfg.arch == "pointrend_r50_fpn" else cfg.fpn_channels


def build_pointrend(cfg: DetectorConfig, *, scoring: bool = True) -> nn.Module:
    """A randomly initialised :class:`PointRendDetector` (``scoring=False``: plain PointRend,
    the benchmark's baseline).  Raises MaskpropError when detectron2 is not installed."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise MaskpropError(
            f'the detector backend "detectron2" needs detectron2, which is not installed; '
            f"{INSTALL_HINT}"
        ) from None
    if cfg.arch == "pointrend_r50_fpn_gn" and cfg.fpn_channels % 32:
        raise MaskpropError(
            "the detectron2 backend uses GroupNorm(32): fpn_channels must be a multiple of 32, "
            f"got {cfg.fpn_channels}"
        )
    return PointRendDetector(cfg, scoring=scoring)


def pointrend_config(cfg: DetectorConfig, *, scoring: bool = True) -> Any:
    """detectron2 CfgNode of PointRend R50-FPN for ``cfg`` (built in code, CPU device)."""
    from detectron2.config import get_cfg
    from detectron2.projects.point_rend import add_pointrend_config

    _register_heads()
    c = get_cfg()
    add_pointrend_config(c)
    k = len(cfg.classes)
    m = c.MODEL
    m.DEVICE = "cpu"
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.MASK_ON = True
    m.PIXEL_MEAN = list(PIXEL_MEAN)
    m.PIXEL_STD = list(PIXEL_STD)
    c.INPUT.FORMAT = "RGB"
    c.INPUT.MASK_FORMAT = "bitmask"
    # Base-RCNN-FPN, R50
    m.BACKBONE.NAME = "build_resnet_fpn_backbone"
    m.BACKBONE.FREEZE_AT = 0  # from scratch: every stage trains
    m.RESNETS.DEPTH = 50
    m.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    m.RESNETS.NORM = "GN"
    m.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    m.FPN.OUT_CHANNELS = fpn_channels(cfg)
    m.FPN.NORM = "GN"
    m.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    m.RPN.PRE_NMS_TOPK_TRAIN = 600
    m.RPN.PRE_NMS_TOPK_TEST = 300
    m.RPN.POST_NMS_TOPK_TRAIN = 300
    m.RPN.POST_NMS_TOPK_TEST = 150
    m.ROI_HEADS.NAME = "MaskScoringPointRendROIHeads" if scoring else "PointRendROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    m.ROI_HEADS.NUM_CLASSES = k
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
    m.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    m.ROI_HEADS.NMS_THRESH_TEST = 0.5
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_FC = 2
    m.ROI_BOX_HEAD.FC_DIM = 256
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    # PointRend mask head: coarse head on p2 ROI features + point head on p2 points
    m.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
    m.ROI_MASK_HEAD.POOLER_TYPE = ""
    m.ROI_MASK_HEAD.POOLER_RESOLUTION = ROI_RESOLUTION
    m.ROI_MASK_HEAD.CONV_DIM = fpn_channels(cfg)
    m.ROI_MASK_HEAD.POINT_HEAD_ON = True
    m.POINT_HEAD.NUM_CLASSES = k
    # Subdivide from 28 x 28 until the ROI grid is about half the image (objects here are at
    # most that): 56 at 64 px, 112 at 128 px, PointRend's 224 from 448 px.  detectron2 starts
    # at 7 x 7 and skips two steps to reach 28 (its point budget covers a 28 x 28 grid).
    refine = min(3, max(1, math.ceil(math.log2(cfg.image_size / (2 * MASK_RESOLUTION)))))
    m.POINT_HEAD.SUBDIVISION_STEPS = 2 + refine
    c.TEST.DETECTIONS_PER_IMAGE = cfg.max_detections
    if cfg.arch == "pointrend_r50_fpn":
        # The model zoo's PointRend R50-FPN (COCO): frozen BatchNorm, FPN without norm, BGR
        # 0-255 input with the MSRA mean, zoo anchors and heads, so its .pkl loads as is.
        c.INPUT.FORMAT = "BGR"
        m.PIXEL_MEAN = list(ZOO_PIXEL_MEAN)
        m.PIXEL_STD = [1.0, 1.0, 1.0]
        m.BACKBONE.FREEZE_AT = 2
        m.RESNETS.NORM = "FrozenBN"
        m.FPN.NORM = ""
        m.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
        m.RPN.PRE_NMS_TOPK_TEST = 1000
        m.RPN.POST_NMS_TOPK_TEST = 1000
        m.ROI_BOX_HEAD.FC_DIM = 1024
        m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    return c


class PointRendDetector(nn.Module):
    """detectron2 PointRend behind the torchvision detection interface (module doc)."""

    def __init__(self, cfg: DetectorConfig, *, scoring: bool = True) -> None:
        super().__init__()
        from detectron2.modeling import build_model as d2_build_model

        self.cfg = cfg
        self.scoring = scoring
        torch.manual_seed(cfg.projection_seed)
        self.model = d2_build_model(pointrend_config(cfg, scoring=scoring))
        if scoring:
            heads = self.model.roi_heads
            c = fpn_channels(cfg)
            heads.mask_iou_head = MaskIoUHead(c, len(cfg.classes))
            heads.register_buffer("projection", random_projection(c, cfg))
        self.bgr = cfg.arch == "pointrend_r50_fpn"

    @property
    def roi_heads(self) -> nn.Module:
        heads: nn.Module = self.model.roi_heads
        return heads

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training (``self.training``): losses; else one detection dict per image."""
        from detectron2.utils.events import EventStorage

        if self.training and targets is None:
            raise ValueError("training needs targets")
        inputs = [
            self._input(im, None if targets is None else targets[i]) for i, im in enumerate(images)
        ]
        if self.training:
            with EventStorage(0):  # detectron2's heads log training statistics to one
                losses: dict[str, Tensor] = self.model(inputs)
            return losses
        return [self._output(out["instances"]) for out in self.model(inputs)]

    def _input(self, image: Tensor, target: dict[str, Tensor] | None) -> dict[str, Any]:
        """One detectron2 input dict: the image resized so that its longer side is
        ``image_size`` (as the torchvision backend), 0-255; targets resized with it."""
        from detectron2.structures import BitMasks, Boxes, Instances

        h, w = image.shape[-2:]
        scale = self.cfg.image_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        pixels = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)
        pixels = pixels[0].flip(0) if self.bgr else pixels[0]
        out: dict[str, Any] = {"image": pixels * 255.0, "height": h, "width": w}
        if target is not None:
            inst = Instances((nh, nw))
            boxes = target["boxes"].float() * torch.tensor(
                [nw / w, nh / h, nw / w, nh / h], device=image.device
            )
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.where(target["labels"] > 0, target["labels"] - 1, -1)
            masks = target["masks"]
            if masks.shape[0]:
                masks = F.interpolate(masks[:, None].float(), size=(nh, nw), mode="nearest")[:, 0]
            else:
                masks = masks.new_zeros((0, nh, nw))
            inst.gt_masks = BitMasks(masks > 0.5)
            valid = target.get("mask_valid")
            if valid is None:
                valid = torch.ones(len(boxes), dtype=torch.bool, device=image.device)
            inst.gt_mask_valid = valid & (target["labels"] > 0)
            out["instances"] = inst
        return out

    def _output(self, inst: Any) -> dict[str, Tensor]:
        n = len(inst)
        masks = (
            inst.pred_masks.float()[:, None]
            if n
            else inst.pred_boxes.tensor.new_zeros((0, 1, *inst.image_size))
        )
        class_scores = inst.get("class_scores") if inst.has("class_scores") else inst.scores
        out = {
            "boxes": inst.pred_boxes.tensor,
            "labels": inst.pred_classes + 1,
            "class_scores": class_scores,
            "scores": inst.scores,
            "masks": masks,
        }
        if self.scoring:
            out["mask_iou"] = inst.mask_iou
            out["features"] = inst.features
        return out


_registered = False


def _register_heads() -> None:
    """Register :class:`MaskScoringPointRendROIHeads` with detectron2 (once per process)."""
    global _registered
    if _registered:
        return
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
    from detectron2.projects.point_rend.roi_heads import PointRendROIHeads

    class MaskScoringPointRendROIHeads(PointRendROIHeads):
        """PointRend's ROI heads plus the mask-IoU head and the mask-attention feature.

        ``mask_iou_head`` and the ``projection`` buffer are attached by
        :class:`PointRendDetector`.  Training adds ``loss_mask_iou``; inference sets per
        instance ``class_scores``, ``mask_iou``, ``features`` and ``scores`` = s.
        """

        def _forward_mask(self, features: dict[str, Tensor], instances: list[Any]) -> Any:
            feats = {f: features[f] for f in self.mask_in_features}
            head = self.mask_head
            if not self.training:
                instances = head(feats, instances)
                boxes = [x.pred_boxes for x in instances]
                if sum(len(b) for b in boxes) == 0:
                    for x in instances:
                        x.class_scores = x.scores
                        x.mask_iou = x.scores
                        x.features = x.scores.new_zeros((0, self.projection.shape[1]))
                    return instances
                roi = head._roi_pooler(feats, boxes)
                probs = torch.cat([x.pred_masks for x in instances])[:, 0]
                probs = F.adaptive_avg_pool2d(probs[:, None].float(), MASK_RESOLUTION)[:, 0]
                classes = torch.cat([x.pred_classes for x in instances])
                index = torch.arange(len(classes), device=classes.device)
                ious = self.mask_iou_head(roi, probs)[index, classes]
                f = attention_features(roi, probs, self.projection)
                start = 0
                for x in instances:
                    end = start + len(x)
                    x.class_scores = x.scores
                    x.mask_iou = ious[start:end]
                    x.features = f[start:end]
                    x.scores = x.scores * x.mask_iou
                    start = end
                return instances
            instances, _ = select_foreground_proposals(instances, self.num_classes)
            instances = [x[x.gt_mask_valid] for x in instances]  # box-only labels teach no mask
            if sum(len(x) for x in instances) == 0:
                params = [*head.parameters(), *self.mask_iou_head.parameters()]
                zero = sum(p.sum() * 0 for p in params)
                return {"loss_mask": zero, "loss_mask_point": zero, "loss_mask_iou": zero}
            losses: dict[str, Tensor] = head(feats, instances)
            boxes = [x.proposal_boxes for x in instances]
            roi = head._roi_pooler(feats, boxes)
            with torch.no_grad():  # the IoU head learns from the masks, not the other way
                probs = self._grid_mask_probs(feats, boxes, roi, instances)
            gt_roi = torch.cat(
                [x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, MASK_RESOLUTION)
                 for x in instances]
            ).float()  # fmt: skip
            inside = torch.cat(
                [_inside_fraction(x.gt_masks.tensor, x.proposal_boxes.tensor) for x in instances]
            )
            classes = torch.cat([x.gt_classes for x in instances])
            index = torch.arange(len(classes), device=classes.device)
            iou_target = mask_iou_targets(probs, gt_roi, inside)
            iou_pred = self.mask_iou_head(roi.detach(), probs)[index, classes]
            losses["loss_mask_iou"] = F.mse_loss(iou_pred, iou_target)
            return losses

        def _grid_mask_probs(
            self, feats: dict[str, Tensor], boxes: list[Any], roi: Tensor, instances: list[Any]
        ) -> Tensor:
            """float[n, 28, 28]: PointRend's mask of each ROI's class on a regular 28 x 28
            grid (coarse head + point head at the grid points, as inference starts)."""
            from detectron2.projects.point_rend.point_features import (
                generate_regular_grid_point_coords,
            )

            head = self.mask_head
            coarse = head.coarse_head(roi)
            coords = generate_regular_grid_point_coords(len(roi), MASK_RESOLUTION, roi.device)
            fine = head._point_pooler(feats, boxes, coords)
            logits = head._get_point_logits(fine, coords, coarse)  # [n, K, 28 * 28]
            classes = torch.cat([x.gt_classes for x in instances])
            index = torch.arange(len(classes), device=classes.device)
            return logits[index, classes].sigmoid().view(-1, MASK_RESOLUTION, MASK_RESOLUTION)

    ROI_HEADS_REGISTRY.register(MaskScoringPointRendROIHeads)
    _registered = True
