"""Label events cut by serialized bytes (issue #15): no event over the limit, every decided
mask exactly once, RLEs on accepted masks only, an RLE too large for any event sent without it
so that the sink dead-letters it instead of the relay retrying it forever."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from maskprop_search import wire
from maskprop_search.wire import ClassMasks

from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import AnnotationSession, Answer
from maskprop.tree import build_tree
from maskprop_runtime import topics


def _masks(rle_sizes: list[int], n_images: int = 5) -> ClassMasks:
    n = len(rle_sizes)
    counts = [bytes([65 + i % 26]) * size for i, size in enumerate(rle_sizes)]
    table = SimpleNamespace(
        mask_ids=np.array([f"mask-{i:06d}" for i in range(n)]),
        image_ids=np.array([f"img{i % n_images}" for i in range(n)]),
        rle_h=np.full(n, 480, np.uint32),
        rle_w=np.full(n, 640, np.uint32),
        scores=np.linspace(0, 1, n, dtype=np.float32),
        rle_blob=b"".join(counts),
        rle_offsets=np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64),
    )
    images = {f"img{i}": (640, 480, f"images/img{i}.jpg") for i in range(n_images)}
    return ClassMasks(table, "person", images)  # type: ignore[arg-type]


def _decided(n: int, yes: float, seed: int = 0) -> tuple[AnnotationSession, list]:
    """A session over ``n`` masks run to the end by a crowd saying yes with probability
    ``yes`` (per mask, fixed), and its terminal decisions."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(size=n) < yes
    tree = build_tree(rng.normal(size=(n, 4)) + truth[:, None], truth.astype(float) * 0.5 + 0.25)
    session = AnnotationSession({0: tree}, AnnotationParams(), Selection(0.0, 0.0), seed=0)
    decisions = []
    while not session.done:
        qs = session.lease(50)
        session.submit(Answer(q.class_id, q.node, q.mask, bool(truth[q.mask])) for q in qs)
        decisions += [d for d in session.pop_decisions() if d.terminal]
    return session, decisions


def test_no_event_over_the_limit_and_every_label_once() -> None:
    n = 400
    sizes = np.random.default_rng(1).integers(10, 3000, n).tolist()
    masks = _masks(sizes)
    session, decisions = _decided(n, yes=0.6)
    limit = 20_000
    events = wire.label_events("c1", 3, masks, session, decisions, max_bytes=limit)
    assert len(events) > 5
    assert max(ev.ByteSize() for ev in events) <= limit
    labels = [lab for ev in events for lab in ev.labels]
    assert sorted(lab.mask_index for lab in labels) == list(range(n))
    assert sorted(lab.mask_id for lab in labels) == [f"mask-{i:06d}" for i in range(n)]
    final = session.labels(0)
    assert {lab.accepted for lab in labels} == {True, False}
    for lab in labels:
        assert lab.accepted == (final[lab.mask_index] == 1)
        assert lab.HasField("rle") == lab.accepted  # negatives travel without their outline
        if lab.accepted:
            assert len(lab.rle.counts) == sizes[lab.mask_index]
        assert lab.omitted_rle_bytes == 0
    for ev in events:
        assert ev.class_masks == n
        assert {im.image_id for im in ev.images} == {lab.image_id for lab in ev.labels}
    # Same decisions, same events (ids and bytes): republishing is idempotent downstream.
    again = wire.label_events("c1", 3, masks, session, decisions, max_bytes=limit)
    assert [e.SerializeToString() for e in again] == [e.SerializeToString() for e in events]


def test_default_limit_follows_the_topic_setting() -> None:
    n = 300
    masks = _masks([5000] * n)
    session, decisions = _decided(n, yes=1.0, seed=2)
    events = wire.label_events("c1", 0, masks, session, decisions)
    assert max(ev.ByteSize() for ev in events) <= topics.record_limit()
    assert sum(len(ev.labels) for ev in events) == n


def test_a_label_too_large_for_any_event_travels_alone_without_its_rle() -> None:
    n = 60
    sizes = [200] * n
    session, decisions = _decided(n, yes=1.0, seed=3)
    final = session.labels(0)
    big = int(np.flatnonzero(final == 1)[len(np.flatnonzero(final == 1)) // 2])
    sizes[big] = 50_000
    masks = _masks(sizes)
    limit = 8_000
    events = wire.label_events("c1", 0, masks, session, decisions, max_bytes=limit)
    assert max(ev.ByteSize() for ev in events) <= limit
    alone = [ev for ev in events if any(lab.omitted_rle_bytes for lab in ev.labels)]
    assert len(alone) == 1 and len(alone[0].labels) == 1
    lab = alone[0].labels[0]
    assert lab.mask_index == big and lab.accepted and lab.omitted_rle_bytes == 50_000
    assert not lab.HasField("rle")
    others = [lab for ev in events if ev is not alone[0] for lab in ev.labels]
    assert sorted(lab.mask_index for lab in others) == sorted(set(range(n)) - {big})
    assert all(lab.HasField("rle") for lab in others if lab.accepted)


def test_rejected_masks_cost_no_rle_bytes() -> None:
    n = 200
    masks = _masks([4000] * n)
    session, decisions = _decided(n, yes=0.0, seed=4)
    events = wire.label_events("c1", 0, masks, session, decisions)
    assert not any(lab.accepted for ev in events for lab in ev.labels)
    per_label = sum(ev.ByteSize() for ev in events) / n
    assert per_label < 120  # ids and provenance only, not the 4000-byte RLEs


def test_the_search_service_cuts_label_events_below_its_topic_setting(tmp_path):
    """The one setting (MASKPROP_KAFKA_MAX_MESSAGE_BYTES) reaches the label events' bound."""
    import fakeredis
    from maskprop_search.service import SearchSettings, build_search

    from maskprop_runtime.bus import InMemoryBus

    settings = SearchSettings(data_dir=tmp_path, kafka_max_message_bytes=200_000)
    core, _ = build_search(settings, InMemoryBus(), fakeredis.FakeRedis())
    assert core.store.label_bytes == topics.record_limit(200_000) < topics.record_limit()
