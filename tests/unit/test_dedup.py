"""DedupStore (maskprop_runtime.loop): event ids a service handled, remembered for a while."""

from __future__ import annotations

import time

import fakeredis
import pytest

from maskprop_runtime.loop import DEDUP_TTL_S, DedupStore


def test_marked_ids_are_seen_per_service() -> None:
    r = fakeredis.FakeRedis()
    search, clusterer = DedupStore(r, "search"), DedupStore(r, "clusterer")
    assert not search.seen("e1")
    search.mark(["e1", "e2"])
    assert search.seen("e1") and search.seen("e2")
    assert not search.seen("e3")
    assert not clusterer.seen("e1")  # each service its own records
    search.mark([])  # nothing handled in a poll: no write


def test_records_expire_after_the_ttl() -> None:
    r = fakeredis.FakeRedis()
    dedup = DedupStore(r, "search", ttl_s=1)
    dedup.mark(["e1"])
    assert dedup.seen("e1")
    time.sleep(1.1)
    assert not dedup.seen("e1")
    assert not r.keys("maskprop:dedup:*")  # the memory is freed, not only the answer


def test_default_ttl_is_a_week_on_every_record() -> None:
    r = fakeredis.FakeRedis()
    DedupStore(r, "search").mark(["a", "b"])
    keys = r.keys("maskprop:dedup:search:*")
    assert len(keys) == 2
    assert DEDUP_TTL_S == 7 * 24 * 3600
    assert all(DEDUP_TTL_S - 5 <= r.ttl(k) <= DEDUP_TTL_S for k in keys)


def test_mark_is_one_round_trip_per_batch() -> None:
    r = fakeredis.FakeRedis()
    executes = 0
    pipeline = r.pipeline

    def counting(*a, **k):
        pipe = pipeline(*a, **k)
        execute = pipe.execute

        def counted(*ea, **ek):
            nonlocal executes
            executes += 1
            return execute(*ea, **ek)

        pipe.execute = counted
        return pipe

    r.pipeline = counting  # type: ignore[method-assign]
    DedupStore(r, "search").mark([f"e{i}" for i in range(50)])
    assert executes == 1


def test_rejects_a_non_positive_ttl() -> None:
    with pytest.raises(ValueError):
        DedupStore(fakeredis.FakeRedis(), "search", ttl_s=0)
