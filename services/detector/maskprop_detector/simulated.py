"""A simulated detector: turns a simulated :class:`maskprop.simulate.pool.MaskPool` into the
``maskprop.masks`` events a real detector emits, so the services can run and be checked
end to end before (and without) a trained model.  Every mask gets a synthetic ellipse in a
64x64 image so RLEs, images and the COCO export are real."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray

from maskprop.simulate.pool import MaskPool
from maskprop_runtime import codec, topics
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


def ellipses(indices: NDArray[np.int64]) -> NDArray[np.bool_]:
    """bool[64, 64, n]: one ellipse per mask, placed and shaped by its pool index."""
    rng = np.random.default_rng(indices.astype(np.uint64) * 2654435761 % (2**32))
    n = indices.shape[0]
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    params = rng.uniform(size=(n, 4)) if n else np.zeros((0, 4))
    cy = 8 + params[:, 0] * (IMAGE_SIZE - 16)
    cx = 8 + params[:, 1] * (IMAGE_SIZE - 16)
    ry = 3 + params[:, 2] * 12
    rx = 3 + params[:, 3] * 12
    return (((yy[..., None] - cy) / ry) ** 2 + ((xx[..., None] - cx) / rx) ** 2) <= 1.0


def pool_events(
    pool: MaskPool, campaign: str, *, batch_size: int = 500
) -> Iterator[tuple[bytes, detector_pb2.MaskStreamEvent]]:
    """(key, event) pairs: each class's masks in batches, then its "closed" event."""
    dim = pool.features.shape[1]
    for c, name in enumerate(pool.class_names):
        idx = pool.class_indices(c)
        if idx.size == 0:
            continue
        key = topics.class_key(campaign, c)
        for b, lo in enumerate(range(0, idx.size, batch_size)):
            part = idx[lo : lo + batch_size]
            rles = codec.encode_masks(ellipses(part))
            ev = detector_pb2.MasksDetected(
                campaign=campaign, class_id=c, class_name=name, feature_dim=dim
            )
            seen: set[str] = set()
            for i, rle in zip(part.tolist(), rles, strict=True):
                ev.masks.append(
                    detector_pb2.DetectedMask(
                        mask_id=mask_id(i),
                        image_id=image_id(i),
                        rle=rle,
                        score=float(pool.scores[i]),
                        feature_f16=codec.pack_features(pool.features[i]),
                    )
                )
                if image_id(i) not in seen:
                    seen.add(image_id(i))
                    ev.images.append(
                        common_pb2.ImageInfo(
                            image_id=image_id(i),
                            width=IMAGE_SIZE,
                            height=IMAGE_SIZE,
                            file_name=f"images/{image_id(i)}.png",
                        )
                    )
            yield key, detector_pb2.MaskStreamEvent(event_id=f"masks.{campaign}.{c}.{b}", masks=ev)
        closed = detector_pb2.ClassBatchClosed(
            campaign=campaign, class_id=c, class_name=name, expected_masks=idx.size
        )
        yield key, detector_pb2.MaskStreamEvent(event_id=f"closed.{campaign}.{c}", closed=closed)


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
