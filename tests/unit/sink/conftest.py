"""Hand-built LabelsPropagated events with real RLEs (``maskprop_runtime.codec``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from maskprop_sink.dataset import DatasetWriter

from maskprop_runtime import codec
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2

H, W = 6, 8
CLASS_MASKS = 100  # every class's tree size: mask ``m<class>-<i>`` has mask_index i


@dataclass
class Built:
    event: search_pb2.LabelsPropagated
    masks: dict[str, np.ndarray]  # mask_id -> uint8[H, W]


def mask_for(class_id: int, i: int) -> np.ndarray:
    """A non-empty random mask that depends only on (class_id, i): redelivery is identical."""
    m = np.random.default_rng([class_id, i]).random((H, W)) < 0.4
    m[i % H, i % W] = True
    return m


def build_event(
    *,
    campaign: str = "demo",
    class_id: int = 0,
    class_name: str = "cat",
    node: int = 1,
    outcome: str = "accept",
    n: int = 3,
    first: int = 0,
    accepted: bool | Sequence[bool] = True,
    n_images: int = 2,
) -> Built:
    """Labels ``m<class_id>-<i>`` (mask_index i) for i in [first, first + n) on images
    ``img<i % n_images>``; even i are verified, odd i propagated."""
    ids = list(range(first, first + n))
    acc = [accepted] * n if isinstance(accepted, bool) else list(accepted)
    masks = np.stack([mask_for(class_id, i) for i in ids], axis=-1)
    rles = codec.encode_masks(masks)
    ev = search_pb2.LabelsPropagated(
        event_id=f"{campaign}/{class_id}/{node}",
        campaign=campaign,
        class_id=class_id,
        class_name=class_name,
        class_masks=CLASS_MASKS,
    )
    out: dict[str, np.ndarray] = {}
    images: set[str] = set()
    for j, i in enumerate(ids):
        mask_id, image_id = f"m{class_id}-{i}", f"img{i % n_images}"
        source = (
            search_pb2.LABEL_SOURCE_VERIFIED if i % 2 == 0 else search_pb2.LABEL_SOURCE_PROPAGATED
        )
        ev.labels.add(
            mask_id=mask_id,
            image_id=image_id,
            accepted=acc[j],
            source=source,
            rle=rles[j],
            score=0.5 + 0.01 * i,
            node=node,
            outcome=outcome,
            yes=3,
            answered=4,
            mask_index=i,
        )
        out[mask_id] = masks[..., j].astype(np.uint8)
        images.add(image_id)
    for image_id in sorted(images):
        # img0 has no file name: the COCO export falls back to the image id.
        file_name = "" if image_id == "img0" else f"images/{image_id}.jpg"
        ev.images.append(
            common_pb2.ImageInfo(image_id=image_id, width=W, height=H, file_name=file_name)
        )
    return Built(ev, out)


@pytest.fixture
def make_event() -> Callable[..., Built]:
    return build_event


@pytest.fixture
def dataset(tmp_path: Path, make_event: Any) -> tuple[Path, dict[str, np.ndarray]]:
    """Campaign "shapes": round 1 has m0-0..m0-3 (m0-1 rejected); round 2 ("shapes.r2", the
    pool detected again) has m0-2..m0-5, where m0-2 and m0-3 are round 1's masks again;
    another campaign "other" shares the dataset."""
    r1 = make_event(campaign="shapes", n=4, accepted=[True, False, True, True])
    r2 = make_event(campaign="shapes.r2", first=2, n=4)
    other = make_event(campaign="other", n=2, class_id=1, class_name="dog")
    root = tmp_path / "dataset"
    with DatasetWriter(root) as w:
        w.write(r1.event, 0)
        w.write(r2.event, 1)
        w.write(other.event, 0)
    return root, {**r1.masks, **r2.masks}
