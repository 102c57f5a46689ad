"""The one table of real (predicted) masks: what the detector outputs, what the clusterer
stores beside each class's tree and what the search service reads to label masks.

Simulated masks (:class:`maskprop.simulate.MaskPool`: features, scores and true IoUs, no
pixels) are a different thing and keep their own type.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from maskprop.errors import MaskpropError

__all__ = ["FORMAT", "MaskTable", "pack_counts"]

# Written into every stored table (npz key ``masks_format``); a table of another format is
# refused with a clear error instead of being half-read.
FORMAT = "maskprop-masks-1"


def pack_counts(counts: Sequence[bytes]) -> tuple[bytes, NDArray[np.int64]]:
    """Compressed RLE counts of n masks -> ``(blob, offsets int64[n + 1])`` with mask i's
    counts at ``blob[offsets[i]:offsets[i + 1]]``."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in counts], out=offsets[1:])
    return b"".join(counts), offsets


def _gather(blob: bytes | mmap.mmap, offsets: NDArray[np.int64], idx: NDArray[np.int64]) -> bytes:
    """The counts of masks ``idx``, in that order, as one blob (vectorised, no per-mask loop)."""
    starts, ends = offsets[idx], offsets[idx + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return b""
    first = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    positions = np.arange(total) + np.repeat(starts - first, lengths)
    return np.frombuffer(blob, dtype=np.uint8)[positions].tobytes()


@dataclass(frozen=True, eq=False)
class MaskTable:
    """Predicted masks as columns, one row per mask, plus the images they lie on.

    Attributes
    ----------
    mask_ids : str[n], unique within a campaign's class.
    image_ids : the image of each mask: str[n] (the wire's and the stores' image ids) or
        int64[n] (COCO image ids, in the detector's output on a COCO set).
    class_ids : int32[n], 0-based index into the campaign's (the detector's) classes.
    scores : float32[n], s = class confidence x predicted IoU, in [0, 1].
    features : float32[n, d], the mask-attention feature f.
    boxes : float32[n, 4], ``x1, y1, x2, y2`` in pixels: the detector's box, or the mask's
        bounding box where the masks came without one (over the wire).
    mask_ious : float32[n], the predicted IoU (Mask Scoring head); NaN where unknown (the wire
        carries s only).
    rle_h, rle_w : uint32[n], the mask's size (its image's height and width).
    rle_blob, rle_offsets : compressed COCO RLE counts of mask i are
        ``rle_blob[rle_offsets[i]:rle_offsets[i + 1]]``; ``rle_offsets`` is int64[n + 1].
        ``rle_blob`` is ``bytes``, or a read-only :class:`mmap.mmap` in a table the tree store
        memory-maps (it slices to ``bytes`` too).
    img_ids, img_w, img_h, img_files : the images the masks refer to, one row each (id as in
        ``image_ids``, width, height uint32, file name; ``""`` where the producer has none).

    Stored as npz without pickle: :meth:`to_arrays` / :meth:`from_arrays`.

    Examples
    --------
    >>> t = MaskTable.empty(feature_dim=4)
    >>> len(MaskTable.concat([t, t])), t.features.shape
    (0, (0, 4))
    """

    mask_ids: NDArray[Any]
    image_ids: NDArray[Any]
    class_ids: NDArray[np.int32]
    scores: NDArray[np.float32]
    features: NDArray[np.float32]
    boxes: NDArray[np.float32]
    mask_ious: NDArray[np.float32]
    rle_h: NDArray[np.uint32]
    rle_w: NDArray[np.uint32]
    rle_blob: bytes | mmap.mmap
    rle_offsets: NDArray[np.int64]
    img_ids: NDArray[Any]
    img_w: NDArray[np.uint32]
    img_h: NDArray[np.uint32]
    img_files: NDArray[np.str_]

    _COLUMNS = (
        "mask_ids", "image_ids", "class_ids", "scores", "features", "boxes", "mask_ious",
        "rle_h", "rle_w",
    )  # fmt: skip
    _IMAGE_COLUMNS = ("img_ids", "img_w", "img_h", "img_files")

    def __post_init__(self) -> None:
        n = len(self.mask_ids)
        for name in self._COLUMNS:
            if len(getattr(self, name)) != n:
                rows = len(getattr(self, name))
                raise MaskpropError(f"mask table column {name} has {rows} rows, mask_ids {n}")
        if self.rle_offsets.shape != (n + 1,) or int(self.rle_offsets[-1]) != len(self.rle_blob):
            raise MaskpropError("mask table rle_offsets do not index rle_blob")

    def __len__(self) -> int:
        return int(self.mask_ids.shape[0])

    @classmethod
    def empty(cls, feature_dim: int) -> MaskTable:
        return cls(
            mask_ids=np.zeros(0, dtype=np.str_),
            image_ids=np.zeros(0, dtype=np.str_),
            class_ids=np.zeros(0, np.int32),
            scores=np.zeros(0, np.float32),
            features=np.zeros((0, feature_dim), np.float32),
            boxes=np.zeros((0, 4), np.float32),
            mask_ious=np.zeros(0, np.float32),
            rle_h=np.zeros(0, np.uint32),
            rle_w=np.zeros(0, np.uint32),
            rle_blob=b"",
            rle_offsets=np.zeros(1, np.int64),
            img_ids=np.zeros(0, dtype=np.str_),
            img_w=np.zeros(0, np.uint32),
            img_h=np.zeros(0, np.uint32),
            img_files=np.zeros(0, dtype=np.str_),
        )

    # ---- RLE access
    def counts(self, i: int) -> bytes:
        """Compressed COCO RLE counts of mask ``i``."""
        return self.rle_blob[int(self.rle_offsets[i]) : int(self.rle_offsets[i + 1])]

    def rle(self, i: int) -> dict[str, Any]:
        """Mask ``i`` as a COCO segmentation ``{"size": [h, w], "counts": str}`` (JSON form)."""
        return {
            "size": [int(self.rle_h[i]), int(self.rle_w[i])],
            "counts": self.counts(i).decode("ascii"),
        }

    def rles(self) -> list[dict[str, Any]]:
        """Every mask as a COCO segmentation ``{"size": [h, w], "counts": str}`` (JSON form)."""
        blob, off = self.rle_blob, self.rle_offsets.tolist()
        return [
            {"size": [h, w], "counts": blob[off[i] : off[i + 1]].decode("ascii")}
            for i, (h, w) in enumerate(zip(self.rle_h.tolist(), self.rle_w.tolist(), strict=True))
        ]

    def coco_results(self, category_ids: Sequence[int]) -> list[dict[str, Any]]:
        """COCO result entries (what ``COCOeval`` and :func:`maskprop.data.coco.
        write_coco_results` take); ``category_ids[k]`` is class k's COCO id and image ids must
        be COCO's (int)."""
        return [
            {
                "image_id": int(img),
                "category_id": int(category_ids[int(c)]),
                "segmentation": rle,
                "score": float(s),
            }
            for img, c, s, rle in zip(
                self.image_ids.tolist(),
                self.class_ids.tolist(),
                self.scores.tolist(),
                self.rles(),
                strict=True,
            )
        ]

    # ---- rows
    def take(self, idx: NDArray[np.integer] | Sequence[int]) -> MaskTable:
        """The masks ``idx`` (in that order) and the images they refer to."""
        i = np.asarray(idx, dtype=np.int64).reshape(-1)
        blob = _gather(self.rle_blob, self.rle_offsets, i)
        lengths = self.rle_offsets[i + 1] - self.rle_offsets[i]
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        keep = np.isin(self.img_ids, self.image_ids[i])
        return MaskTable(
            **{name: getattr(self, name)[i] for name in self._COLUMNS},
            rle_blob=blob,
            rle_offsets=offsets,
            **{name: getattr(self, name)[keep] for name in self._IMAGE_COLUMNS},
        )

    @classmethod
    def concat(cls, parts: Sequence[MaskTable]) -> MaskTable:
        """The rows of ``parts`` one after the other; each image once (first description wins),
        sorted by image id.  ``parts`` must not be empty."""
        if not parts:
            raise ValueError("MaskTable.concat needs at least one table")
        if len(parts) == 1:
            return parts[0]
        columns = {name: np.concatenate([getattr(p, name) for p in parts]) for name in cls._COLUMNS}
        shift = np.cumsum([0] + [len(p.rle_blob) for p in parts[:-1]])
        offsets = np.concatenate(
            [parts[0].rle_offsets[:1]]
            + [p.rle_offsets[1:] + s for p, s in zip(parts, shift, strict=True)]
        ).astype(np.int64)
        images = {
            name: np.concatenate([getattr(p, name) for p in parts]) for name in cls._IMAGE_COLUMNS
        }
        _, first = np.unique(images["img_ids"], return_index=True)
        return cls(
            **columns,
            rle_blob=b"".join(p.rle_blob for p in parts),
            rle_offsets=offsets,
            **{name: col[first] for name, col in images.items()},
        )

    def by_mask_id(self) -> MaskTable:
        """Sorted by mask id with repeated ids dropped (first row wins): the stable leaf order
        of a class's tree, whatever order and how often its batches arrived."""
        _, first = np.unique(self.mask_ids, return_index=True)
        return self.take(first)

    # ---- storage (npz, no pickle)
    def to_arrays(self) -> dict[str, NDArray[Any]]:
        """Plain arrays for ``np.savez``; :meth:`from_arrays` reads them back."""
        return {
            "masks_format": np.array(FORMAT),
            **{name: getattr(self, name) for name in self._COLUMNS},
            "rle_blob": np.frombuffer(self.rle_blob, dtype=np.uint8),
            "rle_offsets": self.rle_offsets,
            **{name: getattr(self, name) for name in self._IMAGE_COLUMNS},
        }

    @classmethod
    def from_arrays(cls, a: Mapping[str, NDArray[Any]]) -> MaskTable:
        """Inverse of :meth:`to_arrays` (extra keys are ignored); :class:`MaskpropError` for
        arrays of another format."""
        found = str(a["masks_format"]) if "masks_format" in a else "none"
        if found != FORMAT:
            raise MaskpropError(f"mask table format {found!r}, expected {FORMAT!r}")
        return cls(
            mask_ids=np.asarray(a["mask_ids"]),
            image_ids=np.asarray(a["image_ids"]),
            class_ids=np.asarray(a["class_ids"], dtype=np.int32),
            scores=np.asarray(a["scores"], dtype=np.float32),
            features=np.asarray(a["features"], dtype=np.float32),
            boxes=np.asarray(a["boxes"], dtype=np.float32),
            mask_ious=np.asarray(a["mask_ious"], dtype=np.float32),
            rle_h=np.asarray(a["rle_h"], dtype=np.uint32),
            rle_w=np.asarray(a["rle_w"], dtype=np.uint32),
            rle_blob=np.asarray(a["rle_blob"], dtype=np.uint8).tobytes(),
            rle_offsets=np.asarray(a["rle_offsets"], dtype=np.int64),
            img_ids=np.asarray(a["img_ids"]),
            img_w=np.asarray(a["img_w"], dtype=np.uint32),
            img_h=np.asarray(a["img_h"], dtype=np.uint32),
            img_files=np.asarray(a["img_files"]),
        )
