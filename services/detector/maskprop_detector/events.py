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


#: Upper bounds of the serialized bytes of a ``DetectedMask`` without its strings, RLE
#: counts and feature bytes, and of a ``MaskStreamEvent`` wrapping a ``MasksDetected`` without
#: its strings (protobuf tags and varints at their widest).
MASK_BYTES = 64
HEADER_BYTES = 64


class OversizedMask(ValueError):
    """One mask's event would exceed the topic's limit even alone (an absurd RLE)."""


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
    max_bytes: int = topics.record_limit(),
    oversized: list[tuple[int, int]] | None = None,
) -> Iterator[Event]:
    """``MasksDetected`` events, per class in chunks of at most ``batch_size`` masks and
    ``max_bytes`` serialized bytes (:func:`maskprop_runtime.topics.record_limit` of the masks
    topic's ``max.message.bytes``).  Event ids are ``<event_prefix>.<class>.<chunk>``, and
    ``<event_prefix>.<class>.<chunk>.<part>`` for the further parts of a chunk cut by bytes:
    the same input always makes the same ids (dedup).  ``encode(indices)`` gives the masks'
    RLEs a chunk at a time, so a large pool is never rasterised all at once.

    A mask whose event would exceed ``max_bytes`` even alone is left out and recorded in
    ``oversized`` as ``(mask index, bytes)`` (the caller dead-letters it and leaves it out of
    the class's expected count); without ``oversized`` it raises :class:`OversizedMask`."""
    dim = int(features.shape[1])
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(np.asarray(class_ids) == c)
        header = HEADER_BYTES + len(event_prefix) + len(campaign) + len(name.encode())
        for b, lo in enumerate(range(0, idx.size, batch_size)):
            part = idx[lo : lo + batch_size]
            s = 0
            ev: detector_pb2.MasksDetected | None = None
            size = header
            seen: set[str] = set()
            for i, rle in zip(part.tolist(), encode(part), strict=True):
                mask_bytes = (
                    MASK_BYTES
                    + len(mask_ids[i].encode())
                    + len(image_ids[i].encode())
                    + len(rle.counts)
                    + 2 * dim
                )
                image_bytes = images[image_ids[i]].ByteSize() + 6
                alone = header + mask_bytes + image_bytes
                if alone > max_bytes:
                    if oversized is None:
                        raise OversizedMask(
                            f"mask {mask_ids[i]!r}: an event of {alone} bytes alone exceeds "
                            f"the topic's limit of {max_bytes}"
                        )
                    oversized.append((i, alone))
                    continue
                add = mask_bytes + (0 if image_ids[i] in seen else image_bytes)
                if ev is not None and size + add > max_bytes:
                    yield _masks_event(campaign, c, ev, f"{event_prefix}.{c}.{b}", s)
                    ev, s = None, s + 1
                if ev is None:
                    ev = detector_pb2.MasksDetected(
                        campaign=campaign, class_id=c, class_name=name, feature_dim=dim
                    )
                    size, seen = header, set()
                    add = mask_bytes + image_bytes
                ev.masks.append(
                    detector_pb2.DetectedMask(
                        mask_id=mask_ids[i],
                        image_id=image_ids[i],
                        rle=rle,
                        score=float(np.clip(scores[i], 0.0, 1.0)),
                        feature_f16=codec.pack_features(features[i]),
                    )
                )
                size += add
                if image_ids[i] not in seen:
                    seen.add(image_ids[i])
                    ev.images.append(images[image_ids[i]])
            if ev is not None:
                yield _masks_event(campaign, c, ev, f"{event_prefix}.{c}.{b}", s)


def _masks_event(
    campaign: str, class_id: int, ev: detector_pb2.MasksDetected, chunk_id: str, part: int
) -> Event:
    event_id = chunk_id if part == 0 else f"{chunk_id}.{part}"
    return (
        topics.class_key(campaign, class_id),
        detector_pb2.MaskStreamEvent(event_id=event_id, masks=ev),
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
