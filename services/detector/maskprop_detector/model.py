"""The detector model: Mask R-CNN with a mask-IoU head and mask-attention features (paper
Sec. 4.1, 5.1; Mask Scoring R-CNN, Huang et al. 2019).

Per detected mask the model returns the two things the rest of maskprop needs:

* ``s`` = class confidence x predicted mask IoU (the mask score of the paper, Fig. 4);
* ``f`` = the mask-attention feature: the mask head's ROI features weighted by the predicted
  mask probabilities, averaged over the ROI, projected to ``feature_dim`` with a fixed random
  Gaussian matrix (seeded, stored with the weights) and L2-normalised.

The default backend is torchvision's Mask R-CNN (installs from PyPI) with a small ResNet-18 +
FPN backbone using GroupNorm, so it trains from scratch (no weights can be downloaded here,
and frozen BatchNorm diverges from scratch).  ``backend = "detectron2"`` (PointRend R50-FPN, the
paper's model, in :mod:`maskprop_detector.d2model`) needs detectron2 installed by
``bash scripts/bootstrap.sh detectron2``; it has the same inputs and outputs.

Everything heavy is built in :func:`build_model`; nothing happens at import time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_inference,
    project_masks_on_boxes,
)
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskprop.errors import MaskpropError

BACKENDS = ("torchvision", "detectron2")
# Architectures per backend; the first is the default ("" in the config).  The others match
# published layouts so that users' pretrained checkpoints load (maskprop_detector.pretrained):
# torchvision's COCO Mask R-CNN R50-FPN (v1, v2) and detectron2's model-zoo PointRend R50-FPN
# (FrozenBN, 256-channel FPN without norm, BGR input).
ARCHITECTURES = {
    "torchvision": ("r18_fpn_gn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"),
    "detectron2": ("pointrend_r50_fpn_gn", "pointrend_r50_fpn"),
}
# ROI grids: the mask head sees 14 x 14 features and predicts 28 x 28 masks (Mask R-CNN).
ROI_RESOLUTION = 14
MASK_RESOLUTION = 2 * ROI_RESOLUTION


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that shapes the model (saved beside the weights, checked on load).

    Attributes
    ----------
    classes : class names; label ``k`` (1-based, 0 is background) is ``classes[k - 1]``.
    image_size : images are resized so that their sides fit this many pixels.
    fpn_channels : width of the FPN and of every head (small: CPU-friendly).
    feature_dim : d, the dimension of the mask-attention feature f.
    projection_seed : seed of the fixed random projection to d.
    score_threshold : keep masks with s > this at inference (paper: 0.2).
    min_box_area : drop detections whose box covers less than this fraction of the image
        (the paper's box-area filter).
    max_detections : per image.
    backend : "torchvision" (default) or "detectron2" (PointRend R50-FPN, d2model.py).
    architecture : one of :data:`ARCHITECTURES` of the backend ("": its first, the small
        from-scratch model); a published layout ignores ``fpn_channels`` (it is 256).
    """

    classes: tuple[str, ...]
    image_size: int = 128
    fpn_channels: int = 64
    feature_dim: int = 32
    projection_seed: int = 0
    score_threshold: float = 0.2
    min_box_area: float = 0.002
    max_detections: int = 50
    backend: str = "torchvision"
    architecture: str = ""

    def __post_init__(self) -> None:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise MaskpropError("detector classes must be a non-empty list of distinct names")
        if self.backend not in BACKENDS:
            raise MaskpropError(
                f"unknown detector backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.architecture and self.architecture not in ARCHITECTURES[self.backend]:
            raise MaskpropError(
                f"unknown {self.backend} architecture {self.architecture!r}; choose one of "
                f"{', '.join(ARCHITECTURES[self.backend])}"
            )
        if not 32 <= self.image_size <= 2048:
            raise MaskpropError(f"image_size must be 32-2048, got {self.image_size}")
        if not 8 <= self.fpn_channels <= 512 or self.fpn_channels % 8:
            raise MaskpropError("fpn_channels must be a multiple of 8 in 8-512")
        if not 2 <= self.feature_dim <= 1024:
            raise MaskpropError(f"feature_dim must be 2-1024, got {self.feature_dim}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise MaskpropError("score_threshold must be in [0, 1)")
        if not 0.0 <= self.min_box_area < 1.0:
            raise MaskpropError("min_box_area must be a fraction of the image in [0, 1)")
        if not 1 <= self.max_detections <= 1000:
            raise MaskpropError("max_detections must be 1-1000")

    @property
    def arch(self) -> str:
        """The architecture, with the backend's default filled in."""
        return self.architecture or ARCHITECTURES[self.backend][0]

    @property
    def num_classes(self) -> int:
        """Including the background class 0."""
        return len(self.classes) + 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MaskpropError(f"unknown detector config keys: {', '.join(unknown)}")
        args = dict(d)
        if "classes" in args:
            args["classes"] = tuple(args["classes"])
        return cls(**args)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


def mask_iou_targets(mask_probs: Tensor, gt_roi_masks: Tensor, inside_fraction: Tensor) -> Tensor:
    """The mask-IoU head's regression target (Mask Scoring R-CNN, Sec. 3.2).

    Parameters
    ----------
    mask_probs : float[n, M, M], predicted mask probabilities in each ROI grid.
    gt_roi_masks : float[n, M, M], the matched ground-truth mask resampled to the same ROI.
    inside_fraction : float[n], share of the ground-truth mask's pixels that fall inside the
        ROI box.  The part of the object outside the box counts in the union (a box that cuts
        the object cannot have a perfect mask).

    Returns
    -------
    float[n] in [0, 1]: IoU of ``mask_probs > 0.5`` with the whole ground-truth mask.
    """
    pred = (mask_probs > 0.5).float()
    gt = (gt_roi_masks >= 0.5).float()
    inter = (pred * gt).sum(dim=(1, 2))
    gt_inside = gt.sum(dim=(1, 2))
    gt_full = gt_inside / inside_fraction.clamp_min(1e-6)
    union = pred.sum(dim=(1, 2)) + gt_full - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-6), torch.zeros_like(union))


def _inside_fraction(gt_masks: Tensor, boxes: Tensor) -> Tensor:
    """float[n]: share of each ``gt_masks[i]`` (bool/uint8 [n, H, W]) inside ``boxes[i]``."""
    n, h, w = gt_masks.shape
    if n == 0:
        return boxes.new_zeros(0)
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5
    in_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])
    in_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])
    inside = in_y[:, :, None] & in_x[:, None, :]
    m = gt_masks.to(torch.bool)
    total = m.sum(dim=(1, 2)).to(boxes.dtype)
    return (m & inside).sum(dim=(1, 2)).to(boxes.dtype) / total.clamp_min(1.0)


def attention_features(mask_features: Tensor, mask_probs: Tensor, projection: Tensor) -> Tensor:
    """The mask-attention feature f (shared by both backends).

    mask_features float[n, C, m, m] (ROI features), mask_probs float[n, 2m, 2m] (sigmoid mask
    probabilities on the same ROI), projection float[C, d] (fixed, seeded) -> float[n, d],
    L2-normalised: the ROI features averaged with the mask probabilities as weights, projected.
    """
    attention = F.avg_pool2d(mask_probs[:, None], kernel_size=2)
    weight = attention.sum(dim=(2, 3)).clamp_min(1e-6)
    pooled = (mask_features * attention).sum(dim=(2, 3)) / weight
    return F.normalize(pooled @ projection, dim=1)


def random_projection(channels: int, cfg: DetectorConfig) -> Tensor:
    """The fixed Gaussian projection float[channels, d] of f, from ``cfg.projection_seed``."""
    generator = torch.Generator().manual_seed(cfg.projection_seed)
    return torch.randn(channels, cfg.feature_dim, generator=generator) / cfg.feature_dim**0.5


class MaskIoUHead(nn.Module):
    """Predicts the IoU of each class's mask from the ROI features and the predicted mask
    (max-pooled to the feature grid), one output per class, in [0, 1]."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels + 1, in_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * (ROI_RESOLUTION // 2) ** 2, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, roi_features: Tensor, mask_probs: Tensor) -> Tensor:
        """roi_features float[n, C, m, m]; mask_probs float[n, 2m, 2m] -> float[n, classes]."""
        pooled = F.max_pool2d(mask_probs[:, None], kernel_size=2)
        x = self.convs(torch.cat([roi_features, pooled], dim=1))
        return torch.sigmoid(self.fc(x))


def _partial(targets: list[dict[str, Tensor]]) -> list[bool]:
    """Which images of a batch are partially labelled (``target["partial"]``): their unlabelled
    objects are unknown, so nothing there may be taught as background."""
    return [bool(t["partial"]) if "partial" in t else False for t in targets]


class PartialLabelRPN(RegionProposalNetwork):
    """torchvision's RPN, except that on a partially labelled image no anchor is a negative
    (label 0 -> -1, which its sampler skips): objects only, never background."""

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched = super().assign_targets_to_anchors(anchors, targets)
        for lab, partial in zip(labels, _partial(targets), strict=True):
            if partial:
                lab[lab == 0] = -1.0
        return labels, matched


class MaskScoringRoIHeads(RoIHeads):
    """torchvision's RoIHeads plus the mask-IoU head and the mask-attention feature.

    Training adds ``loss_mask_iou`` (L2 between predicted and true mask IoU of the positive
    ROIs).  Inference adds per detection ``class_scores`` (the box classifier's confidence),
    ``mask_iou`` (predicted), ``features`` (float[n, d], f) and sets ``scores`` to
    s = class confidence x predicted IoU.
    """

    def __init__(self, *, mask_iou_head: MaskIoUHead, projection: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mask_iou_head = mask_iou_head
        self.register_buffer("projection", projection)

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        self._partial_batch = _partial(targets or [])
        return super().select_training_samples(proposals, targets)

    def subsample(self, labels: list[Tensor]) -> list[Tensor]:
        # A partially labelled image's background proposals are neither positives nor
        # negatives (label -1 is skipped by the sampler), as its RPN anchors are.
        for lab, partial in zip(labels, getattr(self, "_partial_batch", []), strict=False):
            if partial:
                lab[lab == 0] = -1
        return super().subsample(labels)

    def attention_features(self, mask_features: Tensor, mask_probs: Tensor) -> Tensor:
        """f: float[n, d] from mask_features float[n, C, m, m] and mask_probs float[n, 2m, 2m]."""
        projection: Tensor = self.projection
        return attention_features(mask_features, mask_probs, projection)

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets
            )
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            assert targets is not None
            return [], self._training_losses(
                features, proposals, image_shapes, targets, matched_idxs, labels,
                class_logits, box_regression, regression_targets,
            )  # fmt: skip
        boxes, scores, det_labels = self.postprocess_detections(
            class_logits, box_regression, proposals, image_shapes
        )
        mask_features = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        mask_logits = self.mask_predictor(mask_features)
        flat_labels = torch.cat(det_labels)
        index = torch.arange(flat_labels.shape[0], device=flat_labels.device)
        probs = mask_logits[index, flat_labels].sigmoid()
        ious = self.mask_iou_head(mask_features, probs)[index, flat_labels]
        feats = self.attention_features(mask_features, probs)
        per_image = [len(b) for b in boxes]
        results = []
        for b, s, lab, m, iou, f in zip(
            boxes,
            scores,
            det_labels,
            maskrcnn_inference(mask_logits, det_labels),
            ious.split(per_image),
            feats.split(per_image),
            strict=True,
        ):
            results.append(
                {
                    "boxes": b,
                    "labels": lab,
                    "class_scores": s,
                    "mask_iou": iou,
                    "scores": s * iou,
                    "masks": m,
                    "features": f,
                }
            )
        return results, {}

    def _training_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        matched_idxs: list[Tensor],
        labels: list[Tensor],
        class_logits: Tensor,
        box_regression: Tensor,
        regression_targets: list[Tensor],
    ) -> dict[str, Tensor]:
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )
        pos_boxes, gt_roi, inside, pos_labels = [], [], [], []
        for props, idxs, labs, t in zip(proposals, matched_idxs, labels, targets, strict=True):
            pos = torch.where(labs > 0)[0]
            if "mask_valid" in t:  # box-and-class-only labels teach no mask
                pos = pos[t["mask_valid"][idxs[pos]]]
            boxes, matched = props[pos], idxs[pos]
            pos_boxes.append(boxes)
            pos_labels.append(labs[pos])
            gt_roi.append(project_masks_on_boxes(t["masks"], boxes, matched, MASK_RESOLUTION))
            inside.append(_inside_fraction(t["masks"][matched], boxes))
        mask_features = self.mask_head(self.mask_roi_pool(features, pos_boxes, image_shapes))
        mask_logits = self.mask_predictor(mask_features)
        flat_labels = torch.cat(pos_labels)
        if flat_labels.numel() == 0:
            zero = mask_logits.sum() * 0 + sum(p.sum() * 0 for p in self.mask_iou_head.parameters())
            return {
                "loss_classifier": loss_classifier,
                "loss_box_reg": loss_box_reg,
                "loss_mask": zero,
                "loss_mask_iou": zero,
            }
        index = torch.arange(flat_labels.shape[0], device=flat_labels.device)
        logits = mask_logits[index, flat_labels]
        targets_roi = torch.cat(gt_roi)
        loss_mask = F.binary_cross_entropy_with_logits(logits, targets_roi)
        probs = logits.detach().sigmoid()
        iou_target = mask_iou_targets(probs, targets_roi, torch.cat(inside))
        iou_pred = self.mask_iou_head(mask_features.detach(), probs)[index, flat_labels]
        return {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": loss_mask,
            "loss_mask_iou": F.mse_loss(iou_pred, iou_target),
        }


def _backbone(cfg: DetectorConfig) -> BackboneWithFPN:
    body = resnet.resnet18(weights=None, norm_layer=_group_norm)
    # Strides 8, 16, 32 (+ a max-pooled 64): objects here are 15-60 px on 128 px images.
    return_layers = OrderedDict([("layer2", "0"), ("layer3", "1"), ("layer4", "2")])
    return BackboneWithFPN(
        body,
        return_layers=dict(return_layers),
        in_channels_list=[128, 256, 512],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=_group_norm,
    )


def build_model(cfg: DetectorConfig, *, scoring: bool = True) -> nn.Module:
    """A randomly initialised model of ``cfg.backend``.  ``scoring=False`` gives the plain
    model (torchvision Mask R-CNN / PointRend) with the same backbone, heads and input size
    (the benchmark's baseline).  Either backend takes float[3, h, w] images in [0, 1] and
    torchvision-format targets, and returns torchvision-format losses or detections."""
    if cfg.backend == "detectron2":
        from maskprop_detector.d2model import build_pointrend

        return build_pointrend(cfg, scoring=scoring)
    return build_torchvision(cfg, scoring=scoring)


def build_torchvision(cfg: DetectorConfig, *, scoring: bool = True) -> MaskRCNN:
    """The torchvision backend: Mask R-CNN, ResNet-18 + FPN with GroupNorm (module doc), or
    torchvision's own R50-FPN layouts (``cfg.architecture``) with its default heads."""
    torch.manual_seed(cfg.projection_seed)
    if cfg.arch != "r18_fpn_gn":
        from torchvision.models.detection import mask_rcnn

        model = getattr(mask_rcnn, cfg.arch)(
            weights=None, weights_backbone=None, num_classes=cfg.num_classes,
            min_size=cfg.image_size, max_size=cfg.image_size,
            box_detections_per_img=cfg.max_detections,
        )  # fmt: skip
        return _with_scoring(model, cfg, 256, batch_size_per_image=512) if scoring else model
    c = cfg.fpn_channels
    featmaps = ["0", "1", "2"]
    anchors = AnchorGenerator(
        sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4
    )
    kwargs: dict[str, Any] = {
        "min_size": cfg.image_size,
        "max_size": cfg.image_size,
        "rpn_anchor_generator": anchors,
        "rpn_pre_nms_top_n_train": 600,
        "rpn_post_nms_top_n_train": 300,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 150,
        "box_roi_pool": MultiScaleRoIAlign(featmaps, 7, 2),
        "box_head": TwoMLPHead(c * 7 * 7, 256),
        "box_predictor": FastRCNNPredictor(256, cfg.num_classes),
        "box_batch_size_per_image": 128,
        "box_score_thresh": 0.05,
        "box_detections_per_img": cfg.max_detections,
        "mask_roi_pool": MultiScaleRoIAlign(featmaps, ROI_RESOLUTION, 2),
        "mask_head": MaskRCNNHeads(c, [c, c, c, c], 1, norm_layer=_group_norm),
        "mask_predictor": MaskRCNNPredictor(c, c, cfg.num_classes),
    }
    model = MaskRCNN(_backbone(cfg), num_classes=None, **kwargs)
    return _with_scoring(model, cfg, c, batch_size_per_image=128) if scoring else model


def _with_scoring(
    model: MaskRCNN, cfg: DetectorConfig, channels: int, *, batch_size_per_image: int
) -> MaskRCNN:
    """``model`` with its ROI heads' modules moved into :class:`MaskScoringRoIHeads` (the
    mask-IoU head and projection added on the mask head's ``channels``)."""
    heads = model.roi_heads
    scoring_heads = MaskScoringRoIHeads(
        mask_iou_head=MaskIoUHead(channels, cfg.num_classes),
        projection=random_projection(channels, cfg),
        box_roi_pool=heads.box_roi_pool,
        box_head=heads.box_head,
        box_predictor=heads.box_predictor,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=cfg.max_detections,
        mask_roi_pool=heads.mask_roi_pool,
        mask_head=heads.mask_head,
        mask_predictor=heads.mask_predictor,
    )
    model.roi_heads = scoring_heads
    model.rpn.__class__ = PartialLabelRPN  # the same module and weights, partial labels known
    return model
