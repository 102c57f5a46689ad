"""Wire encodings: features as packed float16, masks as COCO compressed RLE (the codec is
:mod:`maskprop.data.coco`; this module only maps it to the protos)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from maskprop.data import coco
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2


def pack_features(f: NDArray[np.floating]) -> bytes:
    """float[d] -> little-endian float16 bytes."""
    return np.asarray(f, dtype="<f2").tobytes()


def unpack_features(data: bytes, dim: int) -> NDArray[np.float32]:
    a = np.frombuffer(data, dtype="<f2")
    if a.shape != (dim,):
        raise ValueError(f"feature has {a.size} values, expected {dim}")
    return a.astype(np.float32)


def encode_masks(masks: NDArray[np.bool_]) -> list[common_pb2.RleMask]:
    """bool[h, w, n] -> one RleMask per mask (:func:`maskprop.data.coco.encode_masks`)."""
    h, w = int(masks.shape[0]), int(masks.shape[1])
    return [
        common_pb2.RleMask(height=h, width=w, counts=counts)
        for counts in coco.encode_masks(np.moveaxis(masks, -1, 0))
    ]


def rle_to_coco(rle: common_pb2.RleMask) -> dict[str, object]:
    """RleMask -> the JSON form of a COCO segmentation (counts as ASCII)."""
    return {"size": [rle.height, rle.width], "counts": rle.counts.decode("ascii")}
