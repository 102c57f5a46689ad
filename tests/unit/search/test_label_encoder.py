"""The label relay's column encoder (:mod:`maskprop_runtime.pbcols`, ``wire.label_entries``)
writes the very bytes protobuf writes for the same messages built field by field: checked
against an oracle built with the protobuf API, over random classes, decisions and limits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maskprop_search import wire
from maskprop_search.wire import ClassMasks

from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import AnnotationSession, Answer, LabelSource, Question
from maskprop.tree import build_tree
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2


def _oracle(campaign, class_id, masks, decisions, rows, values, sources, which, runs):
    """The events of ``runs`` ((lo, hi, oversized) label ranges) built message by message."""
    t = masks.table
    out = []
    for chunk, (lo, hi, oversized) in enumerate(runs):
        ev = search_pb2.LabelsPropagated(
            event_id=f"labels.{campaign}.{class_id}.{decisions[0].node}.{chunk}",
            campaign=campaign,
            class_id=class_id,
            class_name=masks.class_name,
            class_masks=len(t.mask_ids),
        )
        for i in range(lo, hi):
            r, d = int(rows[i]), decisions[int(which[i])]
            start, end = int(t.rle_offsets[r]), int(t.rle_offsets[r + 1])
            lab = ev.labels.add(
                mask_id=str(t.mask_ids[r]),
                image_id=str(t.image_ids[r]),
                accepted=bool(values[i] == 1),
                source=search_pb2.LABEL_SOURCE_VERIFIED
                if sources[i] == LabelSource.VERIFIED
                else search_pb2.LABEL_SOURCE_PROPAGATED,
                score=float(t.scores[r]),
                node=d.node,
                outcome=d.outcome,
                yes=d.yes,
                answered=d.answered,
                mask_index=r,
            )
            if oversized:
                lab.omitted_rle_bytes = end - start
            elif values[i] == 1:
                lab.rle.CopyFrom(
                    common_pb2.RleMask(
                        height=int(t.rle_h[r]), width=int(t.rle_w[r]), counts=t.rle_blob[start:end]
                    )
                )
        for im in dict.fromkeys(str(t.image_ids[int(rows[i])]) for i in range(lo, hi)):
            w, h, f = masks.images[im]
            ev.images.add(image_id=im, width=w, height=h, file_name=f)
        out.append(ev.SerializeToString())
    return out


def _image(i: int) -> str:
    return f"im{'é' if i % 7 == 0 else ''}{i}"  # not all ASCII: the encoder's slow path too


def _class(n: int, rng: np.random.Generator, n_images: int) -> ClassMasks:
    sizes = rng.integers(0, 400, n)
    sizes[rng.uniform(size=n) < 0.03] = 3_000  # alone over the smallest limit: sent without it
    counts = [bytes(rng.integers(33, 127, s, dtype=np.uint8)) for s in sizes]
    scores = rng.uniform(size=n).astype(np.float32)
    scores[rng.uniform(size=n) < 0.1] = 0.0  # proto3 leaves +0.0 out
    scores[rng.uniform(size=n) < 0.05] = -0.0  # but writes -0.0 (its bits are not 0)
    table = SimpleNamespace(
        mask_ids=np.array([f"m{i}-{'x' * int(rng.integers(0, 200))}" for i in range(n)]),
        image_ids=np.array([_image(i % n_images) for i in range(n)]),
        rle_h=rng.integers(0, 70_000, n).astype(np.uint32),
        rle_w=rng.integers(0, 300, n).astype(np.uint32),
        scores=scores,
        rle_blob=b"".join(counts),
        rle_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
    )
    images = {
        _image(i): (int(i * 37 % 5000), 0 if i == 1 else 480, f"f/{i}") for i in range(n_images)
    }
    return ClassMasks(table, "chat noir", images)  # type: ignore[arg-type]


def _decided(n: int, seed: int):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(size=n) < 0.6
    tree = build_tree(rng.normal(size=(n, 4)) + truth[:, None], truth * 0.5 + 0.25)
    session = AnnotationSession({0: tree}, AnnotationParams(), Selection(0.0, 0.0), seed=seed)
    batches = []
    while not session.done:
        qs = session.lease(int(rng.integers(1, 40)))
        session.submit(
            Answer(q.class_id, q.node, q.mask, bool(truth[q.mask]) != (q.mask % 9 == 0)) for q in qs
        )
        batch = [d for d in session.pop_decisions() if d.terminal]
        if batch:
            batches.append(batch)
    return session, batches


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    n_images=st.integers(1, 50),
    limit=st.sampled_from([1_500, 6_000, 40_000, 1_000_000]),
    class_id=st.sampled_from([0, 3, 200]),
)
def test_the_encoder_writes_what_protobuf_writes(n, seed, n_images, limit, class_id) -> None:
    rng = np.random.default_rng(seed)
    masks = _class(n, rng, min(n_images, n))
    session, batches = _decided(n, seed)
    seen = []
    for batch in batches:
        got = wire.label_entries("camp-1", class_id, masks, session, batch, max_bytes=limit)
        events = [search_pb2.LabelsPropagated.FromString(v) for _k, v in got]
        runs, lo = [], 0
        for ev in events:
            hi = lo + len(ev.labels)
            runs.append((lo, hi, any(lab.omitted_rle_bytes for lab in ev.labels)))
            lo = hi
        rows, values, sources, which = session.decisions_labels(batch)
        expected = _oracle("camp-1", class_id, masks, batch, rows, values, sources, which, runs)
        assert [v for _k, v in got] == expected
        assert all(len(v) <= limit for _k, v in got)
        for (_lo, _hi, oversized), ev in zip(runs, events, strict=True):
            assert not oversized or len(ev.labels) == 1
        seen += [lab.mask_index for ev in events for lab in ev.labels]
    assert sorted(seen) == list(range(n))


def test_a_relay_batch_of_records_expands_as_each_record_alone() -> None:
    """The relay encodes a batch's records together (``expand_many``): two classes of two
    campaigns interleaved, a record that needs several events, a record of one label."""
    rng = np.random.default_rng(7)
    tables = {("a", 0): _class(120, rng, 9), ("b", 5): _class(80, rng, 80)}
    records = []
    for (campaign, k), masks in tables.items():
        session, batches = _decided(len(masks.table.mask_ids), seed=k)
        records += [wire.pack_decisions(campaign, k, session, b)[0] for b in batches]
    records = [r for r in records if r]
    rng.shuffle(records)
    masks_of = lambda c, k: tables[(c, k)]  # noqa: E731
    for limit in (2_000, 1_000_000):
        alone = [wire.expand_decisions(r, masks_of, max_bytes=limit) for r in records]
        assert wire.expand_many(records, masks_of, max_bytes=limit) == alone
        assert any(len(events) > 1 for events in alone) == (limit == 2_000)
    assert wire.expand_many([], masks_of) == []


def test_a_class_files_image_columns_give_the_same_events() -> None:
    """A class file's table carries its images as columns (memory-mapped, unsorted): the
    encoder looks them up there instead of in ``given_images``; same bytes, and the same
    ``images`` dict built from them."""
    rng = np.random.default_rng(3)
    masks = _class(90, rng, 20)
    ids = list(masks.images)[::-1]  # not sorted
    t = masks.table
    t.img_ids = np.array(ids)
    t.img_w = np.array([masks.images[i][0] for i in ids], np.uint32)
    t.img_h = np.array([masks.images[i][1] for i in ids], np.uint32)
    t.img_files = np.array([masks.images[i][2] for i in ids])
    with_columns = ClassMasks(t, masks.class_name)  # the class file's way: no dict
    plain = ClassMasks(
        SimpleNamespace(**{k: v for k, v in vars(t).items() if not k.startswith("img_")}),
        masks.class_name,
        masks.images,
    )
    assert {k: (int(w), int(h), f) for k, (w, h, f) in with_columns.images.items()} == masks.images
    session, batches = _decided(90, seed=4)
    for batch in batches:
        assert wire.label_entries("c", 1, with_columns, session, batch) == wire.label_entries(
            "c", 1, plain, session, batch
        )


def test_questions_read_image_files_from_the_columns() -> None:
    """A question's image file comes from the class's image columns (no per-class dict is
    built on load); the same file names as the dict gives."""
    rng = np.random.default_rng(5)
    masks = _class(60, rng, 12)
    ids = list(masks.images)[::-1]
    t = masks.table
    t.img_ids = np.array(ids)
    t.img_w = np.array([masks.images[i][0] for i in ids], np.uint32)
    t.img_h = np.array([masks.images[i][1] for i in ids], np.uint32)
    t.img_files = np.array([masks.images[i][2] for i in ids])
    qs = [Question(1, m, m) for m in range(0, 60, 7)]
    got = wire.questions("c", ClassMasks(t, masks.class_name), qs, 10.0)
    assert [q.image_file for q in got] == [masks.images[t.image_ids[q.mask]][2] for q in qs]
    gone = t.image_ids[qs[0].mask]
    t.img_ids = np.array([i if i != gone else "elsewhere" for i in ids])  # a clear KeyError
    with pytest.raises(KeyError, match="images not in the class's image table"):
        wire.questions("c", ClassMasks(t, masks.class_name), qs, 10.0)
