"""The annotation methods the paper compares against in Sec. 5.2 "Comparison to other
annotation approaches" (Fig. 8): manual polygons [32], naive binary verification [39] and
LSUN's classifier-based auto-labelling [61] adapted to masks.

Every method returns a ``MethodResult`` whose curve charges ``params.seconds_per_question``
per yes/no question and ``params.seconds_per_polygon`` per polygon, like the paper's Fig. 8
(2 s and 80 s), so its last point equals :func:`maskprop.metrics.human_seconds` of its result.
The annotator's own simulated response times stay available on
``SimulatedAnnotator.seconds_spent``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression

from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.simulate.annotator import SimulatedAnnotator
from maskprop.simulate.pool import MaskPool
from maskprop.simulate.result import MethodResult, sample_curve

__all__ = ["lsun", "manual_polygons", "naive_verification"]

# Concentration of the Beta of manual polygon IoUs: with mean 0.9 it gives a standard
# deviation of about 0.05, the spread of inter-annotator agreement.
_POLYGON_CONCENTRATION = 30.0


def _check_annotator(pool: MaskPool, annotator: SimulatedAnnotator) -> None:
    if annotator.n_masks != len(pool):
        raise MaskpropError(
            f"the annotator knows {annotator.n_masks} masks but the pool has {len(pool)}"
        )


def _result(
    name: str,
    pool: MaskPool,
    event_seconds: NDArray[np.float64],
    event_obtained: NDArray[np.bool_],
    event_ids: NDArray[np.int64],
    questions: int,
) -> MethodResult:
    """A ``MethodResult`` from a log of per-mask events in the order the team works."""
    obtained = event_ids[event_obtained]
    ious_at = np.where(event_obtained, pool.ious[event_ids].astype(np.float64), np.nan)
    return MethodResult(
        name=name,
        obtained_ious=pool.ious[obtained],
        questions=questions,
        polygons=0,
        clusters_annotated=0,
        curve=sample_curve(np.cumsum(event_seconds), ious_at),
        obtained_mask_ids=obtained.astype(np.int64),
    )


def manual_polygons(
    pool: MaskPool, params: AnnotationParams, seed: int, polygon_iou_mean: float = 0.9
) -> MethodResult:
    """Every object drawn by hand as a polygon (the COCO protocol [32]).

    The pool stands in for the objects to annotate: one polygon per mask.  A drawn polygon is
    not the ideal mask either; its IoU with it is drawn from a Beta with mean
    ``polygon_iou_mean``.  The default 0.9 sits at the top of the segmentation quality SQ
    that human annotations reach in COCO, Cityscapes, OpenImages, LVIS and ADE20K (0.8-0.86,
    paper Sec. 5.2 and 6), since a careful polygon of one's own agrees with the ideal outline
    better than two annotators agree with each other.

    Parameters
    ----------
    pool : the n objects to annotate.
    params : ``seconds_per_polygon`` (paper: 80 s) prices each polygon.
    seed : seeds the polygon IoUs.
    polygon_iou_mean : mean IoU of a manual polygon, in (0, 1).

    Returns
    -------
    MethodResult with n polygons, no questions, obtained_ious float32[n] in random order and
    no obtained_mask_ids (polygons are new masks).
    """
    if not 0.0 < polygon_iou_mean < 1.0:
        raise MaskpropError(f"polygon_iou_mean must be in (0, 1), got {polygon_iou_mean}")
    n = len(pool)
    rng = np.random.default_rng(seed)
    # Draws are independent, so their order is already the random order in which a team
    # would get through the objects.
    ious = rng.beta(
        polygon_iou_mean * _POLYGON_CONCENTRATION,
        (1.0 - polygon_iou_mean) * _POLYGON_CONCENTRATION,
        n,
    )
    seconds = params.seconds_per_polygon * np.arange(1, n + 1, dtype=np.float64)
    return MethodResult(
        name="manual_polygons",
        obtained_ious=ious.astype(np.float32),
        questions=0,
        polygons=n,
        clusters_annotated=0,
        curve=sample_curve(seconds, ious),
    )


def naive_verification(
    pool: MaskPool, annotator: SimulatedAnnotator, params: AnnotationParams
) -> MethodResult:
    """Brute-force binary verification [39]: one yes/no question for every mask.

    Masks are asked in descending score order (the best bet first, which is what a team with
    a budget would do); those answered "yes" are the output.

    Parameters
    ----------
    pool : n masks.
    annotator : answers for this pool (``annotator.n_masks == n``).
    params : ``seconds_per_question`` prices each question.

    Returns
    -------
    MethodResult with n questions and obtained_mask_ids int64[m] of the masks answered yes.
    """
    _check_annotator(pool, annotator)
    order = np.argsort(-pool.scores, kind="stable").astype(np.int64)
    before = annotator.questions_answered
    yes = annotator.answer(order)
    seconds = np.full(order.size, params.seconds_per_question)
    return _result(
        "naive_verification", pool, seconds, yes, order, annotator.questions_answered - before
    )


def _accept_threshold(
    probability: NDArray[np.float64], label: NDArray[np.bool_], target: float
) -> float:
    """Lowest t with precision of {p >= t} >= target on the calibration set; inf if none."""
    order = np.argsort(-probability, kind="stable")
    p, y = probability[order], label[order]
    precision = np.cumsum(y) / np.arange(1, p.size + 1)
    # Only thresholds at the end of a run of tied probabilities describe a set {p >= t}.
    group_end = np.append(p[1:] != p[:-1], True)
    ok = group_end & (precision >= target)
    return float(p[ok].min()) if ok.any() else math.inf


def _reject_threshold(
    probability: NDArray[np.float64], label: NDArray[np.bool_], target: float
) -> float:
    """Highest t with negative predictive value of {p <= t} >= target; -inf if none."""
    order = np.argsort(probability, kind="stable")
    p, y = probability[order], label[order]
    npv = np.cumsum(~y) / np.arange(1, p.size + 1)
    group_end = np.append(p[1:] != p[:-1], True)
    ok = group_end & (npv >= target)
    return float(p[ok].max()) if ok.any() else -math.inf


def _stratified_halves(
    label: NDArray[np.bool_], rng: np.random.Generator
) -> tuple[NDArray[np.int64], NDArray[np.int64]] | None:
    """Split sample positions into train/calibration halves that both hold both labels."""
    halves: tuple[list[NDArray[np.int64]], list[NDArray[np.int64]]] = ([], [])
    for value in (True, False):
        where = rng.permutation(np.flatnonzero(label == value))
        if where.size < 2:
            return None
        cut = (where.size + 1) // 2
        halves[0].append(where[:cut])
        halves[1].append(where[cut:])
    return np.concatenate(halves[0]), np.concatenate(halves[1])


def lsun(
    pool: MaskPool,
    annotator: SimulatedAnnotator,
    params: AnnotationParams,
    seed: int,
    sample_fraction: float = 0.02,
    min_samples: int = 40,
    target_precision: float = 0.95,
) -> MethodResult:
    """LSUN's auto-labelling (Yu et al. 2015 [61]) adapted to masks, one round per class.

    Per class: verify a random sample (``sample_fraction`` of the class, at least
    ``min_samples``, at most the class); fit a logistic regression on the standardised
    ``[f, s]`` of half of it (stratified by answer) and, on the other half, calibrate an
    auto-accept threshold (lowest probability whose precision is >= ``target_precision``) and
    an auto-reject threshold (highest probability whose negative predictive value is >=
    ``target_precision``).  Unverified masks above the first are accepted and below the second
    rejected without a question; the rest are verified one by one, most probable first.  When
    the sample's answers do not give both halves both labels, the class is verified entirely
    (descending score).  The paper does not publish its adaptation; this is the single-round
    version of LSUN's loop.

    The work is logged in the order a team would do it: all sample questions, then all
    auto-labels (0 s each), then the remaining questions class after class.

    Parameters
    ----------
    pool : n masks.
    annotator : answers for this pool; the questions asked are counted through it.
    params : ``seconds_per_question`` prices each question.
    seed : seeds the samples and the train/calibration split.
    sample_fraction : share of each class verified to train the classifier, in (0, 1].
    min_samples : floor on the sample of a class, >= 4 (two of each answer are needed).
    target_precision : precision asked of auto-accepts, and NPV of auto-rejects, in (0.5, 1].

    Returns
    -------
    MethodResult; obtained_mask_ids int64[m] = verified-yes and auto-accepted masks.
    """
    _check_annotator(pool, annotator)
    if not 0.0 < sample_fraction <= 1.0:
        raise MaskpropError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    if min_samples < 4:
        raise MaskpropError(f"min_samples must be at least 4, got {min_samples}")
    if not 0.5 < target_precision <= 1.0:
        raise MaskpropError(f"target_precision must be in (0.5, 1], got {target_precision}")
    rng = np.random.default_rng(seed)
    before = annotator.questions_answered
    sampled: list[NDArray[np.int64]] = []
    sampled_yes: list[NDArray[np.bool_]] = []
    auto_ids: list[NDArray[np.int64]] = []
    auto_yes: list[NDArray[np.bool_]] = []
    remaining: list[NDArray[np.int64]] = []
    for class_id in range(len(pool.class_names)):
        members = pool.class_indices(class_id)
        if members.size == 0:
            continue
        k = min(members.size, max(min_samples, math.ceil(sample_fraction * members.size)))
        picked = rng.permutation(members.size)
        sample, rest = members[picked[:k]], members[picked[k:]]
        yes = annotator.answer(sample)
        sampled.append(sample)
        sampled_yes.append(yes)
        if rest.size == 0:
            continue
        halves = _stratified_halves(yes, rng)
        if halves is None:
            remaining.append(rest[np.argsort(-pool.scores[rest], kind="stable")])
            continue
        train, calibration = halves
        # Standardised on the whole class (no labels involved) so f and s weigh alike.
        x = np.column_stack([pool.features[members], pool.scores[members]]).astype(np.float64)
        scale = x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        x = (x - x.mean(axis=0)) / scale
        x_sample, x_rest = x[picked[:k]], x[picked[k:]]
        model = LogisticRegression(max_iter=1000).fit(x_sample[train], yes[train])
        p_calibration = model.predict_proba(x_sample[calibration])[:, 1]
        accept_at = _accept_threshold(p_calibration, yes[calibration], target_precision)
        reject_at = _reject_threshold(p_calibration, yes[calibration], target_precision)
        p_rest = model.predict_proba(x_rest)[:, 1]
        # Where the two thresholds cross, a mask would be both; ask instead.
        accept = (p_rest >= accept_at) & (p_rest > reject_at)
        reject = (p_rest <= reject_at) & (p_rest < accept_at)
        auto_ids += [rest[accept], rest[reject]]
        auto_yes += [np.ones(int(accept.sum()), bool), np.zeros(int(reject.sum()), bool)]
        ask = ~(accept | reject)
        remaining.append(rest[ask][np.argsort(-p_rest[ask], kind="stable")])
    sampled_ids = np.concatenate(sampled) if sampled else np.zeros(0, np.int64)
    auto = np.concatenate(auto_ids) if auto_ids else np.zeros(0, np.int64)
    later = np.concatenate(remaining) if remaining else np.zeros(0, np.int64)
    later_yes = annotator.answer(later)
    spq = params.seconds_per_question
    event_ids = np.concatenate([sampled_ids, auto, later]).astype(np.int64)
    event_obtained = np.concatenate(
        [
            np.concatenate(sampled_yes) if sampled_yes else np.zeros(0, bool),
            np.concatenate(auto_yes) if auto_yes else np.zeros(0, bool),
            later_yes,
        ]
    )
    event_seconds = np.concatenate(
        [np.full(sampled_ids.size, spq), np.zeros(auto.size), np.full(later.size, spq)]
    )
    return _result(
        "lsun",
        pool,
        event_seconds,
        event_obtained,
        event_ids,
        annotator.questions_answered - before,
    )
