"""Cost and quality of obtained annotations (paper Sec. 5.1 protocol and Sec. 5.2, Fig. 8).

* quantity: annotations obtained;
* quality_mean_iou: mean IoU of the obtained annotations with ground truth;
* sq: segmentation quality as in panoptic quality, the mean IoU of the *matched* annotations,
  i.e. those with IoU > 0.5 with their ground-truth object (the paper's SQ >= 0.85 target);
* precision: share of obtained annotations with IoU >= K_iou;
* hours: human time, ``seconds_per_question`` per yes/no question plus ``seconds_per_polygon``
  per manual polygon (paper: 2 s and 80 s); cost_usd = hours x hourly wage;
* speedup_vs_manual: the human time manual polygons would need for the same number of
  annotations, divided by the time this method needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from maskprop.params import AnnotationParams
from maskprop.simulate.result import MethodResult

#: IoU above which an annotation matches its object (panoptic quality's matching rule).
MATCH_IOU = 0.5


def _mean(x: NDArray[np.floating]) -> float | None:
    return float(x.mean()) if x.size else None


def segmentation_quality(ious: NDArray[np.floating]) -> float | None:
    """SQ: mean IoU of annotations with IoU > 0.5 (None when nothing matched)."""
    return _mean(ious[ious > MATCH_IOU])


def summarize(result: MethodResult, params: AnnotationParams) -> dict[str, Any]:
    """The report entry of one method (every key of the ``report.json`` contract)."""
    ious = np.asarray(result.obtained_ious, dtype=np.float64)
    quantity = int(ious.size)
    seconds = result.human_seconds(params.seconds_per_question, params.seconds_per_polygon)
    hours = seconds / 3600.0
    manual_seconds = quantity * params.seconds_per_polygon
    return {
        "quantity": quantity,
        "quality_mean_iou": _mean(ious),
        "sq": segmentation_quality(ious),
        "precision": _mean((ious >= params.iou_threshold).astype(np.float64)),
        "questions": int(result.questions),
        "polygons": int(result.polygons),
        "clusters_annotated": int(result.clusters_annotated),
        "hours": hours,
        "cost_usd": hours * params.hourly_wage,
        "masks_per_hour": quantity / hours if hours > 0 else None,
        "masks_per_question": quantity / result.questions if result.questions else None,
        "speedup_vs_manual": manual_seconds / seconds if seconds > 0 else None,
    }


def pearson(x: NDArray[np.floating], y: NDArray[np.floating]) -> float:
    """Pearson correlation, nan for fewer than two points or a constant input."""
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])
