"""maskprop_runtime.pbcols: each column encoder against protobuf's own serializer."""

from __future__ import annotations

import numpy as np
import pytest

from maskprop_runtime import pbcols
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**32 - 1, 2**63 + 5])
def test_varints_match_protobuf(value: int) -> None:
    data, lens = pbcols.uint_field(7, np.array([value, 1, value], np.uint64))
    ref = [search_pb2.PropagatedLabel(node=v).SerializeToString() for v in (value, 1, value)]
    assert data.tobytes() == b"".join(ref) and lens.tolist() == [len(r) for r in ref]
    assert pbcols.varint_lengths(np.array([value], np.uint64)).tolist() == [
        len(pbcols.varint(value))
    ]


def test_strings_floats_and_messages_match_protobuf() -> None:
    names = np.array(["", "a", "été", "x" * 130, "tab\tand space "])
    scores = np.array([0.0, -0.0, 0.5, np.nan, 1e-30], np.float32)
    has_rle = np.array([True, True, True, False, True])  # row 3: no sub-message, no fields
    heights, widths = [0, 5, 480, 0, 1], [0, 0, 640, 0, 1]
    counts = [b"", b"\x00\x01", b"z" * 200, b"", b""]
    rle = [
        pbcols.uint_field(1, np.array(heights)),
        pbcols.uint_field(2, np.array(widths)),
        pbcols.length_head(3, np.array([len(c) for c in counts])),
        (np.frombuffer(b"".join(counts), np.uint8), np.array([len(c) for c in counts])),
    ]
    parts = [
        *pbcols.string_field(1, names),
        pbcols.length_head(5, pbcols.row_lens(rle), present=has_rle),
        *rle,
        pbcols.float_field(6, scores),
    ]
    data, lens = pbcols.assemble(parts)
    at = np.concatenate([[0], np.cumsum(lens)])
    for i in range(len(names)):
        msg = search_pb2.PropagatedLabel(mask_id=str(names[i]), score=float(scores[i]))
        if has_rle[i]:  # set, even where all its fields are zero (row 0: written empty)
            msg.rle.CopyFrom(
                common_pb2.RleMask(height=heights[i], width=widths[i], counts=counts[i])
            )
        assert data[at[i] : at[i + 1]].tobytes() == msg.SerializeToString(), i


def test_gather_takes_slices_in_row_order() -> None:
    blob = np.frombuffer(b"abcdefghij", np.uint8)
    data, lens = pbcols.gather(blob, np.array([3, 0, 9, 5]), np.array([2, 0, 1, 3]))
    assert data.tobytes() == b"de" + b"j" + b"fgh" and lens.tolist() == [2, 0, 1, 3]
    assert pbcols.gather(blob, np.array([1]), np.array([0]))[0].size == 0


def test_only_one_byte_keys() -> None:
    with pytest.raises(ValueError):
        pbcols.uint_field(16, np.array([1]))


def test_negative_integers_are_refused() -> None:
    with pytest.raises(ValueError):
        pbcols.uint_field(3, np.array([1, -1]))
