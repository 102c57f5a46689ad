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
from maskprop.simulate.scenes import IMAGE_SIZE, ellipses, image_id, mask_id, render_images
from maskprop_detector.events import closed_events, masks_events
from maskprop_runtime import codec
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2


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


def write_images(pool: MaskPool, root: Path, indices: NDArray[np.int64] | None = None) -> int:
    """PNG files ``root/images/<image_id>.png`` (the ImageInfo.file_name of the events)."""
    from PIL import Image

    idx = np.arange(len(pool)) if indices is None else indices
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = render_images(pool, idx)
    for img, pixels in images.items():
        Image.fromarray(pixels, "RGB").save(root / "images" / f"{img}.png")
    return len(images)
