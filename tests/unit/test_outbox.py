"""The runtime Outbox (maskprop_runtime.outbox) on fakeredis with its Lua engine."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from maskprop_runtime.outbox import Outbox

KEY = "maskprop:test:outbox"


class Recorder:
    """A ``publish`` that records its batches; raises while ``fail`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[bytes, bytes]]] = []
        self.fail = False

    def __call__(self, entries: list[tuple[bytes, bytes]]) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.batches.append(entries)

    @property
    def entries(self) -> list[tuple[bytes, bytes]]:
        return [e for b in self.batches for e in b]


def make(batch: int = 200) -> tuple[fakeredis.FakeRedis, Outbox]:
    r = fakeredis.FakeRedis()
    return r, Outbox(r, KEY, batch=batch)


def test_drain_publishes_in_append_order_in_batches_and_acks() -> None:
    r, box = make(batch=3)
    box.append([(f"k{i}", f"v{i}") for i in range(7)])
    assert box.pending() == 7
    pub = Recorder()
    assert box.drain(pub) == 7
    assert [len(b) for b in pub.batches] == [3, 3, 1]
    assert pub.entries == [(f"k{i}".encode(), f"v{i}".encode()) for i in range(7)]
    assert box.pending() == 0  # acked entries are deleted
    assert not r.exists(box.lock_key)  # the relay lock is released
    assert box.drain(pub) == 0


def test_drain_batch_argument_overrides_the_default() -> None:
    _, box = make(batch=200)
    box.append([(b"k", bytes([i])) for i in range(5)])
    pub = Recorder()
    assert box.drain(pub, batch=2) == 5
    assert [len(b) for b in pub.batches] == [2, 2, 1]


def test_append_on_a_pipeline_is_written_with_the_callers_state() -> None:
    r, box = make()
    pipe = r.pipeline(transaction=True)
    pipe.set("state", b"1")
    box.append([(b"k", b"v")], pipe=pipe)
    assert box.pending() == 0  # nothing before the caller executes its pipeline
    pipe.execute()
    assert r.get("state") == b"1"
    assert box.pending() == 1


def test_a_lua_script_appends_with_xadd_into_key() -> None:
    r, box = make()
    save = r.register_script(
        "redis.call('set', KEYS[2], ARGV[1]) "
        "redis.call('xadd', KEYS[1], '*', 'k', ARGV[2], 'v', ARGV[3]) return 0"
    )
    save(keys=[box.key, "state"], args=[b"s", b"key", b"value"])
    pub = Recorder()
    assert box.drain(pub) == 1
    assert pub.entries == [(b"key", b"value")]


def test_publish_raising_leaves_the_entries_for_the_next_try() -> None:
    r, box = make(batch=2)
    box.append([(b"k", b"a"), (b"k", b"b"), (b"k", b"c")])
    pub = Recorder()
    pub.fail = True
    with pytest.raises(ConnectionError):
        box.drain(pub)
    assert box.pending() == 3
    assert not r.exists(box.lock_key)  # released at once so another relay may retry
    pub.fail = False
    assert box.drain(pub) == 3
    assert pub.entries == [(b"k", b"a"), (b"k", b"b"), (b"k", b"c")]


def test_a_second_relay_holding_the_lock_publishes_nothing() -> None:
    r, box = make()
    box.append([(b"k", b"v")])
    r.set(box.lock_key, "another-relay", px=10_000)
    pub = Recorder()
    assert box.drain(pub) == 0
    assert pub.batches == []
    assert box.pending() == 1
    assert r.get(box.lock_key) == b"another-relay"  # not taken over or released
    r.delete(box.lock_key)  # the other relay finished (or its TTL ran out)
    assert box.drain(pub) == 1


def test_relay_lock_has_a_ttl() -> None:
    r, box = make()
    box.append([(b"k", b"v")])
    ttls: list[int] = []
    box.drain(lambda entries: ttls.append(r.pttl(box.lock_key)))
    assert 0 < ttls[0] <= box.lock_ms


def test_run_relay_publishes_when_signalled_and_stops() -> None:
    _, box = make()
    pub = Recorder()
    stop = threading.Event()
    relay = threading.Thread(target=box.run_relay, args=(pub, stop), kwargs={"idle_s": 5.0})
    relay.start()
    try:
        box.append([(b"k", b"v")])
        box.signal()
        deadline = time.monotonic() + 5.0
        while box.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.entries == [(b"k", b"v")]
    finally:
        stop.set()
        box.signal()
        relay.join(timeout=5.0)
    assert not relay.is_alive()


def test_run_relay_retries_after_a_failed_publish() -> None:
    _, box = make()
    pub = Recorder()
    pub.fail = True
    box.append([(b"k", b"v")])
    stop = threading.Event()
    relay = threading.Thread(target=box.run_relay, args=(pub, stop), kwargs={"idle_s": 0.05})
    relay.start()
    try:
        time.sleep(0.1)
        assert box.pending() == 1
        pub.fail = False
        deadline = time.monotonic() + 5.0
        while box.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.entries == [(b"k", b"v")]
    finally:
        stop.set()
        relay.join(timeout=5.0)
    assert not relay.is_alive()


def test_rejects_non_positive_settings() -> None:
    r = fakeredis.FakeRedis()
    with pytest.raises(ValueError):
        Outbox(r, KEY, batch=0)
    with pytest.raises(ValueError):
        Outbox(r, KEY, lock_ms=0)
