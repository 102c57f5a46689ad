"""The sink's event loop on the in-memory bus, its validation and its settings."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from maskprop_sink.dataset import DatasetReader, DatasetWriter
from maskprop_sink.service import Sink, SinkSettings, build_sink

from maskprop.data import coco
from maskprop_runtime import codec, topics
from maskprop_runtime.bus import InMemoryBus, Record
from maskprop_runtime.loop import InvalidEvent, run_until_idle
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2


def publish(bus, *events):
    producer = bus.producer()
    for ev in events:
        if isinstance(ev, bytes):
            key, value = topics.class_key("demo", 0), ev
        else:
            key, value = topics.class_key(ev.campaign, ev.class_id), ev.SerializeToString()
        producer.send(topics.LABELS, key, value)
    producer.flush()


def dead_letters(bus):
    return [common_pb2.DeadLetter.FromString(r.value) for r in bus.read(topics.DEADLETTER)]


def test_loop_writes_labels_once_and_parks_bad_events(tmp_path, make_event):
    bus = InMemoryBus()
    settings = SinkSettings(data_dir=tmp_path)
    with DatasetWriter(settings.dataset_dir) as writer:
        loop = build_sink(settings, bus, writer=writer)
        first = make_event(n=3).event
        broken = make_event(n=2, first=5).event
        broken.labels[1].rle.counts = broken.labels[1].rle.counts[:-1] + b"`"  # cut mid-run
        garbage = np.random.default_rng(7).bytes(64)
        later = make_event(n=2, first=10).event  # same class, after the bad ones
        other = make_event(n=2, class_id=1, class_name="dog").event
        publish(bus, first, garbage, broken, first, later, other)
        assert run_until_idle([loop]) == 6

        dl = dead_letters(bus)
        assert len(dl) == 2
        assert all(d.service == "sink" and d.source_topic == topics.LABELS for d in dl)
        reasons = sorted(d.reason for d in dl)
        assert "end inside a run" in reasons[0] and "m0-6" in reasons[0]
        assert reasons[1].startswith("payload")
        assert garbage in {d.payload for d in dl}

        stats = DatasetReader(tmp_path / "dataset").ledger_stats("demo")
        assert stats == {"labels": 7, "accepted": 7, "unique_masks": 7, "duplicate_keys": 0}
        assert not writer.known("demo", 0, 5)  # an invalid event writes nothing

        # The loop goes on, and a republished event adds nothing.
        publish(bus, later, make_event(n=1, first=20).event)
        assert run_until_idle([loop]) == 2
        assert DatasetReader(tmp_path / "dataset").ledger_stats("demo")["labels"] == 8
        loop.close()


def test_restarted_sink_rereading_everything_writes_nothing_twice(tmp_path, make_event):
    events = [make_event(n=3).event, make_event(n=2, class_id=2).event]
    settings = SinkSettings(data_dir=tmp_path)
    for _ in range(2):  # a fresh bus: the new consumer group starts from the beginning
        bus = InMemoryBus()
        publish(bus, *events)
        with DatasetWriter(settings.dataset_dir) as writer:
            run_until_idle([build_sink(settings, bus, writer=writer)])
        assert dead_letters(bus) == []
    stats = DatasetReader(settings.dataset_dir).ledger_stats("demo")
    assert stats["labels"] == 5 and stats["duplicate_keys"] == 0


def _record(partition=0):
    return Record(topics.LABELS, partition, 0, b"demo/0", b"")


def _cut(ev):
    ev.labels[0].rle.counts = ev.labels[0].rle.counts[:-1] + b"`"


def _extra_run(ev):
    ev.labels[0].rle.counts += b"1"


def _outside(ev):
    ev.labels[0].rle.counts += b"~"


def _empty_size(ev):
    ev.labels[0].rle.height = 0


def _no_labels(ev):
    del ev.labels[:]


def _no_mask_id(ev):
    ev.labels[1].mask_id = ""


def _no_image_id(ev):
    ev.labels[1].image_id = ""


def _nan_score(ev):
    ev.labels[0].score = float("nan")


def _bad_campaign(ev):
    ev.campaign = "a/b"


def _unknown_image(ev):
    ev.labels[0].image_id = "nowhere"


def _no_source(ev):
    ev.labels[0].source = search_pb2.LABEL_SOURCE_UNSPECIFIED


@pytest.mark.parametrize(
    ("breaks", "reason"),
    [
        (_cut, "end inside a run"),
        (_extra_run, "pixels"),
        (_outside, "alphabet"),
        (_empty_size, "is empty"),
        (_no_labels, "no labels"),
        (_no_mask_id, "mask_id"),
        (_no_image_id, "image_id"),
        (_nan_score, "not finite"),
        (_bad_campaign, "campaign"),
        (_unknown_image, "not described in the event"),
        (_no_source, "no label source"),
    ],
)
def test_handler_refuses_unwritable_events_with_a_reason(tmp_path, make_event, breaks, reason):
    ev = make_event(n=2).event
    breaks(ev)
    with DatasetWriter(tmp_path) as writer:
        with pytest.raises(InvalidEvent, match=reason):
            Sink(writer).handle(ev, _record())
        assert Sink(writer).handle(make_event(n=2).event, _record()) == []
    assert DatasetReader(tmp_path).ledger_stats("demo")["labels"] == 2


def rle_runs(counts):
    return coco.counts_to_runs(counts).tolist()


def rle_problem(rle):
    return coco.rle_problem(rle.height, rle.width, rle.counts)


def test_rle_runs_match_the_masks():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (3, 5), (17, 9), (64, 48)]:
        masks = rng.random((h, w, 4)) < [0.0, 0.02, 0.5, 1.0]
        for j, rle in enumerate(codec.encode_masks(masks)):
            # COCO runs: column-major, zeros first (a leading 0 run when the mask starts with 1).
            flat = masks[..., j].flatten(order="F").astype(np.int8)
            bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
            expected = ([0] if flat[0] else []) + np.diff(bounds).tolist()
            assert rle_runs(rle.counts) == expected
            assert rle_problem(rle) is None


def test_settings_default_the_dataset_under_the_data_dir(tmp_path, monkeypatch):
    assert SinkSettings(data_dir=tmp_path).dataset_dir == tmp_path / "dataset"
    monkeypatch.setenv("MASKPROP_DATA_DIR", str(tmp_path / "d"))
    assert SinkSettings().dataset_dir == tmp_path / "d" / "dataset"
    monkeypatch.setenv("MASKPROP_DATASET_DIR", str(tmp_path / "elsewhere"))
    assert SinkSettings().dataset_dir == tmp_path / "elsewhere"


def test_standalone_sink_refuses_embedded_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKPROP_")}
    env["MASKPROP_DATA_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "maskprop_sink"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "needs MASKPROP_KAFKA_BOOTSTRAP" in done.stderr
    assert not (tmp_path / "dataset").exists()  # refused before touching the directory
