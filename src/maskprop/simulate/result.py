"""What one annotation method produced on a pool, in a form every method shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from maskprop.metrics import SECONDS_PER_HOUR


@dataclass(frozen=True)
class Curve:
    """Cumulative progress of a method, sampled at increasing human time.

    hours : float64[k], non-decreasing human hours spent.
    quantity : int64[k], annotations obtained by then.
    mean_iou : float64[k], mean true IoU of those annotations (nan while quantity is 0).
    clusters : int64[k], clusters annotated by then (0 for methods without clusters).
    """

    hours: NDArray[np.float64]
    quantity: NDArray[np.int64]
    mean_iou: NDArray[np.float64]
    clusters: NDArray[np.int64]


@dataclass(frozen=True)
class MethodResult:
    """The outcome of one method.

    obtained_ious : float32[m], true IoU of every annotation the method produced (for a
        manual polygon: the polygon's IoU with the ideal mask).
    obtained_mask_ids : int64[m] pool indices of propagated/verified masks, or empty for methods
        that draw new masks (manual polygons).
    questions : yes/no verification questions asked.
    polygons : manual polygons drawn.
    clusters_annotated : clusters shown to people.
    """

    name: str
    obtained_ious: NDArray[np.float32]
    questions: int
    polygons: int
    clusters_annotated: int
    curve: Curve
    obtained_mask_ids: NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64)
    )


def sample_curve(
    seconds: NDArray[np.float64],
    ious_obtained_at: NDArray[np.float64],
    clusters: NDArray[np.int64] | None = None,
    points: int = 200,
) -> Curve:
    """Build a ``Curve`` from an event log.

    seconds : float64[e], cumulative human seconds after each event (non-decreasing).
    ious_obtained_at : float64[e], IoU of the annotation obtained at that event, or nan when the
        event obtained nothing (a question answered "no", a rejected cluster).
    clusters : int64[e], cumulative clusters annotated after each event, or None.
    """
    e = seconds.shape[0]
    if e == 0:
        zero_f = np.zeros(1)
        zero_i = np.zeros(1, dtype=np.int64)
        return Curve(zero_f, zero_i, np.full(1, np.nan), zero_i)
    got = ~np.isnan(ious_obtained_at)
    quantity = np.cumsum(got)
    iou_sum = np.cumsum(np.where(got, ious_obtained_at, 0.0))
    at = np.unique(np.linspace(0, e - 1, min(points, e)).round().astype(np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_iou = np.where(quantity[at] > 0, iou_sum[at] / np.maximum(quantity[at], 1), np.nan)
    cl = clusters[at] if clusters is not None else np.zeros(at.shape[0], dtype=np.int64)
    return Curve(
        hours=seconds[at] / SECONDS_PER_HOUR,
        quantity=quantity[at].astype(np.int64),
        mean_iou=mean_iou,
        clusters=cl.astype(np.int64),
    )
