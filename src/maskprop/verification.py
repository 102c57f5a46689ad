"""Verifying a cluster from a few sampled masks (paper Sec. 4.4-4.5).

People answer yes/no for N_s masks sampled without replacement from a cluster; the share of
"yes" is the estimated quality Q~.  Q~ >= K_a accepts the cluster, Q~ <= 1 - K_a rejects it
(or splits it, see ``AnnotationParams.reject_action``), anything else splits it.

Three stopping rules decide when enough answers are in (``AnnotationParams.sequential``):

* ``off`` (the paper): all ``m = min(N_s, |C|)`` answers, then the rule above;
* ``curtail``: stop as soon as no remaining answers could change the fixed-N_s outcome
  (curtailed sampling).  Decisions are identical to ``off``; only questions are saved, mostly on
  impure clusters (3 "yes" and 3 "no" already rule out both accept and reject at N_s = 15);
* ``beta``: stop when a Beta(1, 1) posterior on Q gives one of the regions
  [K_a, 1], [0, 1 - K_a] or the band between probability >= ``sequential_confidence``; at ``m``
  answers fall back to the fixed rule.  It may decide differently from ``off``.
"""

from __future__ import annotations

import math
from enum import Enum

from scipy.special import betainc

from maskprop.params import AnnotationParams

_EPS = 1e-9


class Verdict(Enum):
    """Outcome of verifying a cluster."""

    ACCEPT = "accept"
    REJECT = "reject"
    SPLIT = "split"
    MORE = "more"  # not decided yet: ask more masks


def target_answers(cluster_size: int, params: AnnotationParams) -> int:
    """m = min(N_s, |C|): answers the fixed rule needs for a cluster of this size."""
    return min(params.samples_per_cluster, cluster_size)


def estimated_quality(yes: int, answered: int) -> float:
    """Q~ = share of "yes" among the answered sampled masks."""
    return yes / answered if answered else 0.0


def _fixed(yes: int, answered: int, params: AnnotationParams) -> Verdict:
    q = estimated_quality(yes, answered)
    if q >= params.accept_threshold - _EPS:
        return Verdict.ACCEPT
    if q <= 1.0 - params.accept_threshold + _EPS:
        return Verdict.REJECT if params.reject_action == "reject" else Verdict.SPLIT
    return Verdict.SPLIT


def verdict(yes: int, answered: int, cluster_size: int, params: AnnotationParams) -> Verdict:
    """Decide a cluster from ``yes`` positive answers out of ``answered``.

    ``answered`` may exceed m when answers reused from ancestors are more than N_s; they are all
    used (a larger sample only sharpens Q~).
    """
    m = target_answers(cluster_size, params)
    if answered >= m:
        return _fixed(yes, answered, params)
    if params.sequential == "off" or answered == 0:
        return Verdict.MORE
    if params.sequential == "curtail":
        remaining = m - answered
        lowest = _fixed(yes, m, params)
        highest = _fixed(yes + remaining, m, params)
        # The outcome is monotone in the final yes count, so equal ends mean it is settled.
        if lowest == highest:
            return lowest
        return Verdict.MORE
    # Beta posterior on Q with a uniform prior.
    a, b = 1 + yes, 1 + answered - yes
    # betainc is the regularised incomplete beta function, i.e. the Beta CDF.
    p_high = 1.0 - float(betainc(a, b, params.accept_threshold))
    p_low = float(betainc(a, b, 1.0 - params.accept_threshold))
    conf = params.sequential_confidence
    if p_high >= conf:
        return Verdict.ACCEPT
    if p_low >= conf:
        return Verdict.REJECT if params.reject_action == "reject" else Verdict.SPLIT
    if 1.0 - p_high - p_low >= conf:
        return Verdict.SPLIT
    return Verdict.MORE


def questions_per_round(answered: int, cluster_size: int, params: AnnotationParams) -> int:
    """How many new masks to ask for a cluster that has ``answered`` answers so far."""
    m = target_answers(cluster_size, params)
    missing = max(m - answered, 0)
    if params.sequential == "off":
        return missing
    return min(missing, params.sequential_batch)


def min_answers_to_accept(params: AnnotationParams, m: int) -> int:
    """Smallest yes count out of m that accepts (for reports and tests)."""
    return math.ceil(params.accept_threshold * m - _EPS)
