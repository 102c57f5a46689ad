"""Wire encodings: features as packed float16, masks as COCO compressed RLE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pycocotools import mask as mask_utils

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
    """bool[h, w, n] -> one RleMask per mask (pycocotools wants Fortran-ordered uint8)."""
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8)))
    return [
        common_pb2.RleMask(height=r["size"][0], width=r["size"][1], counts=r["counts"])
        for r in rles
    ]


def decode_mask(rle: common_pb2.RleMask) -> NDArray[np.uint8]:
    """RleMask -> uint8[h, w]."""
    return mask_utils.decode({"size": [rle.height, rle.width], "counts": rle.counts})


def rle_from_coco(rle: Mapping[str, Any]) -> common_pb2.RleMask:
    """The JSON form of a COCO segmentation (``size``, ASCII ``counts``) -> RleMask."""
    counts = rle["counts"]
    return common_pb2.RleMask(
        height=int(rle["size"][0]),
        width=int(rle["size"][1]),
        counts=counts.encode("ascii") if isinstance(counts, str) else bytes(counts),
    )


def rle_to_coco(rle: common_pb2.RleMask) -> dict[str, object]:
    """RleMask -> the JSON form of a COCO segmentation (counts as ASCII)."""
    return {"size": [rle.height, rle.width], "counts": rle.counts.decode("ascii")}
