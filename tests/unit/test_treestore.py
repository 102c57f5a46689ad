"""The tree store: batches merge into the leaf order, trees round-trip, and files of another
format are refused with a reason (never half-read)."""

from __future__ import annotations

import numpy as np
import pytest

from maskprop.data import coco
from maskprop.data.masks import MaskTable, pack_counts
from maskprop.tree import build_tree
from maskprop_runtime.loop import InvalidEvent
from maskprop_runtime.treestore import StoreFormatError, TreeStore


def _table(ids: list[str], seed: int) -> MaskTable:
    rng = np.random.default_rng(seed)
    n = len(ids)
    blob, offsets = pack_counts(coco.encode_masks(rng.random((n, 4, 4)) < 0.5))
    return MaskTable(
        mask_ids=np.array(ids),
        image_ids=np.array(["img"] * n),
        class_ids=np.zeros(n, np.int32),
        scores=rng.random(n).astype(np.float32),
        features=rng.random((n, 2)).astype(np.float32),
        boxes=np.zeros((n, 4), np.float32),
        mask_ious=np.full(n, np.nan, np.float32),
        rle_h=np.full(n, 4, np.uint32),
        rle_w=np.full(n, 4, np.uint32),
        rle_blob=blob,
        rle_offsets=offsets,
        img_ids=np.array(["img"]),
        img_w=np.array([4], np.uint32),
        img_h=np.array([4], np.uint32),
        img_files=np.array(["img.png"]),
    )


def test_batches_merge_in_mask_id_order_and_the_tree_round_trips(tmp_path):
    store = TreeStore(tmp_path)
    assert store.read_batches("c", 0) is None
    store.put_batch("c", 0, "b1", _table(["m2", "m0"], 1))
    store.put_batch("c", 0, "b0", _table(["m1", "m2"], 2))
    store.put_batch("c", 0, "b1", _table(["m2", "m0"], 1))  # a redelivered batch
    table = store.read_batches("c", 0)
    assert table is not None and table.mask_ids.tolist() == ["m0", "m1", "m2"]
    tree = build_tree(table.features, table.scores)
    path, sha = store.put_tree("c", 0, "cat", tree, table)
    loaded, masks, name = TreeStore.load_tree(path)
    assert name == "cat" and loaded.n_leaves == 3 and len(sha) == 64
    assert masks.rles() == table.rles() and masks.mask_ids.tolist() == ["m0", "m1", "m2"]


def test_files_of_another_format_are_refused_as_invalid_events(tmp_path):
    store = TreeStore(tmp_path)
    old = {k: v for k, v in _table(["m0"], 0).to_arrays().items() if k != "masks_format"}
    path = tmp_path / "c" / "0" / "batches" / "old.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **old)
    with pytest.raises(StoreFormatError, match="not a tree store file of this release") as info:
        store.read_batches("c", 0)
    assert isinstance(info.value, InvalidEvent) and str(path) in str(info.value)
