"""DatasetWriter: exactly-once appends under at-least-once delivery, crash repair, rotation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from maskprop_sink import dataset
from maskprop_sink.dataset import (
    DatasetCorrupt,
    DatasetLocked,
    DatasetReader,
    DatasetWriter,
    UnwritableEvent,
    shard_name,
)
from pycocotools import mask as mask_utils

from maskprop_runtime.pb.maskprop.search.v1 import search_pb2


def shard(root, partition=0, seq=0, campaign="demo", kind="accepted"):
    return root / campaign / "labels" / kind / shard_name(partition, seq)


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def test_duplicates_are_skipped_within_and_across_events(tmp_path, make_event):
    with DatasetWriter(tmp_path) as w:
        ev = make_event(n=4).event
        assert w.write(ev, 0) == 4
        assert w.write(ev, 0) == 0  # redelivery
        assert w.write(ev, 2) == 0  # republished outbox, read through another partition
        assert w.write(make_event(n=4, first=2).event, 0) == 2  # m0-2, m0-3 already written
        doubled = make_event(n=1, first=10).event
        doubled.labels.append(doubled.labels[0])
        assert w.write(doubled, 0) == 1
        # The key is (campaign, class_id, mask_index): the same index in another class is new.
        assert w.write(make_event(n=1, class_id=1).event, 0) == 1
        assert w.known("demo", 0, 5) and not w.known("demo", 0, 6)
    stats = DatasetReader(tmp_path).ledger_stats("demo")
    assert stats == {"labels": 8, "accepted": 8, "unique_masks": 8, "duplicate_keys": 0}


def test_ledger_is_rebuilt_from_the_shards_on_restart(tmp_path, make_event):
    a, b = make_event(n=3).event, make_event(n=2, class_id=4, class_name="dog").event
    with DatasetWriter(tmp_path) as w:
        assert w.write(a, 0) + w.write(b, 1) == 5
    with DatasetWriter(tmp_path) as w:
        assert w.write(a, 0) == 0
        assert w.write(b, 1) == 0
        assert w.write(make_event(n=3, first=2).event, 0) == 2
    stats = DatasetReader(tmp_path).ledger_stats("demo")
    assert stats["labels"] == stats["unique_masks"] == 7
    assert stats["duplicate_keys"] == 0


def test_lines_carry_event_and_mask_images_once_and_categories(tmp_path, make_event):
    built = make_event(n=3, node=42, outcome="reject", accepted=[True, False, True])
    with DatasetWriter(tmp_path) as w:
        w.write(built.event, 0)
        w.write(make_event(n=2, first=3).event, 0)  # img0/img1 again: not re-listed
        w.write(make_event(n=1, class_id=3, class_name="dog", n_images=5, first=4).event, 0)
    reader = DatasetReader(tmp_path)
    recs = list(reader.labels("demo"))
    first = recs[-1]  # the one rejected label: rejected shards are read after accepted ones
    assert list(first) == [
        "campaign", "class_id", "class_name", "mask_id", "mask_index", "class_masks",
        "image_id", "accepted", "source", "node", "outcome", "yes", "answered", "score",
        "segmentation", "event_id",
    ]  # fmt: skip
    assert (first["mask_index"], first["class_masks"]) == (1, 100)
    assert first["campaign"] == "demo" and first["class_id"] == 0 and first["class_name"] == "cat"
    assert (first["mask_id"], first["image_id"]) == ("m0-1", "img1")
    assert first["accepted"] is False and first["source"] == "propagated"
    assert (first["node"], first["outcome"], first["yes"], first["answered"]) == (
        42,
        "reject",
        3,
        4,
    )
    assert first["score"] == pytest.approx(0.51)
    assert first["event_id"] == "demo/0/42" and recs[0]["source"] == "verified"
    assert len(lines(shard(tmp_path, kind="rejected"))) == 1
    seg = first["segmentation"]
    assert seg["size"] == [6, 8] and isinstance(seg["counts"], str)
    decoded = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
    assert np.array_equal(decoded, built.masks["m0-1"])
    assert [r["accepted"] for r in reader.labels("demo", accepted_only=True)] == [True] * 5
    assert [im["image_id"] for im in reader.images("demo")] == ["img0", "img1", "img4"]
    assert len(lines(tmp_path / "demo" / "images.jsonl")) == 3
    assert reader.categories("demo") == {0: "cat", 3: "dog"}
    assert not list((tmp_path / "demo").glob(".*.tmp"))  # atomic rewrite left no temp file


def test_torn_trailing_line_is_truncated_at_start_and_redelivery_completes(tmp_path, make_event):
    first, second = make_event(n=3).event, make_event(n=3, first=3).event
    with DatasetWriter(tmp_path) as w:
        w.write(first, 0)
    # What the crashed append of `second` would have written: its lines, cut mid-way.
    with DatasetWriter(tmp_path / "scratch") as w:
        w.write(second, 0)
    full = lines(shard(tmp_path / "scratch"))
    path = shard(tmp_path)
    kept = path.stat().st_size + len(full[0])
    with path.open("ab") as f:
        f.write(full[0] + full[1][: len(full[1]) // 2])

    with DatasetWriter(tmp_path) as w:
        assert path.stat().st_size == kept  # the torn line is gone, the whole one stays
        assert w.known("demo", 0, 3) and not w.known("demo", 0, 4)
        assert w.write(second, 0) == 2  # the redelivered event writes only what was lost
    assert all(line.endswith(b"\n") for line in lines(path))
    stats = DatasetReader(tmp_path).ledger_stats("demo")
    assert stats == {"labels": 6, "accepted": 6, "unique_masks": 6, "duplicate_keys": 0}


def test_invalid_last_line_with_newline_and_torn_images_are_repaired(tmp_path, make_event):
    ev = make_event(n=2).event
    with DatasetWriter(tmp_path) as w:
        w.write(ev, 0)
    sizes = {p: p.stat().st_size for p in (shard(tmp_path), tmp_path / "demo" / "images.jsonl")}
    for p in sizes:
        with p.open("ab") as f:
            f.write(b"\x00" * 7 + b"\n")  # a torn page: the size grew, the bytes never landed
    with DatasetWriter(tmp_path) as w:
        assert {p: p.stat().st_size for p in sizes} == sizes
        assert w.write(ev, 0) == 0
    assert DatasetReader(tmp_path).ledger_stats("demo")["labels"] == 2


def test_reader_skips_a_torn_tail_without_repairing_it(tmp_path, make_event):
    with DatasetWriter(tmp_path) as w:
        w.write(make_event(n=2).event, 0)
    with shard(tmp_path).open("ab") as f:
        f.write(b'{"campaign": "de')  # a writer appending right now
    size = shard(tmp_path).stat().st_size
    assert DatasetReader(tmp_path).ledger_stats("demo")["labels"] == 2
    assert shard(tmp_path).stat().st_size == size


def test_corrupt_middle_line_is_reported_not_repaired(tmp_path, make_event):
    with DatasetWriter(tmp_path) as w:
        w.write(make_event(n=3).event, 0)
    path = shard(tmp_path)
    body = lines(path)
    path.write_bytes(body[0] + b"not json\n" + b"".join(body[1:]))
    before = path.read_bytes()
    with pytest.raises(DatasetCorrupt, match="not a JSON object"):
        list(DatasetReader(tmp_path).labels("demo"))
    # The writer reads shards only past its checkpoint (issue #15); a full scan reports it.
    (tmp_path / "demo" / dataset.CHECKPOINT_FILE).unlink()
    with pytest.raises(DatasetCorrupt, match="not a JSON object"):
        DatasetWriter(tmp_path)
    assert path.read_bytes() == before
    DatasetWriter(tmp_path / "other").close()  # the failed writer released its lock


def test_shards_rotate_per_partition_and_restart_continues_the_last(tmp_path, make_event):
    with DatasetWriter(tmp_path, shard_lines=3) as w:
        assert w.write(make_event(n=7).event, 1) == 7
        assert w.write(make_event(n=2, class_id=2).event, 0) == 2
    folder = tmp_path / "demo" / "labels" / "accepted"
    counts = {p.name: len(lines(p)) for p in sorted(folder.iterdir())}
    assert counts == {
        "part-0-00000.jsonl": 2,
        "part-1-00000.jsonl": 3,
        "part-1-00001.jsonl": 3,
        "part-1-00002.jsonl": 1,
    }
    with DatasetWriter(tmp_path, shard_lines=3) as w:
        assert w.write(make_event(n=3, first=7).event, 1) == 3
    assert len(lines(folder / "part-1-00002.jsonl")) == 3
    assert len(lines(folder / "part-1-00003.jsonl")) == 1
    reader = DatasetReader(tmp_path)
    assert reader.shards("demo")[0].name == "part-0-00000.jsonl"
    assert reader.ledger_stats("demo") == {
        "labels": 12,
        "accepted": 12,
        "unique_masks": 12,
        "duplicate_keys": 0,
    }


def test_failed_append_is_recovered_like_a_crash(tmp_path, make_event, monkeypatch):
    ev = make_event(n=4).event
    real_append = dataset._append

    def torn_append(path, data):
        if "labels" not in path.parts:
            return real_append(path, data)  # images.jsonl goes through
        whole = data.splitlines(keepends=True)
        real_append(path, b"".join(whole[:2]) + whole[2][:10])
        raise OSError(28, "No space left on device")

    with DatasetWriter(tmp_path) as w:
        monkeypatch.setattr(dataset, "_append", torn_append)
        with pytest.raises(OSError):
            w.write(ev, 0)
        monkeypatch.setattr(dataset, "_append", real_append)
        assert w.write(ev, 0) == 2  # the two whole lines stayed; the torn third was repaired
        assert w.write(ev, 0) == 0
    stats = DatasetReader(tmp_path).ledger_stats("demo")
    assert stats == {"labels": 4, "accepted": 4, "unique_masks": 4, "duplicate_keys": 0}


def test_one_writer_per_directory(tmp_path):
    w = DatasetWriter(tmp_path)
    with pytest.raises(DatasetLocked, match="another dataset writer"):
        DatasetWriter(tmp_path, lock_timeout_s=0.3)
    w.close()
    DatasetWriter(tmp_path).close()


def test_unwritable_events_are_refused_before_any_file_is_touched(tmp_path, make_event):
    with DatasetWriter(tmp_path) as w:
        bad_name = make_event(campaign="../escape").event
        with pytest.raises(UnwritableEvent, match="campaign"):
            w.write(bad_name, 0)
        unknown_image = make_event(n=2).event
        del unknown_image.images[:]
        with pytest.raises(UnwritableEvent, match="not described in the event"):
            w.write(unknown_image, 0)
        no_source = make_event(n=2).event
        no_source.labels[1].source = search_pb2.LABEL_SOURCE_UNSPECIFIED
        with pytest.raises(UnwritableEvent, match="no label source"):
            w.write(no_source, 0)
        with pytest.raises(UnwritableEvent, match="partition"):
            w.write(make_event().event, -1)
    assert not (tmp_path / "demo").exists()
    assert not (tmp_path.parent / "escape").exists()


def test_every_event_describes_its_labels_images(tmp_path, make_event):
    # Issue #15: no image ledger (its memory grew with the dataset); search's events always
    # describe their labels' images, and images.jsonl lists each recent one once.
    with DatasetWriter(tmp_path) as w:
        w.write(make_event(n=2).event, 0)
        later = make_event(n=2, first=2).event
        del later.images[:]
        with pytest.raises(UnwritableEvent, match="not described in the event"):
            w.write(later, 0)
        assert w.write(make_event(n=2, first=2).event, 0) == 2
    assert len(lines(tmp_path / "demo" / "images.jsonl")) == 2


def test_categories_are_rebuilt_from_the_labels_when_lost(tmp_path, make_event):
    with DatasetWriter(tmp_path) as w:
        w.write(make_event(class_id=0, class_name="cat").event, 0)
        w.write(make_event(class_id=5, class_name="dog").event, 1)
    (tmp_path / "demo" / "categories.json").unlink()
    DatasetWriter(tmp_path).close()
    body = json.loads((tmp_path / "demo" / "categories.json").read_text())
    assert body == {"0": "cat", "5": "dog"}


def test_foreign_directories_in_the_root_are_ignored(tmp_path, make_event):
    (tmp_path / "lost+found").mkdir()
    with DatasetWriter(tmp_path) as w:
        w.write(make_event().event, 0)
    assert DatasetReader(tmp_path).campaigns() == ["demo"]
    empty = {"labels": 0, "accepted": 0, "unique_masks": 0, "duplicate_keys": 0}
    assert DatasetReader(tmp_path).ledger_stats("other") == empty  # not written to yet
