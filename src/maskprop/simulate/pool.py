"""A pool of predicted masks described by the triplets the method needs: (f, s, IoU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from maskprop.errors import MaskpropError


@dataclass(frozen=True)
class MaskPool:
    """Predicted masks of many classes.

    Attributes
    ----------
    features : float32[n, d], the mask feature f (mask-attention features in the paper).
    scores : float32[n] in [0, 1], the mask score s (class confidence x predicted IoU).
    ious : float32[n] in [0, 1], true IoU of each mask with its ground-truth object.  Only the
        simulator and the metrics read it; the method never does.
    class_ids : int32[n] in [0, len(class_names)).
    class_names : one name per class.
    """

    features: NDArray[np.float32]
    scores: NDArray[np.float32]
    ious: NDArray[np.float32]
    class_ids: NDArray[np.int32]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.scores.shape[0]
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise MaskpropError("features must be a 2-D array with one row per mask")
        if self.ious.shape != (n,) or self.class_ids.shape != (n,):
            raise MaskpropError("scores, ious and class_ids must have one entry per mask")
        if n and (self.class_ids.min() < 0 or self.class_ids.max() >= len(self.class_names)):
            raise MaskpropError("class_ids must index class_names")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def class_indices(self, class_id: int) -> NDArray[np.int64]:
        """Pool indices of the masks of one class, ascending."""
        return np.flatnonzero(self.class_ids == class_id)

    def subset(self, index: NDArray[np.integer]) -> MaskPool:
        """The masks at ``index``, in that order, with the same class names."""
        return MaskPool(
            features=self.features[index],
            scores=self.scores[index],
            ious=self.ious[index],
            class_ids=self.class_ids[index],
            class_names=self.class_names,
        )
