"""Detections -> ``maskprop.masks`` events (the wire contract of the services): one
``MasksDetected`` per class and chunk, then ``ClassBatchClosed`` with the class's total.
Used by the detector service and by ``maskprop demo``; no torch here."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

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
    rles: Sequence[Mapping[str, Any]],
    images: Mapping[str, common_pb2.ImageInfo],
    event_prefix: str,
    batch_size: int = 500,
) -> Iterator[Event]:
    """``MasksDetected`` events, per class in chunks of ``batch_size`` masks.  Event ids are
    ``<event_prefix>.<class>.<chunk>``: the same input always makes the same ids (dedup)."""
    dim = int(features.shape[1])
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(np.asarray(class_ids) == c)
        for b, lo in enumerate(range(0, idx.size, batch_size)):
            ev = detector_pb2.MasksDetected(
                campaign=campaign, class_id=c, class_name=name, feature_dim=dim
            )
            seen: set[str] = set()
            for i in idx[lo : lo + batch_size].tolist():
                rle = rles[i]
                ev.masks.append(
                    detector_pb2.DetectedMask(
                        mask_id=mask_ids[i],
                        image_id=image_ids[i],
                        rle=common_pb2.RleMask(
                            height=int(rle["size"][0]),
                            width=int(rle["size"][1]),
                            counts=str(rle["counts"]).encode("ascii"),
                        ),
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
