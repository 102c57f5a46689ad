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
from functools import lru_cache

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
    p_high, p_low = _beta_tails(yes, answered - yes, params.accept_threshold)
    conf = params.sequential_confidence
    if p_high >= conf:
        return Verdict.ACCEPT
    if p_low >= conf:
        return Verdict.REJECT if params.reject_action == "reject" else Verdict.SPLIT
    if 1.0 - p_high - p_low >= conf:
        return Verdict.SPLIT
    return Verdict.MORE


@lru_cache(maxsize=4096)
def _beta_tails(yes: int, no: int, accept_threshold: float) -> tuple[float, float]:
    """P(Q >= K_a) and P(Q <= 1 - K_a) under the Beta(1 + yes, 1 + no) posterior of a uniform
    prior.  Cached: a run checks the same few (yes, no) pairs hundreds of thousands of times,
    and the two scipy calls on scalars cost ~3 us a check (a cached check ~0.6 us)."""
    a, b = 1 + yes, 1 + no
    # betainc is the regularised incomplete beta function, i.e. the Beta CDF.
    return (
        1.0 - float(betainc(a, b, accept_threshold)),
        float(betainc(a, b, 1.0 - accept_threshold)),
    )


_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # SplitMix64's increment, 2**64 / golden ratio


def _mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea and Flood 2014): a bijection of 64-bit
    integers whose every output bit depends on every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_order(seed: int, class_id: int, node: int, size: int, k: int) -> list[int]:
    """Which members of a cluster of ``size`` masks to ask, in asking order: the first
    ``min(k, size)`` entries of a uniformly random permutation of ``range(size)`` (positions
    in the cluster's member list), a function of (seed, class, node) alone.

    Each cluster is sampled without replacement by a partial Fisher-Yates shuffle that swaps
    only the ``k`` slots it draws (a dict, not an array of ``size``), driven by a SplitMix64
    stream keyed by ``(seed, class_id, node)``: O(k) whatever the cluster's size, ~1 us to
    key plus ~0.7 us a mask, where a seeded numpy generator cost ~40-75 us a cluster to build
    (``benchmarks/bench_session.py --samples``: 4.6 against 59.8 us a draw).  The first ``k``
    entries do not depend on ``k`` (a larger sample extends a smaller one).  Positions are
    drawn as ``floor(u * (size - i))`` from 53-bit ``u``: bias below 2**-20 for any cluster of
    fewer than 2**32 masks.
    """
    if size < 1 or k < 1:
        return []
    if size == 1:
        return [0]
    z = _mix64((_mix64((_mix64(seed & _MASK64) + class_id) & _MASK64) + node) & _MASK64)
    moved: dict[int, int] = {}  # slot -> the position a swap left there
    get = moved.get
    out: list[int] = []
    for i in range(min(k, size)):
        z = (z + _GOLDEN64) & _MASK64
        u = _mix64(z) >> 11  # 53 random bits
        j = i + ((u * (size - i)) >> 53)
        out.append(get(j, j))
        moved[j] = get(i, i)
    return out


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
