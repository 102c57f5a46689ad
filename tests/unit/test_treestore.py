"""The tree store: batches merge into the leaf order, trees round-trip through the
memory-mapped class file (no features), and files of another format are refused with a reason
(never half-read)."""

from __future__ import annotations

import hashlib
import json
import mmap

import numpy as np
import pytest

from maskprop.data import coco
from maskprop.data.masks import MaskTable, pack_counts
from maskprop.tree import build_tree
from maskprop_runtime.loop import InvalidEvent
from maskprop_runtime.treestore import CLASS_FORMAT, StoreFormatError, TreeStore


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


def _stored(tmp_path, n=5):
    store = TreeStore(tmp_path)
    table = _table([f"m{i}" for i in range(n)], 3)
    tree = build_tree(table.features, table.scores)
    path, sha = store.put_tree("c", 2, "cat", tree, table)
    return store, table, tree, path, sha


def test_the_class_file_is_memory_mapped_and_keeps_no_features(tmp_path):
    store, table, tree, path, sha = _stored(tmp_path)
    assert path == store.tree_path("c", 2) and path.name == "manifest.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert store.stored_tree("c", 2) == (path, sha, 5)
    manifest = json.loads(path.read_text())
    assert manifest["format"] == CLASS_FORMAT and "features" not in manifest["files"]
    for entry in manifest["files"].values():  # the manifest pins every file
        f = path.parent / entry["file"]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == entry["sha256"]
    loaded, masks, name = TreeStore.load_tree(path, verify=True)
    assert name == "cat" and masks.features.shape == (5, 0)
    assert isinstance(masks.mask_ids, np.memmap) and isinstance(masks.rle_blob, mmap.mmap)
    assert masks.rles() == table.rles() and masks.take([3, 1]).rles() == table.take([3, 1]).rles()
    assert masks.mask_ids.tolist() == table.mask_ids.tolist()
    assert masks.class_ids.tolist() == [2] * 5
    np.testing.assert_array_equal(loaded.to_linkage(), tree.to_linkage())
    np.testing.assert_array_equal(loaded.cluster_scores(), tree.cluster_scores())
    # the masks alone (the label relay's read): the same table, the linkage never opened
    (path.parent / manifest["files"]["linkage"]["file"]).unlink()
    alone, name = TreeStore.load_masks(path)
    assert name == "cat" and alone.rles() == table.rles()
    assert alone.img_files.tolist() == masks.img_files.tolist()


def test_a_second_put_tree_keeps_the_stored_tree_and_batches_can_be_dropped(tmp_path):
    store, table, tree, path, sha = _stored(tmp_path)
    store.put_batch("c", 2, "b0", table)
    (path.parent.parent / ".tree.dead.tmp").mkdir()  # left by a build killed while writing
    assert store.put_tree("c", 2, "cat", tree, table) == (path, sha)
    assert sorted(p.name for p in path.parent.parent.iterdir()) == ["batches", "tree"]
    store.drop_batches("c", 2)
    store.drop_batches("c", 2)
    assert store.read_batches("c", 2) is None and store.stored_tree("c", 2) is not None


def test_class_files_of_another_format_or_damaged_are_refused(tmp_path):
    _, table, _, path, _ = _stored(tmp_path)
    with pytest.raises(StoreFormatError, match="manifest"):
        TreeStore.load_tree(path.parent / "scores.npy")
    blob = path.parent / "rle_blob.bin"
    blob.write_bytes(blob.read_bytes()[:-1] + b"?")
    with pytest.raises(StoreFormatError, match="sha256 differs"):
        TreeStore.load_tree(path, verify=True)
    manifest = json.loads(path.read_text())
    manifest["files"]["scores"]["file"] = "../../../x.npy"
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreFormatError, match="outside its directory"):
        TreeStore.load_tree(path)
    path.write_text(json.dumps({**manifest, "format": "maskprop-class-0"}))
    with pytest.raises(StoreFormatError, match="not a tree store file of this release"):
        TreeStore.load_tree(path)
    old = tmp_path / "c" / "3" / "tree.npz"  # the previous release's single npz
    old.parent.mkdir(parents=True)
    np.savez(old, **table.to_arrays())
    with pytest.raises(StoreFormatError):
        TreeStore.load_tree(old)
