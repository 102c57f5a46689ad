"""A simulated detector: turns a simulated :class:`maskprop.simulate.pool.MaskPool` into the
``maskprop.masks`` events a real detector emits, so the services can run and be checked
end to end before (and without) a trained model.  Every mask gets a synthetic ellipse in a
64x64 image so RLEs, images and the COCO export are real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from maskprop.simulate.pool import MaskPool
from maskprop_detector.events import closed_events, masks_events
from maskprop_runtime import codec
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2

IMAGE_SIZE = 64
MASKS_PER_IMAGE = 4


def mask_id(pool_index: int) -> str:
    return f"m{pool_index:09d}"


def image_id(pool_index: int) -> str:
    return f"img{pool_index // MASKS_PER_IMAGE:08d}"


def pool_index(mask_id_: str) -> int:
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


def pool_events(
    pool: MaskPool, campaign: str, *, batch_size: int = 500
) -> Iterator[tuple[bytes, detector_pb2.MaskStreamEvent]]:
    """(key, event) pairs: every class's masks in batches, then each class's "closed" event
    (the same events a real detector emits, through the same builder)."""
    n = len(pool)
    image_ids = [image_id(i) for i in range(n)]
    images = {
        img: common_pb2.ImageInfo(
            image_id=img, width=IMAGE_SIZE, height=IMAGE_SIZE, file_name=f"images/{img}.png"
        )
        for img in dict.fromkeys(image_ids)
    }
    yield from masks_events(
        campaign=campaign,
        class_names=pool.class_names,
        class_ids=pool.class_ids,
        mask_ids=[mask_id(i) for i in range(n)],
        image_ids=image_ids,
        scores=pool.scores,
        features=pool.features,
        encode=lambda idx: codec.encode_masks(ellipses(idx)),
        images=images,
        event_prefix=f"masks.{campaign}",
        batch_size=batch_size,
    )
    counts = np.bincount(pool.class_ids, minlength=len(pool.class_names))
    yield from closed_events(campaign, pool.class_names, dict(enumerate(counts.tolist())))


def wire_pool(pool: MaskPool) -> MaskPool:
    """The pool as the services see it after the wire: features rounded to float16, scores
    to float32.  In-process references must start from this to match the services exactly."""
    return MaskPool(
        features=pool.features.astype("<f2").astype(np.float32),
        scores=pool.scores.astype(np.float32),
        ious=pool.ious,
        class_ids=pool.class_ids,
        class_names=pool.class_names,
    )


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


def write_images(pool: MaskPool, root: Path, indices: NDArray[np.int64] | None = None) -> int:
    """PNG files ``root/images/<image_id>.png`` (the ImageInfo.file_name of the events)."""
    from PIL import Image

    idx = np.arange(len(pool)) if indices is None else indices
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = render_images(pool, idx)
    for img, pixels in images.items():
        Image.fromarray(pixels, "RGB").save(root / "images" / f"{img}.png")
    return len(images)
