"""Scenes for a simulated pool: every mask of a :class:`~maskprop.simulate.pool.MaskPool` gets
an ellipse in a 64x64 image, shaped by its pool index alone, so the simulated detector, the
simulated crowd and the tests see the same pixels for the same mask.  Pure numpy.

Ids: mask ``i`` of the pool is ``mask_id(i)`` (``m000000012``) and lies in image
``image_id(i)``, ``MASKS_PER_IMAGE`` consecutive masks per image.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from maskprop.simulate.pool import MaskPool

IMAGE_SIZE = 64
MASKS_PER_IMAGE = 4


def mask_id(pool_index: int) -> str:
    """The wire id of pool mask ``pool_index``."""
    return f"m{pool_index:09d}"


def image_id(pool_index: int) -> str:
    """The id of the image pool mask ``pool_index`` lies in."""
    return f"img{pool_index // MASKS_PER_IMAGE:08d}"


def pool_index(mask_id_: str) -> int:
    """The pool index of a :func:`mask_id`."""
    return int(mask_id_[1:])


def _uniforms(indices: NDArray[np.int64], k: int) -> NDArray[np.float64]:
    """float64[n, k] in [0, 1) that depend on each index alone (splitmix64 hashing), so a
    mask's shape is the same whichever batch it travels in."""
    x: NDArray[np.uint64] = (
        indices.astype(np.uint64)[:, None] * np.uint64(k) + np.arange(k, dtype=np.uint64)
    ).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    top: NDArray[np.uint64] = x >> np.uint64(11)
    return top.astype(np.float64) / float(2**53)


def ellipses(indices: NDArray[np.int64]) -> NDArray[np.bool_]:
    """bool[64, 64, n]: one ellipse per mask, placed and shaped by its pool index alone."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    params = _uniforms(np.asarray(indices, dtype=np.int64), 4)
    cy = 8 + params[:, 0] * (IMAGE_SIZE - 16)
    cx = 8 + params[:, 1] * (IMAGE_SIZE - 16)
    ry = 3 + params[:, 2] * 12
    rx = 3 + params[:, 3] * 12
    return (((yy[..., None] - cy) / ry) ** 2 + ((xx[..., None] - cx) / rx) ** 2) <= 1.0


def render_images(pool: MaskPool, indices: NDArray[np.int64]) -> dict[str, NDArray[np.uint8]]:
    """uint8[64, 64, 3] per image id covering ``indices``: textured background, each mask's
    ellipse painted in its class colour, so the annotator page has something real to show."""
    palette = np.random.default_rng(7).integers(40, 255, size=(len(pool.class_names), 3))
    by_image: dict[str, list[int]] = {}
    for i in indices.tolist():
        by_image.setdefault(image_id(i), []).append(i)
    out = {}
    for img, members in by_image.items():
        rng = np.random.default_rng(int(img[3:]))
        canvas = rng.integers(60, 110, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
        first = (int(img[3:]) * MASKS_PER_IMAGE) if img.startswith("img") else members[0]
        all_members = np.arange(first, first + MASKS_PER_IMAGE)
        all_members = all_members[all_members < len(pool)]
        shapes = ellipses(all_members)
        for k, i in enumerate(all_members.tolist()):
            canvas[shapes[..., k]] = palette[pool.class_ids[i]]
        out[img] = canvas
    return out
