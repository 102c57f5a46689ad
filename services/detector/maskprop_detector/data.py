"""COCO instances in, training tensors out.

A :class:`LabelledSet` is a COCO document (images, annotations with RLE, categories) plus the
folder its ``file_name``s are relative to.  Images are read from under that folder only: a
``file_name`` that resolves outside it is refused (path traversal), and nothing is ever
fetched from a URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.ops import masks_to_boxes

from maskprop.data import coco
from maskprop.errors import MaskpropError
from maskprop_runtime.files import resolve_under


@dataclass
class LabelledSet:
    """COCO ``images``/``annotations``/``categories`` with the image folder."""

    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    image_root: Path
    _by_image: dict[int, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_coco(cls, path: Path, image_root: Path) -> LabelledSet:
        images, anns, cats = coco.load_coco_instances(path)
        return cls(images, anns, cats, Path(image_root))

    def __post_init__(self) -> None:
        self._by_image = {}
        for ann in self.annotations:
            self._by_image.setdefault(int(ann["image_id"]), []).append(ann)

    def annotations_of(self, image_id: int) -> list[dict[str, Any]]:
        return self._by_image.get(image_id, [])

    def doc(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }

    def labels_by_category(self, classes: Sequence[str]) -> dict[int, int]:
        """COCO category id -> model label (1-based index into ``classes``)."""
        index = {name: k + 1 for k, name in enumerate(classes)}
        out = {}
        for cat in self.categories:
            if cat["name"] not in index:
                raise MaskpropError(
                    f"category {cat['name']!r} is not one of the detector's classes "
                    f"({', '.join(classes)})"
                )
            out[int(cat["id"])] = index[cat["name"]]
        return out


def read_image(root: Path, file_name: str) -> NDArray[np.uint8]:
    """uint8[h, w, 3] RGB of ``root / file_name``; refuses paths that leave ``root``."""
    path = resolve_under(root, file_name)
    if path is None:
        raise MaskpropError(f"image path {file_name!r} leaves the image folder {root}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise MaskpropError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise MaskpropError(f"cannot read image {path}: {exc}") from None


def to_tensor(image: NDArray[np.uint8]) -> Tensor:
    """float32[3, h, w] in [0, 1]."""
    return (
        torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        .permute(2, 0, 1)
        .float()
        .div_(255.0)
    )


# An annotation with this key set is an "ignore" region (a box, no mask): an object the
# retraining loop detected but did not get a verified label for.  Training neither rewards
# nor penalises detections there, so partially labelled pool images do not teach the model
# that unlabelled objects are background.
IGNORE = "maskprop_ignore"
# An annotation with this key set teaches the box and class heads but not the mask head.
BOX_ONLY = "maskprop_box_only"
# An image with this key set is partially labelled (propagated labels cover some of its objects):
# training teaches its labelled objects and never its background (the torchvision backend).
PARTIAL = "maskprop_partial"


class InstanceDataset(torch.utils.data.Dataset[tuple[Tensor, dict[str, Tensor]]]):
    """(image float[3, h, w], target) pairs in torchvision's detection format: ``boxes``
    float[n, 4] (x1, y1, x2, y2), ``labels`` int64[n] (1-based), ``masks`` uint8[n, h, w].
    Images are decoded once and kept in memory (the labelled sets here are small).
    Annotations marked :data:`IGNORE` become boxes with label -1 and an empty mask.
    ``flip`` mirrors half of the samples left-right (training augmentation)."""

    def __init__(self, data: LabelledSet, classes: Sequence[str], *, flip: bool = False) -> None:
        self.data = data
        self.flip = flip
        self.label_of = data.labels_by_category(classes)
        self._cache: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}
        self._rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.data.images)

    def _load(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        img = self.data.images[i]
        pixels = read_image(self.data.image_root, img["file_name"])
        h, w = pixels.shape[:2]
        if (h, w) != (img["height"], img["width"]):
            raise MaskpropError(
                f"image {img['file_name']} is {w}x{h}, the COCO file says "
                f"{img['width']}x{img['height']}"
            )
        anns = [a for a in self.data.annotations_of(int(img["id"])) if not a.get("iscrowd", 0)]
        ignore = [a for a in anns if a.get(IGNORE)]
        anns = [a for a in anns if not a.get(IGNORE)]
        if anns:
            # Validated when the set was loaded: each RLE is of its image's size.
            decoded = [coco.decode_rle(h, w, a["segmentation"]["counts"]) for a in anns]
            masks = torch.from_numpy(np.stack(decoded).astype(np.uint8))
            keep = masks.flatten(1).any(dim=1).bool()
            masks = masks[keep]
            labels = torch.tensor(
                [self.label_of[int(a["category_id"])] for a in anns], dtype=torch.int64
            )[keep]
            boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
            mask_valid = torch.tensor([not a.get(BOX_ONLY) for a in anns], dtype=torch.bool)[keep]
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
            labels = torch.zeros(0, dtype=torch.int64)
            boxes = torch.zeros((0, 4), dtype=torch.float32)
            mask_valid = torch.zeros(0, dtype=torch.bool)
        if ignore:
            # Label -1: proposals matched to these boxes are neither positives nor negatives
            # (torchvision's sampler skips them); the RPN still learns them as objects.
            xywh = torch.tensor([a["bbox"] for a in ignore], dtype=torch.float32)
            ign = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
            ok = (ign[:, 2] > ign[:, 0]) & (ign[:, 3] > ign[:, 1])
            boxes = torch.cat([boxes, ign[ok]])
            labels = torch.cat([labels, torch.full((int(ok.sum()),), -1, dtype=torch.int64)])
            masks = torch.cat([masks, torch.zeros((int(ok.sum()), h, w), dtype=torch.uint8)])
            mask_valid = torch.cat([mask_valid, torch.zeros(int(ok.sum()), dtype=torch.bool)])
        target = {"boxes": boxes, "labels": labels, "masks": masks}
        if img.get(PARTIAL):
            target["partial"] = torch.ones((), dtype=torch.bool)
        if not bool(mask_valid.all()):
            target["mask_valid"] = mask_valid
        return to_tensor(pixels), target

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        if i not in self._cache:
            self._cache[i] = self._load(i)
        image, target = self._cache[i]
        if self.flip and self._rng.random() < 0.5:
            w = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}
        return image, target


def propagated_set(
    images: Sequence[dict[str, Any]],
    image_root: Path,
    categories: Sequence[dict[str, Any]],
    accepted: Sequence[dict[str, Any]],
    ignore: Sequence[dict[str, Any]] = (),
    *,
    masks: bool = False,
    partial: bool = False,
) -> LabelledSet:
    """The retraining loop's extra labelled set (paper Sec. 5.1): the images of ``images`` that
    hold an ``accepted`` mask, with those masks (box and class only unless ``masks``) and the
    ``ignore`` regions (annotations carrying :data:`IGNORE` and a ``bbox``) on them; with
    ``partial`` the images are marked :data:`PARTIAL` (no background taught there)."""
    used = {int(a["image_id"]) for a in accepted}
    marks = {} if masks else {BOX_ONLY: True}
    flag = {PARTIAL: True} if partial else {}
    return LabelledSet(
        images=[dict(im, **flag) for im in images if int(im["id"]) in used],
        annotations=[dict(a, id=10_000_000 + i, **marks) for i, a in enumerate(accepted)]
        + [dict(a, id=20_000_000 + i) for i, a in enumerate(ignore) if int(a["image_id"]) in used],
        categories=list(categories),
        image_root=image_root,
    )


def mixed_training_set(
    labelled: LabelledSet, extra: LabelledSet, classes: Sequence[str]
) -> torch.utils.data.Dataset[tuple[Tensor, dict[str, Tensor]]]:
    """``labelled`` repeated to the size of ``extra``, then ``extra``: about half of every
    shuffled batch comes from the human-labelled set, however many images propagation added."""
    base = InstanceDataset(labelled, classes, flip=True)
    if not extra.images:
        return base
    repeat = max(1, round(len(extra.images) / max(len(labelled.images), 1)))
    return torch.utils.data.ConcatDataset(
        [base] * repeat + [InstanceDataset(extra, classes, flip=True)]
    )
