"""Batched inference: images in, masks with s and f out (COCO RLE, pycocotools).

Kept per mask: s = class confidence x predicted IoU above ``score_threshold`` (paper: 0.2)
and a box covering at least ``min_box_area`` of the image (the paper's box-area filter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from pycocotools import mask as mask_utils
from torch import nn

from maskprop_detector.data import to_tensor
from maskprop_detector.model import DetectorConfig

Progress = Callable[[str, int, int], None]


def _quiet(label: str, done: int, total: int) -> None:
    return None


@dataclass
class Detections:
    """Predicted masks of many images (one row per mask).

    image_ids int64[n]; class_ids int32[n] (0-based index into ``DetectorConfig.classes``);
    scores float32[n] (s); class_scores float32[n]; mask_ious float32[n] (predicted IoU);
    features float32[n, d] (f); boxes float32[n, 4] (x1, y1, x2, y2); rles: COCO RLE dicts
    with ASCII counts.
    """

    image_ids: NDArray[np.int64]
    class_ids: NDArray[np.int32]
    scores: NDArray[np.float32]
    class_scores: NDArray[np.float32]
    mask_ious: NDArray[np.float32]
    features: NDArray[np.float32]
    boxes: NDArray[np.float32]
    rles: list[dict[str, Any]]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def concat(cls, parts: Sequence[Detections], feature_dim: int) -> Detections:
        if not parts:
            return cls.empty(feature_dim)
        return cls(
            image_ids=np.concatenate([p.image_ids for p in parts]),
            class_ids=np.concatenate([p.class_ids for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            class_scores=np.concatenate([p.class_scores for p in parts]),
            mask_ious=np.concatenate([p.mask_ious for p in parts]),
            features=np.concatenate([p.features for p in parts]),
            boxes=np.concatenate([p.boxes for p in parts]),
            rles=[r for p in parts for r in p.rles],
        )

    @classmethod
    def empty(cls, feature_dim: int) -> Detections:
        return cls(
            image_ids=np.zeros(0, np.int64),
            class_ids=np.zeros(0, np.int32),
            scores=np.zeros(0, np.float32),
            class_scores=np.zeros(0, np.float32),
            mask_ious=np.zeros(0, np.float32),
            features=np.zeros((0, feature_dim), np.float32),
            boxes=np.zeros((0, 4), np.float32),
            rles=[],
        )

    def coco_results(self, category_ids: Sequence[int]) -> list[dict[str, Any]]:
        """COCO result entries (for COCOeval); ``category_ids[k]`` is class k's COCO id."""
        return [
            {
                "image_id": int(img),
                "category_id": int(category_ids[int(c)]),
                "segmentation": rle,
                "score": float(s),
            }
            for img, c, s, rle in zip(
                self.image_ids, self.class_ids, self.scores, self.rles, strict=True
            )
        ]


@torch.inference_mode()
def detect(
    model: nn.Module,
    cfg: DetectorConfig,
    images: Iterable[tuple[int, NDArray[np.uint8]]],
    *,
    total: int | None = None,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: Progress = _quiet,
) -> Detections:
    """Run ``model`` over ``(image_id, uint8[h, w, 3])`` pairs in batches."""
    device = device or torch.device("cpu")
    model.to(device).eval()
    parts: list[Detections] = []
    batch: list[tuple[int, NDArray[np.uint8]]] = []
    done = 0
    use_amp = device.type == "cuda"

    def flush() -> None:
        nonlocal done
        tensors = [to_tensor(px).to(device, non_blocking=True) for _, px in batch]
        with torch.autocast(device.type, enabled=use_amp):
            outputs = model(tensors)
        for (image_id, px), out in zip(batch, outputs, strict=True):
            parts.append(_filter(cfg, image_id, px.shape[0], px.shape[1], out))
        done += len(batch)
        progress("detect", done, total or done)
        batch.clear()

    for item in images:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return Detections.concat(parts, cfg.feature_dim)


def _filter(cfg: DetectorConfig, image_id: int, h: int, w: int, out: dict[str, Any]) -> Detections:
    scores = out["scores"].float().cpu().numpy()
    boxes = out["boxes"].float().cpu().numpy()
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    masks = (out["masks"][:, 0] > 0.5).cpu().numpy()
    keep = (scores > cfg.score_threshold) & (area >= cfg.min_box_area * h * w)
    if len(masks):
        keep &= masks.reshape(len(masks), -1).any(axis=1)  # empty masks carry no label
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return Detections.empty(cfg.feature_dim)
    encoded = mask_utils.encode(np.asfortranarray(masks[idx].transpose(1, 2, 0).astype(np.uint8)))
    rles = [
        {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
        for r in encoded
    ]
    return Detections(
        image_ids=np.full(idx.size, image_id, dtype=np.int64),
        class_ids=(out["labels"].cpu().numpy()[idx] - 1).astype(np.int32),
        scores=scores[idx].astype(np.float32),
        class_scores=out["class_scores"].float().cpu().numpy()[idx].astype(np.float32),
        mask_ious=out["mask_iou"].float().cpu().numpy()[idx].astype(np.float32),
        features=out["features"].float().cpu().numpy()[idx].astype(np.float32),
        boxes=boxes[idx].astype(np.float32),
        rles=rles,
    )
