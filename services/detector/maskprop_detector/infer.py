"""Batched inference: images in, a :class:`~maskprop.data.masks.MaskTable` with s and f out.

Kept per mask: s = class confidence x predicted IoU above ``score_threshold`` (paper: 0.2)
and a box covering at least ``min_box_area`` of the image (the paper's box-area filter).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from maskprop.data import coco
from maskprop.data.masks import MaskTable, pack_counts
from maskprop.progress import Progress, no_progress
from maskprop_detector.data import to_tensor
from maskprop_detector.model import DetectorConfig


@torch.inference_mode()
def detect(
    model: nn.Module,
    cfg: DetectorConfig,
    images: Iterable[tuple[int | str, NDArray[np.uint8]]],
    *,
    total: int | None = None,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: Progress = no_progress,
) -> MaskTable:
    """Run ``model`` over ``(image_id, uint8[h, w, 3])`` pairs in batches.

    Returns the kept masks as a :class:`~maskprop.data.masks.MaskTable`: ``image_ids`` as
    given (int64 for int ids, str otherwise), ``mask_ids`` ``"<image_id>.<k>"`` (k-th kept mask
    of the image), the model's boxes and predicted IoUs, one image row per input image (its
    size; no file name).
    """
    device = device or torch.device("cpu")
    model.to(device).eval()
    parts: list[MaskTable] = []
    batch: list[tuple[int | str, NDArray[np.uint8]]] = []
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
    return MaskTable.concat(parts) if parts else MaskTable.empty(cfg.feature_dim)


def _filter(
    cfg: DetectorConfig, image_id: int | str, h: int, w: int, out: dict[str, Any]
) -> MaskTable:
    scores = out["scores"].float().cpu().numpy()
    boxes = out["boxes"].float().cpu().numpy()
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    masks = (out["masks"][:, 0] > 0.5).cpu().numpy()
    keep = (scores > cfg.score_threshold) & (area >= cfg.min_box_area * h * w)
    if len(masks):
        keep &= masks.reshape(len(masks), -1).any(axis=1)  # empty masks carry no label
    idx = np.flatnonzero(keep)
    blob, offsets = pack_counts(coco.encode_masks(masks[idx]))
    return MaskTable(
        mask_ids=np.array([f"{image_id}.{k}" for k in range(idx.size)], dtype=np.str_),
        image_ids=np.full(idx.size, image_id),
        class_ids=(out["labels"].cpu().numpy()[idx] - 1).astype(np.int32),
        scores=scores[idx].astype(np.float32),
        features=out["features"].float().cpu().numpy()[idx].astype(np.float32),
        boxes=boxes[idx].astype(np.float32),
        mask_ious=out["mask_iou"].float().cpu().numpy()[idx].astype(np.float32),
        rle_h=np.full(idx.size, h, np.uint32),
        rle_w=np.full(idx.size, w, np.uint32),
        rle_blob=blob,
        rle_offsets=offsets,
        img_ids=np.array([image_id]),
        img_w=np.array([w], np.uint32),
        img_h=np.array([h], np.uint32),
        img_files=np.array([""]),
    )
