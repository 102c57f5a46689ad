"""``maskprop.masks`` events cut by serialized bytes (issue #15): no event over the limit,
every mask exactly once, deterministic ids, an absurd mask reported instead of blocking."""

from __future__ import annotations

import numpy as np
import pytest
from maskprop_detector.events import OversizedMask, masks_events

from maskprop_runtime import topics
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2


def _inputs(sizes: list[int], n_classes: int = 2, dim: int = 16) -> dict:
    n = len(sizes)
    rng = np.random.default_rng(0)
    image_ids = [f"img{i % 7}" for i in range(n)]
    return {
        "campaign": "c1",
        "class_names": [f"class{c}" for c in range(n_classes)],
        "class_ids": np.arange(n) % n_classes,
        "mask_ids": [f"mask-{i:05d}" for i in range(n)],
        "image_ids": image_ids,
        "scores": rng.uniform(size=n),
        "features": rng.normal(size=(n, dim)),
        "encode": lambda idx: [
            common_pb2.RleMask(height=480, width=640, counts=b"a" * sizes[i]) for i in idx.tolist()
        ],
        "images": {
            im: common_pb2.ImageInfo(image_id=im, width=640, height=480, file_name=f"x/{im}.jpg")
            for im in dict.fromkeys(image_ids)
        },
        "event_prefix": "masks.c1.0",
    }


def test_no_event_over_the_limit_and_every_mask_once() -> None:
    sizes = np.random.default_rng(1).integers(100, 6000, 500).tolist()
    events = list(masks_events(**_inputs(sizes), batch_size=200, max_bytes=30_000))
    assert max(ev.ByteSize() for _k, ev in events) <= 30_000
    masks = [m for _k, ev in events for m in ev.masks.masks]
    assert sorted(m.mask_id for m in masks) == [f"mask-{i:05d}" for i in range(500)]
    ids = [ev.event_id for _k, ev in events]
    assert len(set(ids)) == len(ids) and "masks.c1.0.0.0" in ids and "masks.c1.0.0.1" in ids
    for key, ev in events:
        assert key == topics.class_key("c1", ev.masks.class_id)
        assert {im.image_id for im in ev.masks.images} == {m.image_id for m in ev.masks.masks}
    again = list(masks_events(**_inputs(sizes), batch_size=200, max_bytes=30_000))
    assert [e.SerializeToString() for _k, e in again] == [e.SerializeToString() for _k, e in events]


def test_small_masks_keep_one_event_per_chunk_with_the_old_ids() -> None:
    events = list(masks_events(**_inputs([50] * 40), batch_size=10))
    assert [ev.event_id for _k, ev in events] == [
        f"masks.c1.0.{c}.{b}" for c in (0, 1) for b in (0, 1)
    ]
    assert max(ev.ByteSize() for _k, ev in events) <= topics.record_limit()


def test_a_mask_too_large_for_any_event_is_reported_not_sent() -> None:
    sizes = [300] * 20
    sizes[6] = 100_000
    with pytest.raises(OversizedMask, match="mask-00006"):
        list(masks_events(**_inputs(sizes), max_bytes=20_000))
    oversized: list[tuple[int, int]] = []
    events = list(masks_events(**_inputs(sizes), max_bytes=20_000, oversized=oversized))
    assert [i for i, _size in oversized] == [6] and oversized[0][1] > 100_000
    sent = sorted(m.mask_id for _k, ev in events for m in ev.masks.masks)
    assert sent == [f"mask-{i:05d}" for i in range(20) if i != 6]
    assert max(ev.ByteSize() for _k, ev in events) <= 20_000
