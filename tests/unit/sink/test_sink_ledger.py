"""The sink's ledger (issue #15): a bitmap per class over mask indices, checkpointed beside
the shards; a restart reads the checkpoint plus only the shards' tail; exactly-once holds
across a crash between the shard append, the checkpoint and the offset commit; accepted and
rejected labels live in separate shards and the export opens the accepted ones only."""

from __future__ import annotations

import pytest
from maskprop_sink import dataset
from maskprop_sink.coco import export_coco
from maskprop_sink.dataset import CHECKPOINT_FILE, DatasetReader, DatasetWriter
from maskprop_sink.service import build_sink

from maskprop_runtime import topics
from maskprop_runtime.bus import InMemoryBus
from maskprop_runtime.loop import run_until_idle
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2


def crash(w: DatasetWriter) -> None:
    """What kill -9 leaves: the files as they are, no closing checkpoint, the lock dropped."""
    assert w._lock is not None
    w._lock.close()
    w._lock = None


def clean(stats: dict[str, int], n: int) -> bool:
    return stats["labels"] == stats["unique_masks"] == n and stats["duplicate_keys"] == 0


@pytest.fixture
def reads(monkeypatch):
    """Counts the shard lines each writer start parses, per (shard name, start byte)."""
    seen: list[tuple[str, int]] = []
    real = dataset.read_records

    def counting(path, *, repair=False, start=0):
        for rec in real(path, repair=repair, start=start):
            if "labels" in path.parts:
                seen.append((path.name, start))
            yield rec

    monkeypatch.setattr(dataset, "read_records", counting)
    return seen


def test_restart_reads_the_checkpoint_and_only_the_tail(tmp_path, make_event, reads):
    w = DatasetWriter(tmp_path, checkpoint_labels=10)
    for k in range(4):  # 12 labels: one checkpoint after the 12th (>= 10 since the last)
        assert w.write(make_event(n=3, first=3 * k).event, 0) == 3
    assert (tmp_path / "demo" / CHECKPOINT_FILE).exists()
    assert w.write(make_event(n=2, first=12).event, 0) == 2  # the tail: after the checkpoint
    crash(w)
    reads.clear()
    with DatasetWriter(tmp_path, checkpoint_labels=10) as w:
        assert len(reads) == 2  # the two tail lines, not the 14 of the shard
        assert all(start > 0 for _name, start in reads)
        assert all(w.known("demo", 0, i) for i in range(14)) and not w.known("demo", 0, 14)
        for k in range(5):  # everything redelivered: nothing written twice
            assert w.write(make_event(n=3, first=3 * k).event, 0) == (1 if k == 4 else 0)
    reads.clear()
    with DatasetWriter(tmp_path):
        assert reads == []  # close() checkpointed everything
    assert clean(DatasetReader(tmp_path).ledger_stats("demo"), 15)


def test_the_ledger_is_a_bitmap_per_class(tmp_path, make_event):
    with DatasetWriter(tmp_path) as w:
        w.write(make_event(n=5).event, 0)
        w.write(make_event(n=5, class_id=3).event, 0)
        state = w._campaigns["demo"]
        # 100 masks a class (conftest): 13 bytes each, whatever the labels written.
        assert {k: led.bits.nbytes for k, led in state.ledger.items()} == {0: 13, 3: 13}
        assert [state.ledger[k].count() for k in (0, 3)] == [5, 5]


def test_crash_after_the_shard_append_before_any_checkpoint(tmp_path, make_event):
    ev = make_event(n=4).event
    w = DatasetWriter(tmp_path)
    assert w.write(ev, 0) == 4
    crash(w)  # no checkpoint yet, offset not committed: the event comes again
    assert not (tmp_path / "demo" / CHECKPOINT_FILE).exists()
    with DatasetWriter(tmp_path) as w:
        assert w.write(ev, 0) == 0
    assert clean(DatasetReader(tmp_path).ledger_stats("demo"), 4)


def test_crash_after_the_checkpoint_before_the_offset_commit(tmp_path, make_event):
    ev = make_event(n=4).event
    w = DatasetWriter(tmp_path, checkpoint_labels=1)
    assert w.write(ev, 0) == 4  # appended and checkpointed; the offset commit never happens
    crash(w)
    with DatasetWriter(tmp_path) as w:
        assert w.write(ev, 0) == 0
    assert clean(DatasetReader(tmp_path).ledger_stats("demo"), 4)


def test_crash_mid_append_after_a_checkpoint_repairs_the_tail(tmp_path, make_event, monkeypatch):
    w = DatasetWriter(tmp_path, checkpoint_labels=1)
    w.write(make_event(n=3).event, 0)  # checkpointed
    second = make_event(n=3, first=3).event
    real_append = dataset._append

    def torn(path, data):
        if "labels" not in path.parts:
            return real_append(path, data)
        whole = data.splitlines(keepends=True)
        real_append(path, whole[0] + whole[1][:7])
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(dataset, "_append", torn)
    with pytest.raises(KeyboardInterrupt):
        w.write(second, 0)
    monkeypatch.setattr(dataset, "_append", real_append)
    crash(w)
    with DatasetWriter(tmp_path) as w:
        assert w.known("demo", 0, 3) and not w.known("demo", 0, 4)  # the whole line counts
        assert w.write(second, 0) == 2
    assert clean(DatasetReader(tmp_path).ledger_stats("demo"), 6)


def test_crash_while_writing_the_checkpoint_keeps_the_previous_one(
    tmp_path, make_event, monkeypatch
):
    w = DatasetWriter(tmp_path, checkpoint_labels=3)
    w.write(make_event(n=3).event, 0)  # checkpoint 1
    before = (tmp_path / "demo" / CHECKPOINT_FILE).read_bytes()
    real = dataset._atomic_write

    def dies(path, data):
        if path.name == CHECKPOINT_FILE:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(dataset, "_atomic_write", dies)
    with pytest.raises(KeyboardInterrupt):
        w.write(make_event(n=3, first=3).event, 0)  # appended, then dies checkpointing
    monkeypatch.setattr(dataset, "_atomic_write", real)
    crash(w)
    assert (tmp_path / "demo" / CHECKPOINT_FILE).read_bytes() == before
    assert not list((tmp_path / "demo").glob(".*.tmp"))
    with DatasetWriter(tmp_path) as w:
        assert w.write(make_event(n=6).event, 0) == 0  # redelivered: all six known
    assert clean(DatasetReader(tmp_path).ledger_stats("demo"), 6)


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic"])
def test_a_damaged_checkpoint_falls_back_to_a_full_scan(tmp_path, make_event, damage):
    with DatasetWriter(tmp_path) as w:
        w.write(make_event(n=5).event, 0)
    path = tmp_path / "demo" / CHECKPOINT_FILE
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-1] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[:4] = b"XXXX"
    path.write_bytes(bytes(raw))
    with DatasetWriter(tmp_path) as w:
        assert all(w.known("demo", 0, i) for i in range(5))
        assert w.write(make_event(n=6).event, 0) == 1
    assert clean(DatasetReader(tmp_path).ledger_stats("demo"), 6)


def test_a_checkpoint_longer_than_its_shards_is_not_trusted(tmp_path, make_event):
    with DatasetWriter(tmp_path) as w:
        w.write(make_event(n=4).event, 0)
    shard = tmp_path / "demo" / "labels" / "accepted" / dataset.shard_name(0, 0)
    shard.write_bytes(b"".join(shard.read_bytes().splitlines(keepends=True)[:2]))  # by hand
    with DatasetWriter(tmp_path) as w:
        assert w.known("demo", 0, 1) and not w.known("demo", 0, 2)
        assert w.write(make_event(n=4).event, 0) == 2


def test_accepted_and_rejected_in_separate_shards_and_export_reads_accepted_only(
    tmp_path, make_event, monkeypatch
):
    built = make_event(n=6, accepted=[True, False, True, False, False, True])
    for i in (1, 3, 4):  # what search sends: rejected masks without their RLE
        built.event.labels[i].ClearField("rle")
    with DatasetWriter(tmp_path) as w:
        assert w.write(built.event, 0) == 6
    reader = DatasetReader(tmp_path)
    assert [p.parent.name for p in reader.shards("demo")] == ["accepted", "rejected"]
    rejected = list(dataset.read_records(reader.shards("demo", "rejected")[0]))
    assert [r["mask_index"] for r in rejected] == [1, 3, 4]
    assert all(r["segmentation"] is None and not r["accepted"] for r in rejected)

    real = dataset.read_records

    def accepted_only(path, **kw):
        assert "rejected" not in path.parts, "the export opened a rejected shard"
        return real(path, **kw)

    monkeypatch.setattr(dataset, "read_records", accepted_only)
    summary = export_coco(tmp_path, "demo", tmp_path / "out.json")
    assert summary["annotations"] == 3 and summary["skipped_no_outline"] == 0
    monkeypatch.setattr(dataset, "read_records", real)
    summary = export_coco(tmp_path, "demo", tmp_path / "all.json", accepted_only=False)
    assert summary["annotations"] == 3 and summary["skipped_no_outline"] == 3


def test_an_accepted_mask_sent_without_its_rle_is_dead_lettered_alone(tmp_path, make_event):
    bus = InMemoryBus()
    from maskprop_sink.service import SinkSettings

    settings = SinkSettings(data_dir=tmp_path)
    big = make_event(n=1, first=7).event
    big.labels[0].ClearField("rle")
    big.labels[0].omitted_rle_bytes = 2_000_000
    after = make_event(n=3).event
    producer = bus.producer()
    for ev in (big, after):
        producer.send(topics.LABELS, topics.class_key("demo", 0), ev.SerializeToString())
    producer.flush()
    with DatasetWriter(settings.dataset_dir) as writer:
        assert run_until_idle([build_sink(settings, bus, writer=writer)]) == 2
        assert not writer.known("demo", 0, 7)
    dl = [common_pb2.DeadLetter.FromString(r.value) for r in bus.read(topics.DEADLETTER)]
    assert len(dl) == 1
    assert "m0-7" in dl[0].reason and "2000000 bytes" in dl[0].reason
    assert "max.message.bytes" in dl[0].reason
    assert clean(DatasetReader(settings.dataset_dir).ledger_stats("demo"), 3)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ev: setattr(ev, "class_masks", 0), "class_masks must be"),
        (lambda ev: setattr(ev.labels[0], "mask_index", 100), "not below class_masks"),
    ],
)
def test_mask_indices_are_checked_against_the_class_size(tmp_path, make_event, change, reason):
    ev = make_event(n=2).event
    change(ev)
    with DatasetWriter(tmp_path) as w:
        with pytest.raises(dataset.UnwritableEvent, match=reason):
            w.write(ev, 0)
        w.write(make_event(n=2).event, 0)
        other = make_event(n=2, first=5).event
        other.class_masks = 50  # the class's tree does not change size
        with pytest.raises(dataset.UnwritableEvent, match="100 masks in the ledger"):
            w.write(other, 0)


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        (b"", 3),  # intact
        (b'{"image_id": "to', 3),  # torn mid-line
        (b"\x00" * 9 + b"\n", 3),  # a torn page: the size grew, the bytes never landed
        (b'{"image_id": "' + b"x" * 200 + b'"}\n', 4),  # a whole line longer than the window
        (b'{"image_id": "' + b"x" * 200, 3),  # a torn line longer than the window
    ],
)
def test_images_tail_repair_reads_only_the_end(tmp_path, tail, kept):
    path = tmp_path / "images.jsonl"
    whole = b"".join(b'{"image_id": "img%d"}\n' % i for i in range(3))
    path.write_bytes(whole + tail)
    dataset._repair_tail(path, window=64)
    body = path.read_bytes()
    assert len(body.splitlines()) == kept and body.endswith(b"\n")
    assert body.startswith(whole)
