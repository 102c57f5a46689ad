"""Search's state in Redis: its key schema, the class locks, versions, this process's cache of
sessions, and the loads and saves (the Lua scripts), all in one place.

Redis keys (``{c}`` campaign, ``{k}`` class id):

* ``maskprop:search:{c}:classes``  hash  class id -> JSON (class name, tree path, masks)
* ``maskprop:search:{c}:{k}:session`` bytes  the session snapshot
* ``maskprop:search:{c}:{k}:version`` int  bumped on every save (in-process cache check)
* ``maskprop:search:{c}:{k}:leases``  zset question id -> lease deadline (unix seconds)
* ``maskprop:search:{c}:{k}:lock``  the per-class lock (several replicas may serve a campaign)
* ``maskprop:search:outbox``  the label outbox (:class:`maskprop_runtime.outbox.Outbox`):
  LabelsPropagated events not yet acknowledged by the broker, every campaign's (``k`` Kafka
  key, ``v`` serialized event); its relay lock is ``maskprop:search:outbox:relay``

Durability (transactional outbox): one Lua script saves a class's snapshot, its version, its
lease changes and the serialized label events its new decisions produced (XADD into the
outbox), and releases the class lock.  The outbox relay publishes them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import LockError

from maskprop.session import AnnotationSession
from maskprop.tree import Tree
from maskprop_runtime.outbox import Outbox
from maskprop_search import wire
from maskprop_search.wire import BadRequest, ClassMasks

T = TypeVar("T")

LOCK_TIMEOUT_S = 60.0
OUTBOX_KEY = "maskprop:search:outbox"
RELAY_LOCK_MS = 10_000  # a relay killed mid-batch delays the outbox this long
#: Events per broker flush when the relay publishes the outbox (an event is at most
#: wire.LABELS_PER_EVENT labels, ~1 MB; sweeps make small ones).
RELAY_BATCH = 200
#: Arguments per Lua ``unpack`` (Lua's C stack limit is 8000).
_UNPACK = 1000


def classes_key(campaign: str) -> str:
    """The hash of a campaign's classes (class id -> JSON meta)."""
    return f"maskprop:search:{campaign}:classes"


def class_key(campaign: str, class_id: int, what: str) -> str:
    """A class's key: ``what`` is ``session``, ``version``, ``leases`` or ``lock``."""
    return f"maskprop:search:{campaign}:{class_id}:{what}"


# KEYS: (lock, version) of each class; ARGV: token, ttl ms.  All the classes' locks or none:
# the stored version of each (the locks now ours), nil while another holder has any of them.
_ACQUIRE = """
for i = 1, #KEYS, 2 do
  if redis.call('exists', KEYS[i]) == 1 then return false end
end
local out = {}
for i = 1, #KEYS, 2 do
  redis.call('set', KEYS[i], ARGV[1], 'PX', ARGV[2])
  out[#out + 1] = tonumber(redis.call('get', KEYS[i + 1]) or '0')
end
return out
"""
# KEYS: locks; ARGV: token.  Delete the locks that are still ours (one may have expired).
_RELEASE = """
for i = 1, #KEYS do
  if redis.call('get', KEYS[i]) == ARGV[1] then redis.call('del', KEYS[i]) end
end
return 0
"""
# KEYS: the outbox, then (lock, session, version, leases) of each class saved, then the locks
# of classes only released.  ARGV: token, unpack chunk, classes saved, then per
# class saved: snapshot, n_drop, n_add, n_events, the dropped question ids, the added
# (deadline, question id) pairs and the (Kafka key, event) pairs.  One atomic round trip for
# every class a call touched: the states and the labels they decided are saved together (the
# outbox), and the locks are released.  Refused, writing nothing, when any lock is no longer
# ours (it expired and another replica may have saved since).  Returns the new versions.
_SAVE = """
local token, chunk, m = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for k = 0, m - 1 do
  if redis.call('get', KEYS[2 + 4 * k]) ~= token then
    return redis.error_reply('LOCKLOST class lock expired before the save')
  end
end
for i = 2 + 4 * m, #KEYS do
  if redis.call('get', KEYS[i]) ~= token then
    return redis.error_reply('LOCKLOST class lock expired before the save')
  end
end
local versions = {}
local i = 4
for k = 0, m - 1 do
  local leases = KEYS[5 + 4 * k]
  redis.call('set', KEYS[3 + 4 * k], ARGV[i])
  versions[#versions + 1] = redis.call('incr', KEYS[4 + 4 * k])
  local n_drop, n_add = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local n_events = tonumber(ARGV[i + 3])
  i = i + 4
  local last = i + n_drop - 1
  while i <= last do
    local j = math.min(i + chunk - 1, last)
    redis.call('zrem', leases, unpack(ARGV, i, j))
    i = j + 1
  end
  last = i + 2 * n_add - 1
  while i <= last do
    local j = math.min(i + 2 * chunk - 1, last)
    redis.call('zadd', leases, unpack(ARGV, i, j))
    i = j + 1
  end
  last = i + 2 * n_events - 1
  while i <= last do
    redis.call('xadd', KEYS[1], '*', 'k', ARGV[i], 'v', ARGV[i + 1])
    i = i + 2
  end
end
for k = 0, m - 1 do redis.call('del', KEYS[2 + 4 * k]) end
for j = 2 + 4 * m, #KEYS do redis.call('del', KEYS[j]) end
return versions
"""
# KEYS: per class its leases zset and its version; ARGV: now.  Per class (flat): 1 if a lease
# is overdue, and the stored version.  One command instead of a pipeline of two a class.
_SURVEY = """
local out = {}
for i = 1, #KEYS, 2 do
  local hit = redis.call('zrangebyscore', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, 1)
  out[#out + 1] = #hit
  out[#out + 1] = tonumber(redis.call('get', KEYS[i + 1]) or '0')
end
return out
"""
# KEYS: per class its version and its session; ARGV: per class the version of this process's
# copy (-1: none).  Per class (flat): the stored version, and the snapshot unless the copy is
# at that version (nil then).  Read without any lock: the save writes both atomically.
_READ = """
local out = {}
for i = 1, #KEYS, 2 do
  local v = tonumber(redis.call('get', KEYS[i]) or '0')
  out[#out + 1] = v
  if v == tonumber(ARGV[(i + 1) / 2]) then
    out[#out + 1] = false
  else
    out[#out + 1] = redis.call('get', KEYS[i + 1])
  end
end
return out
"""


@dataclass
class Loaded:
    """A class's session at a stored ``version``, with its tree and masks (never change)."""

    version: int
    session: AnnotationSession
    tree: Tree
    masks: ClassMasks


@dataclass
class Held:
    """A class locked by this caller: the lock's token, the stored version, the session, and
    what to save with it when the call ends (``changed``: the session itself)."""

    campaign: str
    class_id: int
    token: str
    version: int
    loaded: Loaded | None = None
    changed: bool = False
    add_leases: dict[str, float] = field(default_factory=dict)
    drop_leases: list[str] = field(default_factory=list)


@dataclass
class Batch:
    """The classes of one campaign a call holds (class id -> :class:`Held`), and the label
    events their save put in the outbox (set when the batch ends)."""

    held: dict[int, Held]
    events: int = 0


class SearchStore:
    """Search's sessions in Redis and this process's cache of them.

    ``outbox``: the label outbox; saves append to it and :meth:`Outbox.signal` its relay."""

    def __init__(self, redis: Any) -> None:
        self.r = redis
        self.outbox = Outbox(redis, OUTBOX_KEY, lock_ms=RELAY_LOCK_MS, batch=RELAY_BATCH)
        self._cache: dict[tuple[str, int], Loaded] = {}
        self._local_locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Script objects reload themselves after a Redis restart (NOSCRIPT).
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._release_script = redis.register_script(_RELEASE)
        self._save_script = redis.register_script(_SAVE)
        self._survey_script = redis.register_script(_SURVEY)
        self._read_script = redis.register_script(_READ)

    # ------------------------------------------------------------------ campaigns, classes
    def classes(self, campaign: str) -> list[int]:
        return sorted(int(k) for k in self.r.hkeys(classes_key(campaign)))

    def campaign_exists(self, campaign: str) -> bool:
        """Whether any class of ``campaign`` has reached search (one EXISTS)."""
        return bool(self.r.exists(classes_key(campaign)))

    def has_session(self, campaign: str, class_id: int) -> bool:
        return bool(self.r.exists(class_key(campaign, class_id, "session")))

    def create(
        self,
        campaign: str,
        class_id: int,
        session: AnnotationSession,
        tree: Tree,
        masks: ClassMasks,
        meta: dict[str, Any],
    ) -> None:
        """Store a new class's session and ``meta`` (one MULTI); call with the class locked.
        The copy stays cached: questions come next."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(class_key(campaign, class_id, "session"), session.snapshot())
        pipe.incr(class_key(campaign, class_id, "version"))
        pipe.hset(classes_key(campaign), str(class_id), json.dumps(meta))
        version = int(pipe.execute()[1])
        self._cache[(campaign, class_id)] = Loaded(version, session, tree, masks)

    # ------------------------------------------------------------------ leases
    def survey(
        self, campaign: str, class_ids: list[int], now: float
    ) -> tuple[list[int], list[int]]:
        """Per class of ``class_ids`` (one round trip): whether a lease is overdue at ``now``
        (0/1), and the stored version."""
        keys: list[str] = []
        for k in class_ids:
            keys += (class_key(campaign, k, "leases"), class_key(campaign, k, "version"))
        replies = self._survey_script(keys=keys, args=[now])
        return [int(h) for h in replies[0::2]], [int(v) for v in replies[1::2]]

    def overdue_leases(self, campaign: str, class_id: int, now: float) -> list[str]:
        """Question ids of the class whose lease deadline is at or before ``now``."""
        key = class_key(campaign, class_id, "leases")
        return [q.decode() for q in self.r.zrangebyscore(key, "-inf", now)]

    def idle(self, campaign: str, class_id: int, version: int) -> bool | None:
        """Whether the class is done, if this process's copy is current at ``version`` and
        has no question to hand out (every open cluster waits for answers, no candidate
        left): then leasing skips it without taking its locks.  None: it must be locked.

        A copy newer than ``version`` (this process saved it after the survey read the
        version) is as current as the survey: under concurrent leases that is the usual case,
        and locking the class only to find it idle cost two round trips."""
        cached = self._cache.get((campaign, class_id))
        if cached is None or cached.version < version:
            return None
        local = self._local_lock(campaign, class_id)
        if not local.acquire(blocking=False):
            return None  # another thread is changing it
        try:
            if cached.version < version or cached.session.has_questions():
                return None
            return cached.session.done
        finally:
            local.release()

    # ------------------------------------------------------------------ lock-free reads
    def read(
        self,
        campaign: str,
        class_ids: Iterable[int],
        view: Callable[[int, AnnotationSession, ClassMasks], T],
    ) -> dict[int, T]:
        """``view(class_id, session, masks)`` of each class's stored state (class id -> what
        it returns), taking no class lock: a replica holding one does not delay the read.

        One round trip reads every class's version, and the snapshots of those this process
        has no current copy of (the save writes both atomically).  A current copy is viewed
        under its local lock, taken only if free: a thread of this process changing it may
        have it ahead of Redis; those few classes are then read from their snapshots (a
        second round trip).  Copies restored here are cached for the calls that come next."""
        ids = sorted(set(class_ids))
        out: dict[int, T] = {}
        if not ids:
            return out
        copies = {k: self._cache.get((campaign, k)) for k in ids}
        busy = self._read_into(out, campaign, ids, copies, view, snapshots=False)
        if busy:
            self._read_into(out, campaign, busy, copies, view, snapshots=True)
        return out

    def _read_into(
        self,
        out: dict[int, T],
        campaign: str,
        ids: list[int],
        copies: dict[int, Loaded | None],
        view: Callable[[int, AnnotationSession, ClassMasks], T],
        *,
        snapshots: bool,
    ) -> list[int]:
        """One round of :meth:`read`; ``snapshots``: read every snapshot, copies or not.
        Returns the classes whose current copy was busy."""
        keys: list[str] = []
        args: list[int] = []
        for k in ids:
            keys += (class_key(campaign, k, "version"), class_key(campaign, k, "session"))
            copy = copies[k]
            args.append(-1 if snapshots or copy is None else copy.version)
        replies = self._read_script(keys=keys, args=args)
        busy = []
        for k, version, blob in zip(ids, replies[0::2], replies[1::2], strict=True):
            version = int(version)
            copy = copies[k]
            local = self._local_lock(campaign, k)
            if blob is None and copy is not None and not snapshots:
                # Current when read; still current if no thread of this process saved since
                # (a save bumps the copy's version in place) and none is changing it now.
                if local.acquire(blocking=False):
                    try:
                        if copy is self._cache.get((campaign, k)) and copy.version == version:
                            out[k] = view(k, copy.session, copy.masks)
                            continue
                    finally:
                        local.release()
                busy.append(k)
                continue
            loaded = self._restore(campaign, k, version, blob, copy)
            out[k] = view(k, loaded.session, loaded.masks)
            if local.acquire(blocking=False):
                try:
                    cached = self._cache.get((campaign, k))
                    if cached is None or cached.version < version:
                        self._cache[(campaign, k)] = loaded
                finally:
                    local.release()
        return busy

    # ------------------------------------------------------------------ locked calls
    @contextmanager
    def locked(
        self, campaign: str, class_ids: Iterable[int], *, load: bool = True
    ) -> Iterator[Batch]:
        """Lock classes of a campaign and load their sessions (``held.loaded``); when the
        block ends, save the classes marked ``changed`` (with their lease changes and the
        label events of their new decisions) and release every lock, in one round trip.

        Threads of this process queue on local locks first (taken in class order, so two
        calls never wait on each other crosswise; woken at once, no polling); the Redis locks
        then only arbitrate between replicas, so they are usually free, and taking them reads
        the versions too: one round trip for all the classes a call touches, and one to save
        them (two a class made search spend ~a third of its time in redis-py round trips).
        If anything fails half-way (Redis down, a lock lost), the in-memory copies may be
        ahead of Redis: they are dropped, so the next call restores the last saved state."""
        ids = sorted(set(class_ids))
        token = os.urandom(12).hex()
        with ExitStack() as stack:
            for k in ids:
                stack.enter_context(self._local_lock(campaign, k))
            versions = self._acquire(campaign, ids, token) if ids else []
            batch = Batch(
                {k: Held(campaign, k, token, v) for k, v in zip(ids, versions, strict=True)}
            )
            try:
                if load:
                    for held in batch.held.values():
                        held.loaded = self._load(held)
                yield batch
                batch.events = self._save(batch)
            except BaseException:
                for k in ids:
                    self._cache.pop((campaign, k), None)
                if ids:  # the save releases them; it failed or never ran
                    with suppress(Exception):  # Redis down: the locks expire by themselves
                        self._release_script(
                            keys=[class_key(campaign, k, "lock") for k in ids], args=[token]
                        )
                raise

    @contextmanager
    def locked_class(self, campaign: str, class_id: int) -> Iterator[Held]:
        """:meth:`locked` of one class."""
        with self.locked(campaign, [class_id]) as batch:
            yield batch.held[class_id]

    def _acquire(self, campaign: str, class_ids: list[int], token: str) -> list[int]:
        """Take the classes' Redis locks (60 s TTL; all or none, polled every 5 ms for up to
        60 s) and return the sessions' stored versions."""
        keys: list[str] = []
        for k in class_ids:
            keys += (class_key(campaign, k, "lock"), class_key(campaign, k, "version"))
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            got = self._acquire_script(keys=keys, args=[token, int(LOCK_TIMEOUT_S * 1000)])
            if got is not None:
                return [int(v) for v in got]
            if time.monotonic() > deadline:
                raise LockError(
                    f"could not lock classes {class_ids} of {campaign!r} "
                    f"within {LOCK_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.005)

    def _local_lock(self, campaign: str, class_id: int) -> threading.Lock:
        with self._locks_guard:
            return self._local_locks.setdefault((campaign, class_id), threading.Lock())

    def _load(self, held: Held) -> Loaded:
        """The class's session (cached while the stored version is unchanged); call locked."""
        campaign, class_id = held.campaign, held.class_id
        cached = self._cache.get((campaign, class_id))
        if cached is not None and cached.version == held.version:
            return cached
        blob = self.r.get(class_key(campaign, class_id, "session"))
        loaded = self._restore(campaign, class_id, held.version, blob, cached)
        self._cache[(campaign, class_id)] = loaded
        return loaded

    def _restore(
        self, campaign: str, class_id: int, version: int, blob: bytes | None, copy: Loaded | None
    ) -> Loaded:
        """The session of snapshot ``blob`` at ``version``, over the tree of this process's
        older ``copy`` if any (trees never change), else the tree file the class's meta names."""
        if blob is None:
            raise BadRequest(f"campaign {campaign!r} has no class {class_id}")
        if copy is not None:
            tree, masks = copy.tree, copy.masks
        else:
            meta_raw = self.r.hget(classes_key(campaign), str(class_id))
            if meta_raw is None:
                raise BadRequest(f"campaign {campaign!r} has no class {class_id}")
            tree, masks = wire.load_class(Path(json.loads(meta_raw)["tree_uri"]))
        session = AnnotationSession.restore(blob, {class_id: tree})
        return Loaded(version, session, tree, masks)

    def _save(self, batch: Batch) -> int:
        """Save the batch's changed classes (sessions, lease changes, the label events of
        their new decisions) and release all its locks, in one round trip.  Returns the
        number of events added to the outbox (its relay is signalled when there are any)."""
        held = list(batch.held.values())
        changed = [h for h in held if h.changed]
        if not held:
            return 0
        campaign = held[0].campaign
        keys: list[str] = [self.outbox.key]
        args: list[Any] = [held[0].token, _UNPACK, len(changed)]
        events = 0
        for h in changed:
            loaded = h.loaded
            assert loaded is not None
            k = h.class_id
            decisions = [d for d in loaded.session.pop_decisions() if d.terminal]
            entries = wire.label_entries(campaign, k, loaded.masks, loaded.session, decisions)
            keys += (
                class_key(campaign, k, "lock"),
                class_key(campaign, k, "session"),
                class_key(campaign, k, "version"),
                class_key(campaign, k, "leases"),
            )
            args += (
                loaded.session.snapshot(),
                len(h.drop_leases),
                len(h.add_leases),
                len(entries),
                *h.drop_leases,
            )
            for qid, deadline in h.add_leases.items():
                args += (deadline, qid)
            for entry in entries:
                args += entry
            events += len(entries)
        keys += [class_key(campaign, h.class_id, "lock") for h in held if not h.changed]
        versions = self._save_script(keys=keys, args=args)
        for h, version in zip(changed, versions, strict=True):
            assert h.loaded is not None
            h.loaded.version = h.version = int(version)
        if events:
            self.outbox.signal()
        return events
