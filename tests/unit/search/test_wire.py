"""maskprop_search.wire: question ids, label events and progress, without Redis or a broker."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from maskprop_search import wire
from maskprop_search.wire import BadRequest, ClassMasks

from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import AnnotationSession, Answer, Question
from maskprop.tree import build_tree
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2


def test_question_ids_round_trip() -> None:
    q = Question(3, 17, 42)
    qid = wire.question_id("c1", q)
    assert qid == "c1:3:17:42"
    known: set[str] = set()
    assert wire.parse_question_id(qid, known) == ("c1", q)
    assert known == {"c1"}  # checked once, then trusted for the rest of the call
    assert wire.parse_question_id(qid, known) == ("c1", q)


@pytest.mark.parametrize(
    "qid", ["c1:0:1", "c1:0:1:2:3", "c1:0:zz:1", "../etc:0:1:1", "c1:-1:1:1", "c1:0:1:-2", ""]
)
def test_malformed_question_ids_are_bad_requests(qid: str) -> None:
    with pytest.raises(BadRequest, match="malformed question_id"):
        wire.parse_question_id(qid)


def _session(n: int, seed: int) -> tuple[AnnotationSession, np.ndarray]:
    rng = np.random.default_rng(seed)
    iou = rng.uniform(size=n)
    tree = build_tree(rng.normal(size=(n, 4)) + iou[:, None], np.clip(iou, 0, 1))
    return AnnotationSession({0: tree}, AnnotationParams(), Selection(0.0, 0.0), seed=0), iou


def _masks(n: int) -> ClassMasks:
    """A duck-typed table of ``n`` masks over 4 images: wire reads only these columns."""
    counts = [f"rle{i}".encode() for i in range(n)]
    table = SimpleNamespace(
        mask_ids=np.array([f"m{i}" for i in range(n)]),
        image_ids=np.array([f"img{i % 4}" for i in range(n)]),
        rle_h=np.full(n, 8, np.uint32),
        rle_w=np.full(n, 6, np.uint32),
        scores=np.linspace(0, 1, n, dtype=np.float32),
        rle_blob=b"".join(counts),
        rle_offsets=np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64),
    )
    images = {f"img{i}": (6, 8, f"images/img{i}.png") for i in range(4)}
    return ClassMasks(table, "cat", images)  # type: ignore[arg-type]


def test_label_events_cover_each_decided_mask_once_in_bounded_events() -> None:
    n = 60
    session, iou = _session(n, seed=1)
    masks = _masks(n)
    decisions = []
    while not session.done:
        qs = session.lease(10)
        session.submit(Answer(q.class_id, q.node, q.mask, bool(iou[q.mask] >= 0.5)) for q in qs)
        decisions += [d for d in session.pop_decisions() if d.terminal]
    events = wire.label_events("c1", 0, masks, session, decisions, max_bytes=700)
    labels = [lab for ev in events for lab in ev.labels]
    assert sorted(lab.mask_id for lab in labels) == sorted(f"m{i}" for i in range(n))
    assert all(ev.ByteSize() <= 700 for ev in events) and len(events) > 1
    assert len({ev.event_id for ev in events}) == len(events)
    final = session.labels(0)
    for lab in labels:
        i = int(lab.mask_id[1:])
        assert lab.accepted == (final[i] == 1)
        assert lab.mask_index == i
        if lab.accepted:  # rejected masks carry no RLE (issue #15)
            assert lab.rle.counts == f"rle{i}".encode()
            assert (lab.rle.height, lab.rle.width) == (8, 6)
        else:
            assert not lab.HasField("rle")
    for ev in events:  # the images of its labels, in first-appearance order
        assert [im.image_id for im in ev.images] == list(
            dict.fromkeys(lab.image_id for lab in ev.labels)
        )
    entries = wire.label_entries("c1", 0, masks, session, decisions, max_bytes=700)
    assert [v for _k, v in entries] == [ev.SerializeToString() for ev in events]
    assert {k for k, _v in entries} == {b"c1/0"}
    assert wire.label_entries("c1", 0, masks, session, []) == []


def test_questions_carry_the_masks_rle_and_image_file() -> None:
    session, _ = _session(30, seed=2)
    masks = _masks(30)
    qs = session.lease(5)
    out = wire.questions("c1", masks, qs, deadline=123.5)
    assert [q.question_id for q in out] == [wire.question_id("c1", q) for q in qs]
    for q, msg in zip(qs, out, strict=True):
        assert msg.mask_id == f"m{q.mask}" and msg.rle.counts == f"rle{q.mask}".encode()
        assert msg.image_file == f"images/img{q.mask % 4}.png"
        assert msg.lease_expires_unix == 123.5 and msg.class_name == "cat"


def test_progress_is_done_only_with_classes_all_done() -> None:
    assert not wire.progress_response({}).done
    a = (search_pb2.ClassProgress(class_id=2, questions=5), True)
    b = (search_pb2.ClassProgress(class_id=0, questions=3), False)
    resp = wire.progress_response({2: a, 0: b})
    assert [c.class_id for c in resp.classes] == [0, 2]
    assert resp.questions == 8 and not resp.done
    assert wire.progress_response({2: a}).done
    session, _ = _session(20, seed=3)
    msg, done = wire.class_progress(0, session, _masks(20))
    assert (msg.masks, msg.undecided_masks, msg.class_name, done) == (20, 20, "cat", False)


def _v1_record(record: bytes) -> bytes:
    """``record`` rewritten in the first format (``MPD1``: int64 decision columns, int32
    counts), as outboxes written before the eighteenth session hold it."""
    import json
    import struct

    campaign, k, (table, outcomes), rows, values, sources, which = wire.unpack_decisions(record)
    n, m = table.shape[0], rows.shape[0]
    head = json.dumps(
        {"campaign": campaign, "class_id": k, "outcomes": outcomes, "n": n, "m": m}
    ).encode()
    packed = (values.astype(np.uint8) & 1) | (sources.astype(np.uint8) << 1)
    return b"".join(
        (
            struct.pack("<4sI", b"MPD1", len(head)),
            head,
            table.astype("<i8").tobytes(),
            np.bincount(which, minlength=n).astype("<i4").tobytes(),
            rows.astype("<i4").tobytes(),
            packed.tobytes(),
        )
    )


def test_a_decisions_record_expands_into_the_same_events_byte_for_byte() -> None:
    """What saves write to the outbox (issue #15): the decisions in ~5 bytes a mask; the relay
    expands them into exactly the events label_entries makes (same ids, same bytes)."""
    n = 300
    session, iou = _session(n, seed=5)
    masks = _masks(n)
    records, decisions = [], []
    while not session.done:
        qs = session.lease(7)
        # wrong answers too, so reused answers make VERIFIED labels against their cluster's
        session.submit(
            Answer(q.class_id, q.node, q.mask, bool(iou[q.mask] >= 0.5) != (q.mask % 5 == 0))
            for q in qs
        )
        batch = [d for d in session.pop_decisions() if d.terminal]
        if batch:
            decisions.append(batch)
            records.append(wire.pack_decisions("c1", 0, session, batch))
    sources = set()
    total = accepted = 0
    for batch, (record, acc, rej) in zip(decisions, records, strict=True):
        expected = wire.label_entries("c1", 0, masks, session, batch, max_bytes=900)
        assert wire.is_decisions(record)
        got = wire.expand_decisions(record, lambda c, k: masks, max_bytes=900)
        assert got == expected
        rows, values, src, _ = session.decisions_labels(batch)
        assert (acc, rej) == (int((values == 1).sum()), int((values == 0).sum()))
        # a decision in 13 bytes at most (node u4, yes and answered u2, outcome u1, count u4)
        assert len(record) < 200 + 13 * len(batch) + 5 * rows.shape[0]
        assert wire.expand_decisions(_v1_record(record), lambda c, k: masks, max_bytes=900) == got
        sources |= set(src.tolist())
        total += rows.shape[0]
        accepted += acc
    assert total == n and accepted == int((session.labels(0) == 1).sum())
    assert sources == {1, 2}  # propagated and verified labels both went through the record
    assert wire.pack_decisions("c1", 0, session, []) == (b"", 0, 0)
    assert not wire.is_decisions(search_pb2.LabelsPropagated(event_id="x").SerializeToString())
    for bad in (records[0][0][:-1], records[0][0] + b"x", b"MPD2", records[0][0][:12]):
        with pytest.raises(ValueError):
            wire.unpack_decisions(bad)
