"""Masks -> ``maskprop.masks`` events (the wire contract of the services): one
``MasksDetected`` per class and chunk, then ``ClassBatchClosed`` with the class's total.
Used by the detector service, ``maskprop demo`` and the simulated detector; no torch here."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from maskprop.data.masks import MaskTable
from maskprop_runtime import codec, topics
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2

Event = tuple[bytes, detector_pb2.MaskStreamEvent]


def masks_events(
    *,
    campaign: str,
    class_names: Sequence[str],
    class_ids: NDArray[np.integer],
    mask_ids: Sequence[str],
    image_ids: Sequence[str],
    scores: NDArray[np.floating],
    features: NDArray[np.floating],
    encode: Callable[[NDArray[np.int64]], Sequence[common_pb2.RleMask]],
    images: Mapping[str, common_pb2.ImageInfo],
    event_prefix: str,
    batch_size: int = 500,
) -> Iterator[Event]:
    """``MasksDetected`` events, per class in chunks of ``batch_size`` masks.  Event ids are
    ``<event_prefix>.<class>.<chunk>``: the same input always makes the same ids (dedup).
    ``encode(indices)`` gives the masks' RLEs a chunk at a time, so a large pool is never
    rasterised all at once."""
    dim = int(features.shape[1])
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(np.asarray(class_ids) == c)
        for b, lo in enumerate(range(0, idx.size, batch_size)):
            ev = detector_pb2.MasksDetected(
                campaign=campaign, class_id=c, class_name=name, feature_dim=dim
            )
            seen: set[str] = set()
            part = idx[lo : lo + batch_size]
            for i, rle in zip(part.tolist(), encode(part), strict=True):
                ev.masks.append(
                    detector_pb2.DetectedMask(
                        mask_id=mask_ids[i],
                        image_id=image_ids[i],
                        rle=rle,
                        score=float(np.clip(scores[i], 0.0, 1.0)),
                        feature_f16=codec.pack_features(features[i]),
                    )
                )
                if image_ids[i] not in seen:
                    seen.add(image_ids[i])
                    ev.images.append(images[image_ids[i]])
            yield (
                topics.class_key(campaign, c),
                detector_pb2.MaskStreamEvent(event_id=f"{event_prefix}.{c}.{b}", masks=ev),
            )


def table_encoder(table: MaskTable) -> Callable[[NDArray[np.int64]], list[common_pb2.RleMask]]:
    """``encode`` for :func:`masks_events` from a mask table (the detector's output): the
    stored counts, never re-encoded."""
    return lambda idx: [
        common_pb2.RleMask(
            height=int(table.rle_h[i]), width=int(table.rle_w[i]), counts=table.counts(i)
        )
        for i in idx.tolist()
    ]


def closed_events(
    campaign: str, class_names: Sequence[str], counts: Mapping[int, int]
) -> Iterator[Event]:
    """``ClassBatchClosed`` for every class that has masks (a class with none has no tree)."""
    for c, name in enumerate(class_names):
        n = int(counts.get(c, 0))
        if n:
            closed = detector_pb2.ClassBatchClosed(
                campaign=campaign, class_id=c, class_name=name, expected_masks=n
            )
            yield (
                topics.class_key(campaign, c),
                detector_pb2.MaskStreamEvent(event_id=f"closed.{campaign}.{c}", closed=closed),
            )
