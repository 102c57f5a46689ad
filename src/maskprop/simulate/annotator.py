"""A simulated crowd worker answering the paper's yes/no verification question (Sec. 4.4)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from maskprop.errors import MaskpropError

__all__ = ["SimulatedAnnotator"]

# Spread (log-space sigma) of response times.  Crowd response times are right-skewed; the
# paper reports a mean of 1.5 s on Mechanical Turk (Sec. 6) and budgets 2 s (Sec. 4.4).
_RESPONSE_SIGMA = 0.5


class SimulatedAnnotator:
    """Answers "does this mask correctly outline the object?" for masks of one pool.

    The truthful answer is ``iou >= iou_threshold`` (K_iou).  Each mask is mislabelled with
    probability ``error_rate``, decided once at construction: asking the same mask again, or
    in another order, or from another strategy, always gets the same answer, so strategies run
    against annotators with the same seed face the same mistakes and stay comparable.  Response
    times come from a separate random stream so timing never changes an answer.

    Parameters
    ----------
    ious : float32[n], true IoU of every pool mask; mask ids index it.
    iou_threshold : K_iou in (0, 1].
    error_rate : probability in [0, 0.5] that the answer about a mask is wrong.
    mean_seconds : mean response time of one question (lognormal), > 0.
    seed : seeds the mistakes and the response times.

    Attributes
    ----------
    questions_answered : questions answered so far.
    seconds_spent : simulated response time of those questions, in seconds.

    Examples
    --------
    >>> annotator = SimulatedAnnotator(np.array([0.9, 0.5], dtype=np.float32), 0.75)
    >>> annotator.answer(np.array([0, 1, 0])).tolist(), annotator.questions_answered
    ([True, False, True], 3)
    """

    def __init__(
        self,
        ious: NDArray[np.float32],
        iou_threshold: float,
        error_rate: float = 0.0,
        mean_seconds: float = 2.0,
        seed: int = 0,
    ) -> None:
        ious = np.asarray(ious)
        if ious.ndim != 1:
            raise MaskpropError("ious must be a 1-D array with one IoU per mask")
        if not 0.0 < iou_threshold <= 1.0:
            raise MaskpropError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if not 0.0 <= error_rate <= 0.5:
            raise MaskpropError(f"error_rate must be in [0, 0.5], got {error_rate}")
        if not mean_seconds > 0.0:
            raise MaskpropError(f"mean_seconds must be positive, got {mean_seconds}")
        answers_seed, timing_seed = np.random.SeedSequence(seed).spawn(2)
        flipped = np.random.default_rng(answers_seed).random(ious.shape[0]) < error_rate
        self._answers: NDArray[np.bool_] = (ious >= iou_threshold) ^ flipped
        self._timing = np.random.default_rng(timing_seed)
        # Lognormal with E[t] = mean_seconds: exp(mu + sigma^2 / 2) = mean.
        self._log_mean = math.log(mean_seconds) - _RESPONSE_SIGMA**2 / 2.0
        self.iou_threshold = float(iou_threshold)
        self.error_rate = float(error_rate)
        self.mean_seconds = float(mean_seconds)
        self.questions_answered = 0
        self.seconds_spent = 0.0

    @property
    def n_masks(self) -> int:
        """Number of pool masks this annotator can be asked about."""
        return int(self._answers.shape[0])

    @property
    def answers(self) -> NDArray[np.bool_]:
        """bool[n]: the answer about every mask (read-only), for a caller that asks many
        small batches and does not need response times (the simulator's sessions)."""
        v = self._answers.view()
        v.flags.writeable = False
        return v

    def answer(self, mask_ids: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Ask one question per id, in order.

        Parameters
        ----------
        mask_ids : int64[k], pool indices; repeats are asked (and counted) again.

        Returns
        -------
        bool[k], True for "yes, the mask is correct".
        """
        ids = np.asarray(mask_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise MaskpropError("mask_ids must be a 1-D array of integer pool indices")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_masks):
            raise MaskpropError(
                f"mask id out of range: the annotator knows masks 0..{self.n_masks - 1}"
            )
        self.questions_answered += int(ids.size)
        self.seconds_spent += float(
            self._timing.lognormal(self._log_mean, _RESPONSE_SIGMA, ids.size).sum()
        )
        return self._answers[ids]
