"""Instance masks against ground truth: true IoU per predicted mask, mask AP (COCOeval) and
the cross-round de-duplication rule of the retraining loop (paper Sec. 5.1).

Masks are COCO RLE dicts (``{"size": [h, w], "counts": str}``); everything is numpy and
pycocotools, no torch.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskprop.data.coco import to_pycoco
from maskprop.data.masks import MaskTable
from maskprop.simulate.pool import MaskPool

__all__ = ["canonical_key", "deduplicate", "detections_pool", "mask_ap", "true_ious"]

Rle = Mapping[str, Any]


def true_ious(
    pred_image_ids: NDArray[np.int64],
    pred_class_ids: NDArray[np.integer],
    pred_rles: Sequence[Rle],
    gt: Sequence[Mapping[str, Any]],
) -> NDArray[np.float32]:
    """float32[n]: each predicted mask's IoU with the best-matching ground-truth mask of the
    same image and class (0 when the image holds no object of that class).

    ``gt`` items: ``{"image_id", "class_id", "segmentation"}`` (class ids in the same space as
    ``pred_class_ids``).  This is the IoU the paper's simulated annotator thresholds at K_iou.
    """
    by_key: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for g in gt:
        by_key.setdefault((int(g["image_id"]), int(g["class_id"])), []).append(
            to_pycoco(g["segmentation"])
        )
    out = np.zeros(len(pred_rles), dtype=np.float32)
    order: dict[tuple[int, int], list[int]] = {}
    for i, (img, cls) in enumerate(
        zip(pred_image_ids.tolist(), pred_class_ids.tolist(), strict=True)
    ):
        order.setdefault((int(img), int(cls)), []).append(i)
    for key, idx in order.items():
        targets = by_key.get(key)
        if not targets:
            continue
        preds = [to_pycoco(pred_rles[i]) for i in idx]
        iou = np.asarray(mask_utils.iou(preds, targets, [0] * len(targets)), dtype=np.float64)
        out[idx] = iou.reshape(len(preds), len(targets)).max(axis=1)
    return out


def detections_pool(
    dets: MaskTable, gt: Sequence[Mapping[str, Any]], class_names: Sequence[str]
) -> MaskPool:
    """The detector's masks as the pool the simulator, :func:`learn_selection` and a simulated
    crowd read: features, scores, classes, and each mask's true IoU against ``gt``
    (:func:`true_ious`)."""
    return MaskPool(
        features=dets.features.astype(np.float32),
        scores=dets.scores.astype(np.float32),
        ious=true_ious(dets.image_ids, dets.class_ids, dets.rles(), gt).astype(np.float32),
        class_ids=dets.class_ids.astype(np.int32),
        class_names=tuple(class_names),
    )


def canonical_key(ann: Mapping[str, Any], image_name: str) -> tuple[int, str, int, str]:
    """One order for a campaign's accepted masks, whatever file or shard they come from (the
    embedded run writes them in detection order, the sink's export in its shards' order):
    round (``maskprop_round``), image file name, category id, RLE.  The order decides which of
    two repeats :func:`deduplicate` keeps and a training set's indices, so the same masks give
    the same dataset and the same weights."""
    seg = ann["segmentation"]
    rle = str(seg.get("counts", "")) if isinstance(seg, dict) else json.dumps(seg)
    return (int(ann.get("maskprop_round", 0)), image_name, int(ann["category_id"]), rle)


def deduplicate(annotations: Sequence[Mapping[str, Any]], iou_threshold: float = 0.5) -> list[int]:
    """Indices of ``annotations`` to keep, in order: within an image and class, a mask whose
    IoU with an earlier kept one exceeds ``iou_threshold`` is dropped (the retraining rule:
    earlier rounds win).

    Items: ``{"image_id", "category_id", "segmentation"}``.
    """
    kept: list[int] = []
    seen: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for i, ann in enumerate(annotations):
        key = (int(ann["image_id"]), int(ann["category_id"]))
        rle = to_pycoco(ann["segmentation"])
        earlier = seen.setdefault(key, [])
        if earlier:
            iou = np.asarray(mask_utils.iou([rle], earlier, [0] * len(earlier))).ravel()
            if iou.size and float(iou.max()) > iou_threshold:
                continue
        earlier.append(rle)
        kept.append(i)
    return kept


def mask_ap(gt_doc: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """COCO mask AP of ``results`` (``{"image_id", "category_id", "segmentation", "score"}``)
    against the COCO instances document ``gt_doc``; ``{"ap", "ap50", "ap75"}`` in [0, 1]
    (0 when there are no results)."""
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {k: list(gt_doc[k]) for k in ("images", "annotations", "categories")}
        coco.createIndex()
        dets = coco.loadRes([dict(r) for r in results])
        ev = COCOeval(coco, dets, "segm")
        ev.params.imgIds = sorted(int(img["id"]) for img in gt_doc["images"])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (max(0.0, float(v)) for v in ev.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75}
