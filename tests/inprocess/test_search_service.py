"""Clusterer + search wired in one process: sessions in (fake) Redis, labels on the bus."""

import time
from collections import Counter

import pytest
from maskprop_search.store import class_key
from maskprop_search.wire import BadRequest

from maskprop.simulate.scenes import IMAGE_SIZE, mask_id
from maskprop_runtime import topics
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2


def labels_on_bus(bus):
    out = Counter()
    values = {}
    for rec in bus.read(topics.LABELS):
        ev = search_pb2.LabelsPropagated.FromString(rec.value)
        for lab in ev.labels:
            out[lab.mask_id] += 1
            values[lab.mask_id] = int(lab.accepted)
    return out, values


def events_on_bus(bus):
    return [search_pb2.LabelsPropagated.FromString(r.value) for r in bus.read(topics.LABELS)]


def answers_for(w, qs):
    return [(q.question_id, bool(t)) for q, t in zip(qs, w.truth(qs), strict=True)]


def annotate(w, batch=37, restart_every=None):
    steps = 0
    while True:
        qs, done = w.core.lease(w.campaign, batch)
        if done:
            return
        assert qs
        w.core.submit((q.question_id, bool(t)) for q, t in zip(qs, w.truth(qs), strict=True))
        steps += 1
        if restart_every and steps % restart_every == 0:
            w.restart_search()


def test_trees_open_sessions_and_every_mask_is_labelled_once(wired):
    wired.publish_pool()
    wired.settle()
    assert len(wired.core.classes("c1")) == 4
    annotate(wired)
    counts, values = labels_on_bus(wired.bus)
    assert set(counts) == {mask_id(i) for i in range(len(wired.pool))}
    assert set(counts.values()) == {1}
    progress = wired.core.progress("c1")
    assert progress.done
    assert sum(c.accepted_masks for c in progress.classes) == sum(values.values())
    # every event describes exactly the images of its labels, as the detector reported them
    for ev in events_on_bus(wired.bus):
        assert [i.image_id for i in ev.images] == list(dict.fromkeys(x.image_id for x in ev.labels))
        for info in ev.images:
            expected = (IMAGE_SIZE, IMAGE_SIZE, f"images/{info.image_id}.png")
            assert (info.width, info.height, info.file_name) == expected


def test_labels_do_not_depend_on_batching_or_restarts(tmp_path, pool):
    from tests.inprocess.conftest import Wired

    runs = []
    for i, (batch, restart) in enumerate([(15, None), (200, None), (7, 3)]):
        w = Wired(tmp_path / str(i), pool)
        w.publish_pool()
        w.settle()
        annotate(w, batch=batch, restart_every=restart)
        runs.append(labels_on_bus(w.bus)[1])
    assert runs[0] == runs[1] == runs[2]


def test_duplicate_stale_and_malformed_answers(wired):
    wired.publish_pool()
    wired.settle()
    qs, _ = wired.core.lease("c1", 5)
    answers = [(q.question_id, True) for q in qs]
    assert wired.core.submit(answers)[0] == len(qs)
    applied, dup, stale = wired.core.submit(answers)
    assert (applied, dup, stale) == (0, len(qs), 0)
    with pytest.raises(BadRequest):
        wired.core.submit([("c1:0:zz:1", True)])
    with pytest.raises(BadRequest):
        wired.core.submit([("../etc:0:1:1", True)])


def test_expired_leases_go_back_to_the_pool(tmp_path, pool):
    from tests.inprocess.conftest import Wired

    w = Wired(tmp_path, pool, lease_seconds=0.01)
    w.publish_pool()
    w.settle()
    first, _ = w.core.lease("c1", 10)
    import time

    time.sleep(0.05)
    again, _ = w.core.lease("c1", 10)
    assert {q.mask_id for q in first} & {q.mask_id for q in again}
    # An answer to the expired lease of a question leased again later is stale, not applied
    # twice; answering the new lease works.
    stale_answers = [
        (q.question_id, True) for q in first if q.question_id not in {a.question_id for a in again}
    ]
    if stale_answers:
        assert w.core.submit(stale_answers)[2] == len(stale_answers)


def test_bad_events_are_dead_lettered_and_the_consumer_goes_on(wired):
    producer = wired.bus.producer()
    producer.send(topics.MASKS, b"k", b"\xff\x00garbage")
    bad_rle = detector_pb2.MaskStreamEvent(
        event_id="masks.c1.0.0",
        masks=detector_pb2.MasksDetected(
            campaign="c1",
            class_id=0,
            feature_dim=2,
            masks=[detector_pb2.DetectedMask(mask_id="m1", image_id="i1", score=0.5)],
            images=[common_pb2.ImageInfo(image_id="i1", width=4, height=4)],
        ),
    )
    producer.send(topics.MASKS, b"k", bad_rle.SerializeToString())
    traversal = detector_pb2.MaskStreamEvent(
        event_id="../../x", closed=detector_pb2.ClassBatchClosed(campaign="c1")
    )
    producer.send(topics.MASKS, b"k", traversal.SerializeToString())
    producer.flush()
    wired.publish_pool()
    wired.settle()
    dead = [common_pb2.DeadLetter.FromString(r.value) for r in wired.bus.read(topics.DEADLETTER)]
    reasons = " | ".join(d.reason for d in dead)
    assert len(dead) == 3, reasons
    assert "not a maskprop.detector.v1.MaskStreamEvent" in reasons
    assert "malformed RLE" in reasons
    assert "event_id" in reasons
    assert len(wired.core.classes("c1")) == 4  # the good events still went through


class BrokerDown:
    """A producer whose broker never acknowledges (what it was asked to send is kept)."""

    def __init__(self):
        self.sent = []

    def send(self, topic, key, value):
        self.sent.append((topic, key, value))

    def flush(self):
        raise ConnectionError("broker down")

    def close(self):
        pass


class CountingProducer:
    """The in-memory producer, counting flushes (one broker round trip each)."""

    def __init__(self, inner):
        self.inner = inner
        self.flushes = 0

    def send(self, topic, key, value):
        self.inner.send(topic, key, value)

    def flush(self):
        self.flushes += 1
        self.inner.flush()

    def close(self):
        self.inner.close()


def test_a_crash_between_save_and_publish_republishes_the_same_events(wired):
    from maskprop_search.store import outbox_key

    wired.publish_pool()
    wired.settle()
    before = {(r.key, r.value) for r in wired.bus.read(topics.LABELS)}  # the opening sweeps
    opening = len(before)
    down = wired.core.producer = BrokerDown()
    while not down.sent:
        try:
            qs, _ = wired.core.lease("c1", 40)
            wired.core.submit(answers_for(wired, qs))
        except ConnectionError:
            pass  # the state (and the labels it decided) is saved; publishing failed
    assert wired.redis.xlen(outbox_key("c1")) > 0
    assert len(wired.bus.read(topics.LABELS)) == opening
    wired.restart_search()  # the crash: nothing in memory survives
    assert wired.core.recover() == wired.redis.xlen(outbox_key("c1")) + (
        len(wired.bus.read(topics.LABELS)) - opening
    )
    assert wired.redis.xlen(outbox_key("c1")) == 0
    republished = {(r.key, r.value) for r in wired.bus.read(topics.LABELS)} - before
    # The same events, byte for byte (same event ids), as the failed attempt sent.
    assert set(republished) == {(k, v) for _t, k, v in down.sent}
    annotate(wired)
    counts, _ = labels_on_bus(wired.bus)
    assert set(counts) == {mask_id(i) for i in range(len(wired.pool))}
    assert set(counts.values()) == {1}


def test_the_relay_publishes_many_classes_in_one_flush(wired):
    import threading
    import time

    from maskprop_search.service import build_search
    from maskprop_search.store import outbox_key

    wired.publish_pool()
    wired.core.publish_inline = False  # the opening sweeps' labels wait for the relay too
    wired.settle()
    producer = CountingProducer(wired.bus.producer())
    wired.core, wired.search_loop = build_search(
        wired.search_settings, wired.bus, wired.redis, producer, relay=True
    )
    for _ in range(4):
        qs, _ = wired.core.lease("c1", 200)
        wired.core.submit(answers_for(wired, qs))
    assert not wired.bus.read(topics.LABELS)  # the calls did not wait for the broker
    waiting = wired.redis.xlen(outbox_key("c1"))
    assert wired.core.drain_outbox() == waiting
    assert producer.flushes == 1
    events = events_on_bus(wired.bus)
    assert len(events) == waiting
    assert len({ev.class_id for ev in events}) > 1
    assert wired.redis.xlen(outbox_key("c1")) == 0

    stop = threading.Event()
    # As the service runs it: woken by saves, lingering for more before each flush.
    relay = threading.Thread(
        target=wired.core.run_relay, args=(stop,), kwargs={"linger_s": 0.05}, daemon=True
    )
    relay.start()
    try:
        annotate(wired)
        deadline = time.monotonic() + 30
        while len(labels_on_bus(wired.bus)[0]) < len(wired.pool) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        relay.join(timeout=10)
    counts, _ = labels_on_bus(wired.bus)
    assert set(counts) == {mask_id(i) for i in range(len(wired.pool))}
    assert set(counts.values()) == {1}
    assert producer.flushes < len(wired.bus.read(topics.LABELS))


def test_a_relay_process_publishes_with_the_mask_tables_its_budget_holds(wired, monkeypatch):
    """``maskprop_search.relay``: a core with no session publishes what the API's core saved,
    each class's mask table loaded once while ``relay_masks`` holds them all, and never its
    tree (the relay does not walk it)."""
    from maskprop_search import wire
    from maskprop_search.service import build_core

    wired.publish_pool()
    wired.core.publish_inline = False  # search with label_relay=process
    wired.settle()
    annotate(wired)
    assert not wired.bus.read(topics.LABELS)
    loads = Counter()
    load_masks = wire.load_masks

    def counted(path):
        loads[path] += 1
        return load_masks(path)

    def no_tree(path):
        raise AssertionError("the relay loaded a tree")

    monkeypatch.setattr(wire, "load_masks", counted)
    monkeypatch.setattr(wire, "load_class", no_tree)
    relay = build_core(
        wired.search_settings, wired.bus, wired.redis, relay=True, relay_masks=len(wired.pool)
    )
    waiting = relay.outbox_backlog()  # the relay's gauge maskprop_label_outbox_pending
    assert waiting > 0
    assert relay.drain_outbox() == waiting
    assert relay.outbox_backlog() == 0
    counts, _ = labels_on_bus(wired.bus)
    assert set(counts) == {mask_id(i) for i in range(len(wired.pool))}
    assert set(counts.values()) == {1}
    assert len(loads) == 4 and set(loads.values()) == {1}  # 4 classes, more than RELAY_TABLES


def test_a_save_after_the_class_lock_expired_is_refused(wired):
    from redis.exceptions import ResponseError

    wired.publish_pool()
    wired.settle()
    with pytest.raises(ResponseError, match="LOCKLOST"):
        with wired.core.store.locked_class("c1", 1) as held:
            held.loaded.session.lease(5)
            held.changed = True  # saved when the block ends
            wired.redis.delete(class_key("c1", 1, "lock"))  # expired: another may hold it
    qs, _ = wired.core.lease("c1", 5)  # the unsaved change was dropped with the cached copy
    assert qs


def test_one_relay_publishes_at_a_time(wired):
    from maskprop_search.store import outbox_key

    relay_lock = wired.core.outboxes.of("c1").lock_key
    wired.publish_pool()
    wired.core.publish_inline = False
    wired.settle()
    qs, _ = wired.core.lease("c1", 200)
    wired.core.submit(answers_for(wired, qs))
    waiting = wired.redis.xlen(outbox_key("c1"))
    assert waiting
    wired.redis.set(relay_lock, "another replica", px=10_000)
    assert wired.core.drain_outbox() == 0  # the other relay publishes them
    assert wired.redis.xlen(outbox_key("c1")) == waiting and not wired.bus.read(topics.LABELS)
    wired.redis.delete(relay_lock)  # it died and its lock expired
    assert wired.core.drain_outbox(batch=3) == waiting
    assert len(wired.bus.read(topics.LABELS)) == waiting
    assert not wired.redis.exists(relay_lock)


def test_a_call_locks_and_saves_all_its_classes_in_one_round_trip_each(wired):
    wired.publish_pool()
    wired.settle()
    core = wired.core
    calls = {"acquire": 0, "save": 0}
    for name in calls:
        script = getattr(core.store, f"_{name}_script")

        def counted(*a, _script=script, _name=name, **k):
            calls[_name] += 1
            return _script(*a, **k)

        setattr(core.store, f"_{name}_script", counted)
    qs, _ = core.lease("c1", 400)
    assert len({q.class_id for q in qs}) > 1
    core.submit(answers_for(wired, qs))
    assert calls == {"acquire": 2, "save": 2}  # one each for the lease and for the answers


def test_a_slow_save_is_logged_with_what_it_wrote(wired, monkeypatch, caplog):
    """One save is one Lua call, and every Redis client waits while it runs: a save slower than
    ``SLOW_SAVE_S`` is logged with each class's mode, bytes and lease changes (issue #15's
    start-up tail: saves of 56-174 ms that SLOWLOG could not tell apart)."""
    import logging

    from maskprop_search import store

    wired.publish_pool()
    wired.settle()
    core = wired.core
    qs, _ = core.lease("c1", 400)
    caplog.set_level(logging.WARNING, logger="maskprop_search.store")
    caplog.clear()
    monkeypatch.setattr(store, "SLOW_SAVE_S", -1.0)  # every save counts as slow
    core.submit(answers_for(wired, qs))
    slow = [r for r in caplog.records if r.message == "slow save"]
    assert slow and all(r.campaign == "c1" and r.ms >= 0 for r in slow)
    classes = [c for r in slow for c in r.classes]
    assert {c["class_id"] for c in classes} <= {q.class_id for q in qs}
    assert all(c["mode"] in ("b", "l", "n") and c["state_bytes"] >= 0 for c in classes)
    assert sum(c["leases_dropped"] for c in classes) == len(qs)  # the answered questions


def test_a_call_saves_all_its_classes_or_none(wired):
    from redis.exceptions import ResponseError

    wired.publish_pool()
    wired.settle()
    versions = [class_key("c1", k, "version") for k in (0, 1)]
    before = [int(wired.redis.get(v)) for v in versions]
    with pytest.raises(ResponseError, match="LOCKLOST"):
        with wired.core.store.locked("c1", [0, 1]) as batch:
            for held in batch.held.values():
                assert held.loaded.session.lease(5)
                held.changed = True
            wired.redis.delete(class_key("c1", 1, "lock"))  # expired: another may hold it
    assert [int(wired.redis.get(v)) for v in versions] == before  # class 0 not saved either
    assert not wired.redis.exists(class_key("c1", 0, "lock"))  # and its lock released
    # Both unsaved changes were dropped with the cached copies: the questions come again.
    qs, _ = wired.core.lease("c1", 1000)
    assert {0, 1} <= {q.class_id for q in qs}


def test_progress_takes_no_class_lock(wired):
    """Another replica holding a class's lock does not delay progress, warm or cold."""
    wired.publish_pool()
    wired.settle()
    qs, _ = wired.core.lease("c1", 300)
    wired.core.submit(answers_for(wired, qs))
    expected = wired.core.progress("c1")
    assert expected.questions > 0
    wired.redis.set(class_key("c1", 1, "lock"), "another replica", px=60_000)
    started = time.monotonic()
    assert wired.core.progress("c1") == expected  # this process's copies are current
    wired.restart_search()
    assert wired.core.progress("c1") == expected  # no copies: read from the snapshots
    assert time.monotonic() - started < 5.0  # never waited for the lock (60 s timeout)
    assert wired.redis.get(class_key("c1", 1, "lock")) == b"another replica"


def test_progress_and_recover_load_no_session(wired):
    """Progress comes from the counters each save keeps in Redis: a new process answers it
    (and drains the outbox at start) without loading any class."""
    wired.publish_pool()
    wired.settle()
    qs, _ = wired.core.lease("c1", 50)
    wired.core.submit(answers_for(wired, qs))
    first = wired.core.progress("c1")
    wired.restart_search()
    loads = []
    script = wired.core.store._load_script

    def counted(keys, args):
        loads.append(keys)
        return script(keys=keys, args=args)

    wired.core.store._load_script = counted
    wired.core.recover()
    assert wired.core.progress("c1") == first
    assert not loads and len(wired.core.store.cache) == 0


def _library_progress(core, campaign):
    """The progress the library computes from each class's session, restored afresh."""
    from maskprop_search import wire

    classes = {}
    for k in core.classes(campaign):
        with core.store.locked_class(campaign, k) as held:
            classes[k] = wire.class_progress(k, held.loaded.session, held.loaded.masks)
    return wire.progress_response(classes)


def test_progress_counters_equal_the_library_progress(wired):
    from maskprop_search.service import build_search

    wired.publish_pool()
    wired.settle()
    checks = 0
    while True:
        qs, done = wired.core.lease("c1", 61)
        if done:
            break
        wired.core.submit(answers_for(wired, qs))
        checks += 1
        if checks % 4 == 1:
            fresh, _ = build_search(wired.search_settings, wired.bus, wired.redis)
            assert wired.core.progress("c1") == _library_progress(fresh, "c1")
    progress = wired.core.progress("c1")
    assert progress.done and checks > 4
    assert progress == _library_progress(wired.core, "c1")
    assert sum(c.undecided_masks for c in progress.classes) == 0


def test_a_class_is_swept_as_its_tree_arrives_not_in_its_first_lease(wired):
    """What a class decides before its first question (a 1M-mask class: ~470k leaves, ~3 s)
    is decided as its tree arrives: saved with its first base, its labels in the outbox,
    its counters saying so, before any lease; the labels end the same (the test above)."""
    wired.publish_pool()
    wired.settle()
    core = wired.core
    progress = core.progress("c1")
    assert progress == _library_progress(core, "c1")
    decided = sum(c.accepted_masks + c.rejected_masks for c in progress.classes)
    counts, _ = labels_on_bus(wired.bus)  # published as they were saved (embedded)
    assert decided > 0 and len(counts) == decided and set(counts.values()) == {1}
    assert all(c.open_clusters > 0 or c.undecided_masks == 0 for c in progress.classes)
    events = len(wired.bus.read(topics.LABELS))
    qs, _ = core.lease("c1", 50)
    assert len(qs) == 50  # from the clusters opened as the trees arrived: nothing decided
    assert len(wired.bus.read(topics.LABELS)) == events
    assert core.progress("c1").classes == progress.classes


def _reference_labels(tmp_path, pool, **search):
    from tests.inprocess.conftest import Wired

    ref = Wired(tmp_path / "reference", pool, **search)
    ref.publish_pool()
    ref.settle()
    annotate(ref)
    return labels_on_bus(ref.bus)[1]


def test_a_second_replica_catches_up_with_the_chunks_it_lacks(tmp_path, pool):
    """Two SearchCores on one Redis, calls alternating: each applies the other's log chunks to
    its cached copy (no restore from the base) and the labels are the library's."""
    from maskprop_search.service import build_search

    from maskprop.session import AnnotationSession
    from tests.inprocess.conftest import Wired

    expected = _reference_labels(tmp_path, pool)
    w = Wired(tmp_path / "replicas", pool)
    w.publish_pool()
    w.settle()
    other, _ = build_search(w.search_settings, w.bus, w.redis)
    replicas = [w.core, other]
    restores = []
    original = AnnotationSession.restore

    def counted(*a, **k):
        restores.append(1)
        return original(*a, **k)

    AnnotationSession.restore = counted
    try:
        step = 0
        while True:
            core = replicas[step % 2]
            qs, done = core.lease("c1", 17)  # small leases: many hand-overs
            if done:
                break
            replicas[(step + 1) % 2].submit(answers_for(w, qs))  # answers go to the other
            step += 1
    finally:
        AnnotationSession.restore = original
    # Only the second replica's first load of each class restores; after that, chunks.
    assert len(restores) <= len(w.core.classes("c1"))
    assert step > 10
    counts, values = labels_on_bus(w.bus)
    assert set(counts.values()) == {1}
    assert values == expected
    assert other.progress("c1").done


def test_restore_from_base_and_log_equals_the_live_session(wired, monkeypatch, tmp_path, pool):
    """With compaction forced early (small logs), saves alternate chunks and new bases; a new
    process restores each class byte for byte as the live copy, and the labels hold."""
    import maskprop.session

    expected = _reference_labels(tmp_path, pool)
    monkeypatch.setattr(maskprop.session, "MIN_LOG_BEFORE_REBASE", 0)
    wired.publish_pool()
    wired.settle()
    r = wired.redis
    epochs_seen, chunks_seen = set(), 0
    step = 0
    while True:
        qs, done = wired.core.lease("c1", 29)
        if done:
            break
        wired.core.submit(answers_for(wired, qs))
        step += 1
        for k in wired.core.classes("c1"):
            epochs_seen.add(int(r.hget(class_key("c1", k, "state"), "epoch")))
            chunks_seen = max(chunks_seen, r.llen(class_key("c1", k, "log")))
        if step % 5 == 0:
            live = {
                k: wired.core.store.cache.get(("c1", k)).session.snapshot()
                for k in wired.core.classes("c1")
            }
            wired.restart_search()
            for k, snap in live.items():
                with wired.core.store.locked_class("c1", k) as held:
                    assert held.loaded.session.snapshot() == snap
    assert max(epochs_seen) > 2 and chunks_seen >= 1  # compacted, and logged in between
    for k in wired.core.classes("c1"):
        base = r.get(class_key("c1", k, "base"))
        log_bytes = sum(len(c) for c in r.lrange(class_key("c1", k, "log"), 0, -1))
        assert log_bytes < 0.25 * len(base) + 2000  # compaction keeps the log short
    counts, values = labels_on_bus(wired.bus)
    assert set(counts.values()) == {1}
    assert values == expected


def test_lru_bound_evicts_classes_and_reloads_them(tmp_path, pool):
    from tests.inprocess.conftest import Wired

    expected = _reference_labels(tmp_path, pool)
    w = Wired(tmp_path / "bounded", pool, cache_masks=500)
    w.publish_pool()
    w.settle()
    cache = w.core.store.cache
    largest = 0
    while True:
        qs, done = w.core.lease("c1", 300)
        if done:
            break
        w.core.submit(answers_for(w, qs))
        assert cache.masks <= 500 or len(cache) == 1
        largest = max(largest, len(cache))
    assert len(w.core.classes("c1")) == 4 and largest < 4
    counts, values = labels_on_bus(w.bus)
    assert set(counts.values()) == {1}
    assert values == expected


def test_a_lease_serves_the_classes_it_holds_before_loading_others(tmp_path, pool):
    """With more classes than the cache holds, round robin loaded (and evicted) a class on
    nearly every lease; a lease that its cached classes can fill loads nothing."""
    from tests.inprocess.conftest import Wired

    w = Wired(tmp_path / "bounded", pool, cache_masks=1)  # one class at a time
    w.publish_pool()
    w.settle()
    store = w.core.store
    restored: list[int] = []
    restore = store._restore

    def counted(campaign, class_id, *args):
        restored.append(class_id)
        return restore(campaign, class_id, *args)

    store._restore = counted
    first, _ = w.core.lease("c1", 3)
    held = {q.class_id for q in first}
    assert len(held) == 1 and len(store.cache) == 1
    for _ in range(3):  # the rotation would start at another class each time
        qs, _ = w.core.lease("c1", 3)
        assert {q.class_id for q in qs} == held
    assert len(set(restored)) <= 1  # at most the first lease's class was loaded


def test_a_lease_locks_only_the_classes_it_serves(wired):
    wired.publish_pool()
    wired.settle()
    core = wired.core
    locked = []
    script = core.store._acquire_script

    def counted(keys, args):
        locked.append(len(keys) // 2)
        return script(keys=keys, args=args)

    core.store._acquire_script = counted
    qs, done = core.lease("c1", 5)
    assert len(qs) == 5 and not done
    assert locked == [1]  # one class's counters said it could give 5
    core.submit(answers_for(wired, qs))
    locked.clear()
    annotate(wired, batch=10)
    assert sum(locked) < 4 * len(locked)  # most leases did not touch every class
    qs, done = core.lease("c1", 5)
    assert (qs, done) == ([], True)  # done, said from the counters


class FailsFor:
    """The in-memory producer, whose broker refuses every batch holding a key of one
    campaign (a record it cannot take)."""

    def __init__(self, inner, campaign):
        self.inner = inner
        self.prefix = f"{campaign}/".encode()
        self.batch = []

    def send(self, topic, key, value):
        self.batch.append((topic, key, value))

    def flush(self):
        batch, self.batch = self.batch, []
        if any(key.startswith(self.prefix) for _t, key, _v in batch):
            raise ConnectionError("record refused")
        for record in batch:
            self.inner.send(*record)
        self.inner.flush()

    def close(self):
        pass


def test_each_campaign_has_its_own_outbox_and_one_blocked_does_not_hold_the_others(tmp_path, pool):
    import fakeredis
    from maskprop_search.store import outbox_key

    from tests.inprocess.conftest import Wired

    redis = fakeredis.FakeRedis()
    one = Wired(tmp_path / "one", pool, campaign="c1", redis=redis)
    two = Wired(tmp_path / "two", pool, campaign="c2", redis=redis)
    for w in (one, two):
        w.publish_pool()
        w.core.publish_inline = False
        w.settle()
    core = one.core  # one replica serves both campaigns
    for w in (one, two):
        qs, _ = core.lease(w.campaign, 200)
        core.submit(answers_for(w, qs))
    waiting = {c: redis.xlen(outbox_key(c)) for c in ("c1", "c2")}
    assert waiting["c1"] and waiting["c2"]
    core.producer = FailsFor(one.bus.producer(), "c1")
    with pytest.raises(ConnectionError):
        core.drain_outbox()
    assert redis.xlen(outbox_key("c1")) == waiting["c1"]  # kept for the next try
    assert redis.xlen(outbox_key("c2")) == 0  # published all the same
    published = events_on_bus(one.bus)
    assert len(published) == waiting["c2"] and {ev.campaign for ev in published} == {"c2"}
    core.producer = one.bus.producer()
    assert core.drain_outbox() == waiting["c1"]
    assert redis.xlen(outbox_key("c1")) == 0


def test_replicas_lease_their_own_classes_and_take_over_a_silent_one(tmp_path, pool):
    """Live replicas split the classes (rendezvous hashing): each one's leases serve its own
    classes while those have questions; a replica silent for the TTL loses its classes."""
    from maskprop_search.service import build_search
    from maskprop_search.store import REPLICA_TTL_S, owner

    from tests.inprocess.conftest import Wired

    w = Wired(tmp_path, pool)
    w.publish_pool()
    w.settle()
    classes = w.core.classes("c1")
    a_id, b_id = next(
        (f"a{i}", f"b{i}")
        for i in range(100)
        if 1 < sum(owner([f"a{i}", f"b{i}"], "c1", k) == f"a{i}" for k in classes) < 3
    )
    owned = {r: {k for k in classes if owner([a_id, b_id], "c1", k) == r} for r in (a_id, b_id)}
    now = [1000.0]
    a = w.core
    b, _ = build_search(w.search_settings, w.bus, w.redis)
    for core, rid in ((a, a_id), (b, b_id)):
        core.store.replica_id = rid
        core.clock = lambda: now[0]
    qs, _ = b.lease("c1", 1)  # b is live now (a not yet: b owns every class for this call)
    b.submit(answers_for(w, qs))
    for _ in range(2):  # every class starts with its root's sample: more than 10 questions
        for core, rid in ((a, a_id), (b, b_id)):
            qs, _ = core.lease("c1", 10)
            assert len(qs) == 10 and {q.class_id for q in qs} <= owned[rid]
            core.submit(answers_for(w, qs))
    now[0] += REPLICA_TTL_S + 1  # b stops leasing: after the TTL a serves b's classes too
    qs, _ = a.lease("c1", 1000)
    assert {q.class_id for q in qs} & owned[b_id]
    a.submit(answers_for(w, qs))
    while True:
        qs, done = a.lease("c1", 200)
        if done:
            break
        a.submit(answers_for(w, qs))
    counts, _ = labels_on_bus(w.bus)
    assert set(counts) == {mask_id(i) for i in range(len(w.pool))}
    assert set(counts.values()) == {1}


def test_a_lease_whose_caller_timed_out_commits_nothing(wired, caplog):
    """Issue #15: a caller's gRPC deadline passed while its lease waited on a class lock; search
    must not then commit the lease (nobody holds it: its questions would be lost to everyone
    for lease_seconds).  The questions stay in the pool; the client logs the timeout."""
    import logging
    from concurrent import futures

    import grpc
    from maskprop_gateway.search_client import GrpcSearchClient, SearchUnavailable
    from maskprop_search.grpc_api import SearchServicer

    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2_grpc

    wired.publish_pool()
    wired.settle()
    classes = wired.core.classes("c1")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(wired.core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = GrpcSearchClient(f"127.0.0.1:{port}", timeout_s=0.6)
    try:
        # Another call holds every class: the lease waits past its caller's deadline.
        with wired.core.store.locked("c1", classes, load=False):
            with caplog.at_level(logging.WARNING), pytest.raises(SearchUnavailable):
                client.lease("c1", 20, "w1")
            time.sleep(0.3)  # the handler is still waiting on the locks
        assert "LeaseQuestions timed out" in caplog.text
    finally:
        server.stop(grace=30).wait()  # the handler finishes (and must not commit)
        client.close()
    for k in classes:
        assert wired.redis.zcard(class_key("c1", k, "leases")) == 0
    # The budget reserved for it was refunded and its questions are in the pool: the campaign
    # finishes (a lost lease would leave leases empty and the campaign not done for 600 s).
    annotate(wired)
    assert wired.core.progress("c1").done


def test_a_lease_past_its_deadline_gives_back_every_question(wired, monkeypatch):
    """The deadline passes while the lease holds its classes (after the start check): nothing
    stays leased, the call raises CallerGone, and the next lease hands the questions out."""
    import maskprop_search.core as core_mod
    from maskprop_search.core import CallerGone

    wired.publish_pool()
    wired.settle()
    ticks = iter([0.0])  # the first reading (the start check) is in time, later ones are late
    monkeypatch.setattr(core_mod.time, "monotonic", lambda: next(ticks, 100.0))
    with pytest.raises(CallerGone):
        wired.core.lease("c1", 500, answer_by=50.0)
    monkeypatch.undo()
    for k in wired.core.classes("c1"):
        assert wired.redis.zcard(class_key("c1", k, "leases")) == 0
    annotate(wired)
    assert wired.core.progress("c1").done


def annotate_with_top_ups(w, batch=37, top_up=60):
    """A forwarder's pattern: answers delivered with a top-up for their campaign, the pool it
    keeps answered next; a lease only when the pool is dry.  Returns (leases, questions that
    came with answers)."""
    pending, leases, topped = [], 0, 0
    while True:
        if not pending:
            qs, done = w.core.lease(w.campaign, batch)
            leases += 1
            if done:
                return leases, topped
            pending = list(qs)
        take, pending = pending[:batch], pending[batch:]
        applied, dup, stale, new = w.core.submit_and_lease(answers_for(w, take), {"c1": top_up})
        assert (applied, dup, stale) == (len(take), 0, 0)
        topped += len(new)
        pending += new


def test_answers_with_a_top_up_lease_their_classes_new_questions_and_label_the_same(tmp_path, pool):
    """The questions a SubmitAnswers top-up leases come from the classes its answers reached,
    are leased like LeaseQuestions' (answerable once, in Redis), and a run that takes its
    questions so labels every mask as one that only leases."""
    from tests.inprocess.conftest import Wired

    w = Wired(tmp_path / "a", pool)
    w.publish_pool()
    w.settle()
    qs, _ = w.core.lease("c1", 20)
    answered = {q.class_id for q in qs}
    *_, new = w.core.submit_and_lease(answers_for(w, qs), {"c1": 50}, "gateway")
    assert new and {q.class_id for q in new} <= answered
    assert not {q.question_id for q in new} & {q.question_id for q in qs}
    leased = sum(w.redis.zcard(class_key("c1", k, "leases")) for k in w.core.classes("c1"))
    assert leased == len(new)
    assert w.core.submit(answers_for(w, new)) == (len(new), 0, 0)
    assert w.core.submit_and_lease([], {"c1": 10}) == (0, 0, 0, [])  # no answers, no top-up

    leases, topped = annotate_with_top_ups(w)
    assert topped > 10 * leases  # most questions came with the answers
    plain = Wired(tmp_path / "b", pool)
    plain.publish_pool()
    plain.settle()
    annotate(plain)
    assert labels_on_bus(w.bus)[1] == labels_on_bus(plain.bus)[1]
    counts, _ = labels_on_bus(w.bus)
    assert set(counts.values()) == {1}


def test_a_top_up_past_its_callers_deadline_saves_the_answers_and_leases_nothing(
    wired, monkeypatch
):
    import maskprop_search.core as core_mod

    wired.publish_pool()
    wired.settle()
    qs, _ = wired.core.lease("c1", 20)
    monkeypatch.setattr(core_mod.time, "monotonic", lambda: 100.0)
    applied, _, _, new = wired.core.submit_and_lease(
        answers_for(wired, qs), {"c1": 200}, answer_by=50.0
    )
    monkeypatch.undo()
    assert applied == len(qs) and new == []
    for k in wired.core.classes("c1"):
        assert wired.redis.zcard(class_key("c1", k, "leases")) == 0
    annotate(wired)
    assert wired.core.progress("c1").done


def test_the_grpc_api_checks_top_ups_and_returns_their_questions(wired):
    from concurrent import futures

    import grpc
    from maskprop_gateway.search_client import GrpcSearchClient, SearchRejected
    from maskprop_search.grpc_api import MAX_TOP_UPS, SearchServicer

    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2_grpc

    wired.publish_pool()
    wired.settle()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(wired.core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = GrpcSearchClient(f"127.0.0.1:{port}")
    try:
        qs, _ = client.lease("c1", 20, "w1")
        answers = answers_for(wired, qs)
        for bad in ({"c1": 0}, {"c1": 1001}, {"../x": 5}):
            with pytest.raises(SearchRejected):
                client.submit(answers, bad)
        many = {f"c{i}": 1 for i in range(MAX_TOP_UPS + 1)}
        with pytest.raises(SearchRejected, match="top-ups"):
            client.submit(answers, many)
        done = client.submit(answers, {"c1": 30}, "gateway")
        assert done.applied == len(qs) and 0 < len(done.questions) <= 30
        assert all(q.campaign == "c1" and q.rle.counts for q in done.questions)
    finally:
        server.stop(0)
        client.close()
