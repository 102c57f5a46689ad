"""The one durable queue (transactional outbox) of maskprop: a Redis stream that producers append
to in the same atomic write as their state change, and a relay publishes from.

Why an outbox: a service that changes its state in Redis and then publishes an event can crash
in between, losing the event, or publish and then fail to save, announcing a change that never
happened.  Appending the event to a stream inside the same Lua script (or MULTI) as the state
change makes both durable together; the relay then publishes at least once, and consumers
dedupe by event id.

Stream entries have two fields: ``k`` (a key, e.g. the Kafka partition key) and ``v`` (a value,
e.g. a serialized protobuf event), both bytes.  A producer's own Lua script appends with::

    redis.call('xadd', KEYS[i], '*', 'k', key, 'v', value)   -- KEYS[i] = outbox.key

One relay at a time (a lock with a TTL, so a relay killed mid-batch delays the queue by at most
``lock_ms``) takes the oldest entries in batches, hands them to ``publish`` and deletes them only
after ``publish`` returned: an acknowledgement.  A ``publish`` that raises leaves them for the
next try.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from maskprop_runtime.watchdog import Heartbeat

log = logging.getLogger(__name__)

#: Arguments per Lua ``unpack`` (Lua's C stack limit is 8000).
_UNPACK = 1000

# KEYS: relay lock, stream; ARGV: token, ttl ms, count.  The oldest ``count`` entries (taking
# the relay lock), an empty list when there are none (the lock not taken), or nil while another
# relay holds the lock (one publisher at a time, so replicas do not publish every entry twice).
_TAKE = """
if redis.call('xlen', KEYS[2]) == 0 then
  return {}
end
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] then
  return false
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('xrange', KEYS[2], '-', '+', 'COUNT', ARGV[3])
"""
# KEYS: relay lock, stream; ARGV: token, chunk, entry ids.  Delete the published entries and
# release the relay lock if it is still ours.
_DONE = """
local chunk = tonumber(ARGV[2])
local i = 3
while i <= #ARGV do
  local j = math.min(i + chunk - 1, #ARGV)
  redis.call('xdel', KEYS[2], unpack(ARGV, i, j))
  i = j + 1
end
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
end
return 0
"""

#: ``publish(entries)``: hands a batch of ``(key, value)`` pairs, oldest first, to the broker
#: and returns only once the broker acknowledged them all (raises otherwise).
Publish = Callable[[list[tuple[bytes, bytes]]], None]


class Outbox:
    """A durable queue on a Redis stream: producers append entries (field ``k``: a key, field
    ``v``: a value, both bytes/str) in the SAME atomic write as their state change (inside their
    own Lua script: ``redis.call('xadd', <outbox.key>, '*', 'k', K, 'v', V)``, or with
    :meth:`append` on a MULTI pipeline); one relay at a time (a lock with a TTL) takes the
    oldest entries in batches, hands them to ``publish`` and deletes them only after publish
    returned (ack); a publish that raises leaves them for the next try (at-least-once; consumers
    dedupe).

    ``key``: the stream key; the relay lock is ``key + ":relay"``.  ``lock_ms``: the relay
    lock's TTL in milliseconds (how long a relay killed mid-batch holds the queue up).
    ``batch``: entries per :meth:`drain` batch, i.e. per ``publish`` call."""

    def __init__(self, redis: Any, key: str, *, lock_ms: int = 10_000, batch: int = 200) -> None:
        if lock_ms <= 0 or batch <= 0:
            raise ValueError(f"lock_ms and batch must be positive, got {lock_ms}, {batch}")
        self.r = redis
        self.key = key
        self.lock_key = f"{key}:relay"
        self.lock_ms = lock_ms
        self.batch = batch
        # Script objects reload themselves after a Redis restart (NOSCRIPT).
        self._take = redis.register_script(_TAKE)
        self._done = redis.register_script(_DONE)
        self._signal = threading.Event()

    def append(self, entries: Iterable[tuple[bytes | str, bytes | str]], pipe: Any = None) -> None:
        """Append ``(key, value)`` entries, in order.  With ``pipe`` (a MULTI pipeline carrying
        the caller's state change) they are queued on it and written when the caller executes
        it; without, they are written now (one round trip)."""
        target = self.r.pipeline(transaction=True) if pipe is None else pipe
        for k, v in entries:
            target.xadd(self.key, {"k": k, "v": v})
        if pipe is None:
            target.execute()

    def drain(self, publish: Publish, *, batch: int | None = None) -> int:
        """Publish the queue: batches of up to ``batch`` entries (default: the constructor's),
        one ``publish`` call each, deleted once it returned, until the queue is empty.  Returns
        the entries published; 0 as well while another relay holds the lock (it publishes
        them).  A ``publish`` that raises releases the lock, leaves the batch queued and
        re-raises."""
        n = self.batch if batch is None else batch
        token = os.urandom(12).hex()
        keys = [self.lock_key, self.key]
        sent = 0
        while True:
            taken = self._take(keys=keys, args=[token, self.lock_ms, n])
            if not taken:  # none left, or another relay is publishing them
                return sent
            entries = []
            for _entry_id, fields in taken:
                f = dict(zip(fields[::2], fields[1::2], strict=True))
                entries.append((f[b"k"], f[b"v"]))
            try:
                publish(entries)
            except BaseException:
                self._done(keys=keys, args=[token, _UNPACK])  # others may retry now
                raise
            self._done(keys=keys, args=[token, _UNPACK, *(e[0] for e in taken)])
            sent += len(taken)
            if len(taken) < n:
                return sent

    def run_relay(
        self,
        publish: Publish,
        stop: threading.Event,
        *,
        idle_s: float = 0.2,
        linger_s: float = 0.0,
    ) -> None:
        """The relay loop, until ``stop``: :meth:`drain` as entries arrive (woken by
        :meth:`signal`) and every ``idle_s`` seconds (entries other processes or a crashed one
        left).  Woken, it first waits ``linger_s`` seconds for more: under load one ``publish``
        then carries the entries of many writes instead of one or two.  Errors (broker or
        Redis down) are logged and retried after ~1 s; the entries wait in Redis."""
        relay_loop(
            lambda: self.drain(publish),
            self._signal,
            stop,
            idle_s=idle_s,
            linger_s=linger_s,
            name=self.key,
        )

    def signal(self) -> None:
        """Wake this process's relay thread now (call after appending)."""
        self._signal.set()

    def pending(self) -> int:
        """Entries waiting to be published (XLEN)."""
        return int(self.r.xlen(self.key))


def relay_loop(
    drain: Callable[[], int],
    wake: threading.Event,
    stop: threading.Event,
    *,
    idle_s: float = 0.2,
    linger_s: float = 0.0,
    name: str = "",
    heartbeat: Heartbeat | None = None,
) -> None:
    """The loop of :meth:`Outbox.run_relay` over any ``drain()`` (returns entries published),
    for a relay of several outboxes too: drain when ``wake`` is set and every ``idle_s``
    seconds, lingering ``linger_s`` for more after a wake, until ``stop``; errors are logged
    and retried after ~1 s.  ``heartbeat`` is beaten each time round (watchdog.py)."""
    while not stop.is_set():
        if heartbeat is not None:
            heartbeat.beat()
        wake.clear()
        try:
            sent = drain()
        except Exception as exc:
            log.error("outbox relay failed; retrying", extra={"outbox": name, "error": str(exc)})
            stop.wait(1.0)
            continue
        if not sent and wake.wait(idle_s) and linger_s:
            stop.wait(linger_s)
        elif sent and linger_s:
            stop.wait(linger_s)
