"""The one table of predicted masks: rows, concatenation, leaf order and npz storage."""

from __future__ import annotations

import io

import numpy as np
import pytest

from maskprop.data import coco
from maskprop.data.masks import MaskTable, pack_counts
from maskprop.errors import MaskpropError


def table(ids: list[str], images: list[str], seed: int = 0) -> MaskTable:
    rng = np.random.default_rng(seed)
    n = len(ids)
    masks = rng.random((n, 6, 5)) < 0.5
    blob, offsets = pack_counts(coco.encode_masks(masks))
    img_ids = sorted(set(images))
    return MaskTable(
        mask_ids=np.array(ids),
        image_ids=np.array(images),
        class_ids=np.zeros(n, np.int32),
        scores=rng.random(n).astype(np.float32),
        features=rng.random((n, 3)).astype(np.float32),
        boxes=rng.random((n, 4)).astype(np.float32),
        mask_ious=np.full(n, np.nan, np.float32),
        rle_h=np.full(n, 6, np.uint32),
        rle_w=np.full(n, 5, np.uint32),
        rle_blob=blob,
        rle_offsets=offsets,
        img_ids=np.array(img_ids),
        img_w=np.full(len(img_ids), 5, np.uint32),
        img_h=np.full(len(img_ids), 6, np.uint32),
        img_files=np.array([f"{i}.png" for i in img_ids]),
    )


def _masks(t: MaskTable) -> list[np.ndarray]:
    return [coco.decode_rle(6, 5, t.counts(i)) for i in range(len(t))]


def test_take_keeps_each_masks_rle_and_only_its_images():
    t = table(["a", "b", "c", "d"], ["i1", "i2", "i1", "i3"])
    part = t.take([3, 0])
    assert part.mask_ids.tolist() == ["d", "a"]
    assert part.img_ids.tolist() == ["i1", "i3"]
    assert [m.tolist() for m in _masks(part)] == [m.tolist() for m in np.array(_masks(t))[[3, 0]]]
    assert part.rles()[1] == t.rles()[0]
    assert len(t.take([])) == 0 and t.take([]).rle_blob == b""


def test_concat_then_by_mask_id_is_the_sorted_unique_leaf_order():
    first = table(["m3", "m1"], ["x", "y"], seed=1)
    again = table(["m2", "m3"], ["y", "z"], seed=2)
    merged = MaskTable.concat([first, again])
    assert len(merged) == 4 and merged.img_ids.tolist() == ["x", "y", "z"]
    leaves = merged.by_mask_id()
    assert leaves.mask_ids.tolist() == ["m1", "m2", "m3"]
    assert leaves.counts(2) == first.counts(0)  # the first copy of a repeated id wins
    assert leaves.scores.tolist() == [first.scores[1], again.scores[0], first.scores[0]]


def test_npz_round_trip_without_pickle_and_other_formats_refused():
    t = table(["a", "b"], ["i", "i"])
    buf = io.BytesIO()
    np.savez(buf, **t.to_arrays())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        back = MaskTable.from_arrays(dict(z))
    for name, value in t.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[name], value)
    old = {k: v for k, v in t.to_arrays().items() if k != "masks_format"}
    with pytest.raises(MaskpropError, match="mask table format 'none'"):
        MaskTable.from_arrays(old)


def test_columns_must_agree():
    t = table(["a", "b"], ["i", "i"])
    with pytest.raises(MaskpropError, match="scores has 1 rows"):
        MaskTable(**{**vars(t), "scores": t.scores[:1]})
    with pytest.raises(MaskpropError, match="rle_offsets"):
        MaskTable(**{**vars(t), "rle_blob": t.rle_blob + b"0"})
