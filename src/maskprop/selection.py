"""Active selection of clusters to annotate (paper Sec. 4.3, Fig. 4c).

The cluster score S_j decides, before any question, what happens to a popped cluster:

* ``S_j <= K_pr``: reject without asking (P_l ~ 1: it is almost surely low quality);
* ``K_pr < S_j <= K_pa``: split without asking (P_h ~ 0: not good as a whole, but its
  children may be);
* ``S_j > K_pa``: ask people.

K_pr and K_pa are fixed (the paper uses K_pa = 0.7) or derived from the likelihoods
P_h(S) = P(Q >= K_a | S) and P_l(S) = P(Q <= 1 - K_a | S), learned on clusters of a held-out
labelled set with isotonic regression (monotone in S, as Fig. 4c shows).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from numpy.typing import NDArray
from sklearn.isotonic import IsotonicRegression

from maskprop.errors import MaskpropError


class Prior(Enum):
    """What the cluster score alone says to do with a cluster."""

    REJECT = "reject"
    SPLIT = "split"
    ASK = "ask"


#: :meth:`Selection.decide_many` codes of :class:`Prior`.
PRIOR_REJECT, PRIOR_SPLIT, PRIOR_ASK = 0, 1, 2


@dataclass(frozen=True)
class Selection:
    """Thresholds K_pr (``prior_reject_threshold``) and K_pa (``prior_accept_threshold``)."""

    prior_reject_threshold: float
    prior_accept_threshold: float

    def __post_init__(self) -> None:
        if self.prior_reject_threshold > self.prior_accept_threshold:
            raise MaskpropError("K_pr must not exceed K_pa")

    def overridden(self, k_pr: float | None, k_pa: float | None) -> Selection:
        """These (learned) thresholds with the fixed ones a user set in their place; K_pr is
        capped at K_pa, since a fixed K_pa may lie below the learned K_pr.

        >>> Selection(0.3, 0.5).overridden(None, 0.2)
        Selection(prior_reject_threshold=0.2, prior_accept_threshold=0.2)
        """
        pa = self.prior_accept_threshold if k_pa is None else k_pa
        pr = self.prior_reject_threshold if k_pr is None else k_pr
        return Selection(min(pr, pa), pa)

    def decide(self, cluster_score: float) -> Prior:
        if cluster_score <= self.prior_reject_threshold:
            return Prior.REJECT
        if cluster_score <= self.prior_accept_threshold:
            return Prior.SPLIT
        return Prior.ASK

    def decide_many(self, cluster_scores: NDArray[np.floating]) -> NDArray[np.int8]:
        """:meth:`decide` of every score at once, as codes ``PRIOR_REJECT`` (0),
        ``PRIOR_SPLIT`` (1) and ``PRIOR_ASK`` (2): int8[n].

        >>> Selection(0.2, 0.6).decide_many(np.array([0.1, 0.2, 0.5, 0.6, 0.9])).tolist()
        [0, 0, 1, 1, 2]
        """
        s = np.asarray(cluster_scores, dtype=np.float64)
        codes = np.full(s.shape, PRIOR_ASK, np.int8)
        codes[s <= self.prior_accept_threshold] = PRIOR_SPLIT
        codes[s <= self.prior_reject_threshold] = PRIOR_REJECT
        return codes


@dataclass(frozen=True)
class Likelihoods:
    """P_h and P_l evaluated on a grid of cluster scores (all float64[g])."""

    grid: NDArray[np.float64]
    p_high: NDArray[np.float64]
    p_low: NDArray[np.float64]

    def thresholds(self, tolerance: float = 0.02) -> Selection:
        """Derive K_pr and K_pa from the likelihoods.

        K_pr is the largest S below which P_l >= 1 - tolerance everywhere (reject is safe);
        K_pa is the largest S below which P_h <= tolerance everywhere (asking is wasted).
        """
        k_pr = _last_prefix_value(self.grid, self.p_low >= 1.0 - tolerance)
        k_pa = _last_prefix_value(self.grid, self.p_high <= tolerance)
        return Selection(prior_reject_threshold=k_pr, prior_accept_threshold=max(k_pa, k_pr))


def _last_prefix_value(grid: NDArray[np.float64], ok: NDArray[np.bool_]) -> float:
    """Largest grid value g such that ``ok`` holds at every grid point <= g (0 if none)."""
    if ok.size == 0 or not ok[0]:
        return 0.0
    bad = np.flatnonzero(~ok)
    last = grid.shape[0] - 1 if bad.size == 0 else bad[0] - 1
    return float(grid[last])


def fit_likelihoods(
    cluster_scores: NDArray[np.floating],
    cluster_quality: NDArray[np.floating],
    accept_threshold: float,
    weights: NDArray[np.floating] | None = None,
    grid_points: int = 101,
) -> Likelihoods:
    """Learn P_h(S) and P_l(S) from clusters with known quality.

    Parameters
    ----------
    cluster_scores : float[m], S_j of held-out clusters.
    cluster_quality : float[m], their true quality Q_j (share of correct masks).
    accept_threshold : K_a.
    weights : optional float[m] (e.g. cluster sizes).
    grid_points : resolution of the returned curves on [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> s = np.linspace(0, 1, 200); q = (s > 0.5).astype(float)
    >>> lik = fit_likelihoods(s, q, 0.85)
    >>> float(lik.p_high[-1]), float(lik.p_low[0])
    (1.0, 1.0)
    """
    s = np.asarray(cluster_scores, dtype=np.float64)
    q = np.asarray(cluster_quality, dtype=np.float64)
    if s.ndim != 1 or s.shape != q.shape or s.size < 2:
        raise MaskpropError("need at least two held-out clusters with a score and a quality")
    grid = np.linspace(0.0, 1.0, grid_points)
    high = (q >= accept_threshold - 1e-12).astype(np.float64)
    low = (q <= 1.0 - accept_threshold + 1e-12).astype(np.float64)
    iso_h = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso_l = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=False, out_of_bounds="clip")
    iso_h.fit(s, high, sample_weight=weights)
    iso_l.fit(s, low, sample_weight=weights)
    return Likelihoods(grid=grid, p_high=iso_h.predict(grid), p_low=iso_l.predict(grid))
