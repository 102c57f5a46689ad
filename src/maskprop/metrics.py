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
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from maskprop.params import AnnotationParams

if TYPE_CHECKING:  # simulate.result converts its curves with SECONDS_PER_HOUR from here
    from maskprop.simulate.result import MethodResult

#: IoU above which an annotation matches its object (panoptic quality's matching rule).
MATCH_IOU = 0.5


#: Seconds in an hour: the one conversion of human seconds into the hours the paper reports.
SECONDS_PER_HOUR = 3600.0


def human_seconds(
    questions: float,
    seconds_per_question: float,
    polygons: float = 0,
    seconds_per_polygon: float = 0.0,
) -> float:
    """Human time in seconds: ``seconds_per_question`` per yes/no question plus
    ``seconds_per_polygon`` per manual polygon (paper: 2 s and 80 s)."""
    return questions * seconds_per_question + polygons * seconds_per_polygon


def human_hours(
    questions: float,
    seconds_per_question: float,
    polygons: float = 0,
    seconds_per_polygon: float = 0.0,
) -> float:
    """:func:`human_seconds` in hours: the hours every report, route and runner shows.

    >>> human_hours(1800, 2.0)
    1.0
    """
    return (
        human_seconds(questions, seconds_per_question, polygons, seconds_per_polygon)
        / SECONDS_PER_HOUR
    )


def cost_usd(hours: float, hourly_wage: float) -> float:
    """What ``hours`` of human time cost at ``hourly_wage`` dollars per hour."""
    return hours * hourly_wage


def speedup_vs_manual(quantity: int, seconds: float, seconds_per_polygon: float) -> float | None:
    """Human time manual polygons would need for ``quantity`` annotations, divided by the
    ``seconds`` a method spent; None when it spent none."""
    return quantity * seconds_per_polygon / seconds if seconds > 0 else None


def _mean(x: NDArray[np.floating]) -> float | None:
    return float(x.mean()) if x.size else None


def segmentation_quality(ious: NDArray[np.floating]) -> float | None:
    """SQ: mean IoU of annotations with IoU > 0.5 (None when nothing matched)."""
    return _mean(ious[ious > MATCH_IOU])


def summarize(result: MethodResult, params: AnnotationParams) -> dict[str, Any]:
    """The report entry of one method (every key of the ``report.json`` contract)."""
    ious = np.asarray(result.obtained_ious, dtype=np.float64)
    quantity = int(ious.size)
    seconds = human_seconds(
        result.questions, params.seconds_per_question, result.polygons, params.seconds_per_polygon
    )
    hours = seconds / SECONDS_PER_HOUR
    return {
        "quantity": quantity,
        "quality_mean_iou": _mean(ious),
        "sq": segmentation_quality(ious),
        "precision": _mean((ious >= params.iou_threshold).astype(np.float64)),
        "questions": int(result.questions),
        "polygons": int(result.polygons),
        "clusters_annotated": int(result.clusters_annotated),
        "hours": hours,
        "cost_usd": cost_usd(hours, params.hourly_wage),
        "masks_per_hour": quantity / hours if hours > 0 else None,
        "masks_per_question": quantity / result.questions if result.questions else None,
        "speedup_vs_manual": speedup_vs_manual(quantity, seconds, params.seconds_per_polygon),
    }


def pearson(x: NDArray[np.floating], y: NDArray[np.floating]) -> float:
    """Pearson correlation, nan for fewer than two points or a constant input."""
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])
