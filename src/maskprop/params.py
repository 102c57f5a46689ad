"""Parameters of the method (paper Sec. 4 and 5.2), with the paper's values as defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from maskprop.errors import MaskpropError

SequentialRule = Literal["off", "curtail", "beta"]
UncertainRejectAction = Literal["reject", "split"]


@dataclass(frozen=True)
class AnnotationParams:
    """Thresholds and costs of one annotation campaign.

    Attributes
    ----------
    samples_per_cluster : N_s, masks verified per candidate cluster (paper: 15).
    accept_threshold : K_a; accept when the estimated quality Q~ >= K_a, reject when
        Q~ <= 1 - K_a (paper: 0.85).
    iou_threshold : K_iou; a mask is correct when IoU with ground truth >= K_iou (paper: 0.75).
    prior_accept_threshold : K_pa; clusters with score S <= K_pa are split without asking
        (paper: 0.7).  ``None`` means "learn it from held-out data".
    prior_reject_threshold : K_pr; clusters with S <= K_pr are rejected without asking.
        ``None`` means "learn it from held-out data".
    reject_action : what to do with a cluster whose Q~ <= 1 - K_a: ``reject`` (paper) or
        ``split`` (keep searching its children, for pools where bad clusters hide good masks).
    reuse_answers : children inherit their ancestors' answers for the masks they contain, and a
        mask's own answer overrides the label propagated to it.  On by default: at 200k
        simulated masks it gives ~3x the masks per question of the paper's rule (which is
        ``reuse_answers=False``) at the same SQ; see the README's simulation figures.
    sequential : ``off`` asks N_s masks at once (paper); ``curtail`` stops as soon as the
        fixed-N_s decision can no longer change (same decisions, fewer questions); ``beta``
        stops when a Beta(1, 1) posterior puts probability >= ``sequential_confidence`` on one
        decision region.  Never more than N_s questions a cluster.
    sequential_batch : questions asked at a time by the sequential rules.
    seconds_per_question : human time of one yes/no verification (paper: 2 s).
    seconds_per_polygon : human time of one manual polygon (paper: 80 s).
    hourly_wage : dollars per human hour, for cost figures.
    """

    samples_per_cluster: int = 15
    accept_threshold: float = 0.85
    iou_threshold: float = 0.75
    prior_accept_threshold: float | None = 0.7
    prior_reject_threshold: float | None = 0.0
    reject_action: UncertainRejectAction = "reject"
    reuse_answers: bool = True
    sequential: SequentialRule = "off"
    sequential_batch: int = 3
    sequential_confidence: float = 0.95
    seconds_per_question: float = 2.0
    seconds_per_polygon: float = 80.0
    hourly_wage: float = 12.0

    def __post_init__(self) -> None:
        if self.samples_per_cluster < 1:
            raise MaskpropError("samples_per_cluster (N_s) must be at least 1")
        if not 0.5 < self.accept_threshold <= 1.0:
            raise MaskpropError("accept_threshold (K_a) must be in (0.5, 1]")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise MaskpropError("iou_threshold (K_iou) must be in (0, 1]")
        for name in ("prior_accept_threshold", "prior_reject_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise MaskpropError(f"{name} must be in [0, 1]")
        if self.reject_action not in ("reject", "split"):
            raise MaskpropError("reject_action must be 'reject' or 'split'")
        if self.sequential not in ("off", "curtail", "beta"):
            raise MaskpropError("sequential must be one of: off, curtail, beta")
        if self.sequential_batch < 1:
            raise MaskpropError("sequential_batch must be at least 1")
        if not 0.5 < self.sequential_confidence < 1.0:
            raise MaskpropError("sequential_confidence must be in (0.5, 1)")
        if self.seconds_per_question <= 0 or self.seconds_per_polygon <= 0:
            raise MaskpropError("human times must be positive")
        if self.hourly_wage < 0:
            raise MaskpropError("hourly_wage must not be negative")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
