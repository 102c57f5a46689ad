"""Where the clusterer keeps incoming masks and the trees it builds, and where the search
service reads them: a directory (a mounted volume on Kubernetes).  Files are npz written
atomically (temp file + rename) and read with ``allow_pickle=False``."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from maskprop.tree import Tree
from maskprop_runtime.files import atomic_file

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Campaign names and event ids become path parts: allow a safe alphabet only."""
    if not _SAFE.match(value) or value in (".", ".."):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class MaskTable:
    """The masks of one class, in tree leaf order (sorted by mask id).

    mask_ids, image_ids : str[n]; scores : float32[n]; features : float32[n, d];
    rle_h, rle_w : uint32[n]; rle_counts : the COCO counts of mask i are
    ``rle_blob[rle_offsets[i]:rle_offsets[i + 1]]``; images : image_id, width, height,
    file_name columns of the images the masks refer to.
    """

    mask_ids: NDArray[np.str_]
    image_ids: NDArray[np.str_]
    scores: NDArray[np.float32]
    features: NDArray[np.float32]
    rle_h: NDArray[np.uint32]
    rle_w: NDArray[np.uint32]
    rle_blob: bytes
    rle_offsets: NDArray[np.int64]
    img_ids: NDArray[np.str_]
    img_w: NDArray[np.uint32]
    img_h: NDArray[np.uint32]
    img_files: NDArray[np.str_]

    def __len__(self) -> int:
        return int(self.mask_ids.shape[0])

    def counts(self, i: int) -> bytes:
        return self.rle_blob[int(self.rle_offsets[i]) : int(self.rle_offsets[i + 1])]

    def to_arrays(self) -> dict[str, NDArray[np.generic]]:
        return {
            "mask_ids": self.mask_ids,
            "image_ids": self.image_ids,
            "scores": self.scores,
            "features": self.features,
            "rle_h": self.rle_h,
            "rle_w": self.rle_w,
            "rle_blob": np.frombuffer(self.rle_blob, dtype=np.uint8),
            "rle_offsets": self.rle_offsets,
            "img_ids": self.img_ids,
            "img_w": self.img_w,
            "img_h": self.img_h,
            "img_files": self.img_files,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, NDArray[np.generic]]) -> MaskTable:
        return cls(
            mask_ids=np.asarray(a["mask_ids"]),
            image_ids=np.asarray(a["image_ids"]),
            scores=np.asarray(a["scores"], dtype=np.float32),
            features=np.asarray(a["features"], dtype=np.float32),
            rle_h=np.asarray(a["rle_h"], dtype=np.uint32),
            rle_w=np.asarray(a["rle_w"], dtype=np.uint32),
            rle_blob=np.asarray(a["rle_blob"], dtype=np.uint8).tobytes(),
            rle_offsets=np.asarray(a["rle_offsets"], dtype=np.int64),
            img_ids=np.asarray(a["img_ids"]),
            img_w=np.asarray(a["img_w"], dtype=np.uint32),
            img_h=np.asarray(a["img_h"], dtype=np.uint32),
            img_files=np.asarray(a["img_files"]),
        )

    @classmethod
    def concat(cls, parts: list[MaskTable]) -> MaskTable:
        """Merge batches, drop repeated mask ids, sort by mask id (a stable leaf order)."""
        mask_ids = np.concatenate([p.mask_ids for p in parts])
        _, first = np.unique(mask_ids, return_index=True)  # sorted unique ids
        blob = b"".join(p.rle_blob for p in parts)
        starts = np.concatenate(
            [p.rle_offsets[:-1] + off for p, off in zip(parts, _offsets(parts), strict=True)]
        )
        lengths = np.concatenate([np.diff(p.rle_offsets) for p in parts])
        pieces = [blob[s : s + n] for s, n in zip(starts[first], lengths[first], strict=True)]
        img_ids = np.concatenate([p.img_ids for p in parts])
        _, img_first = np.unique(img_ids, return_index=True)
        return cls(
            mask_ids=mask_ids[first],
            image_ids=np.concatenate([p.image_ids for p in parts])[first],
            scores=np.concatenate([p.scores for p in parts])[first],
            features=np.concatenate([p.features for p in parts])[first],
            rle_h=np.concatenate([p.rle_h for p in parts])[first],
            rle_w=np.concatenate([p.rle_w for p in parts])[first],
            rle_blob=b"".join(pieces),
            rle_offsets=np.concatenate(([0], np.cumsum([len(x) for x in pieces]))).astype(np.int64),
            img_ids=img_ids[img_first],
            img_w=np.concatenate([p.img_w for p in parts])[img_first],
            img_h=np.concatenate([p.img_h for p in parts])[img_first],
            img_files=np.concatenate([p.img_files for p in parts])[img_first],
        )


def _offsets(parts: list[MaskTable]) -> list[int]:
    out, acc = [], 0
    for p in parts:
        out.append(acc)
        acc += len(p.rle_blob)
    return out


def _atomic_savez(path: Path, arrays: dict[str, NDArray[np.generic]]) -> str:
    with atomic_file(path) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TreeStore:
    """``root/<campaign>/<class_id>/batches/<event_id>.npz`` and ``.../tree.npz``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _class_dir(self, campaign: str, class_id: int) -> Path:
        return self.root / check_name("campaign", campaign) / str(int(class_id))

    def put_batch(self, campaign: str, class_id: int, event_id: str, table: MaskTable) -> None:
        path = (
            self._class_dir(campaign, class_id) / "batches" / f"{check_name('event', event_id)}.npz"
        )
        _atomic_savez(path, table.to_arrays())

    def read_batches(self, campaign: str, class_id: int) -> MaskTable | None:
        folder = self._class_dir(campaign, class_id) / "batches"
        files = sorted(folder.glob("*.npz")) if folder.exists() else []
        if not files:
            return None
        parts = []
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                parts.append(MaskTable.from_arrays(dict(z)))
        return MaskTable.concat(parts)

    def tree_path(self, campaign: str, class_id: int) -> Path:
        return self._class_dir(campaign, class_id) / "tree.npz"

    def put_tree(
        self, campaign: str, class_id: int, class_name: str, tree: Tree, table: MaskTable
    ) -> tuple[Path, str]:
        """Store the tree with its mask table; returns (path, sha256)."""
        path = self.tree_path(campaign, class_id)
        arrays: dict[str, NDArray[np.generic]] = {
            **{f"tree_{k}": v for k, v in tree.to_arrays().items()},
            **table.to_arrays(),
            "class_name": np.array(class_name),
        }
        return path, _atomic_savez(path, arrays)

    @staticmethod
    def load_tree(path: Path) -> tuple[Tree, MaskTable, str]:
        with np.load(path, allow_pickle=False) as z:
            a = dict(z)
        tree = Tree.from_arrays({"linkage": a["tree_linkage"], "scores": a["tree_scores"]})
        return tree, MaskTable.from_arrays(a), str(a["class_name"])
