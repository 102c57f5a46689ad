"""Search's state in Redis: its key schema, the class locks, versions, this process's cache of
sessions, and the loads and saves (the Lua scripts), all in one place.

Redis keys (``{c}`` campaign, ``{k}`` class id):

* ``maskprop:search:{c}:classes``  hash  class id -> JSON (class name, tree path, masks)
* ``maskprop:search:{c}:{k}:base``  bytes  the session's base (:meth:`AnnotationSession.rebase`)
* ``maskprop:search:{c}:{k}:log``  list  the change-log chunks written over that base since
  (:meth:`AnnotationSession.take_log`), in order: chunk ``i`` (from 1) is element ``i - 1``
* ``maskprop:search:{c}:{k}:state``  hash  ``epoch`` (bumped with every new base) and the
  class's progress counters (``masks accepted rejected undecided open questions
  clusters_accepted clusters_rejected done ready``), written by the same save
* ``maskprop:search:{c}:{k}:version`` int  bumped on every save (in-process cache check)
* ``maskprop:search:{c}:{k}:leases``  zset question id -> lease deadline (unix seconds)
* ``maskprop:search:{c}:{k}:lock``  the per-class lock (several replicas may serve a campaign)
* ``maskprop:search:{c}:outbox``  the campaign's label outbox
  (:class:`maskprop_runtime.outbox.Outbox`): LabelsPropagated events not yet acknowledged by
  the broker (``k`` Kafka key, ``v`` serialized event); its relay lock is
  ``maskprop:search:{c}:outbox:relay``.  One stream a campaign, so an event one campaign's
  relay cannot publish holds up that campaign's labels only.
* ``maskprop:search:outboxes``  set  the campaigns that have an outbox (the relay's list)
* ``maskprop:search:replicas``  zset  replica id -> when it last leased (unix seconds): the
  live replicas a lease spreads classes over (rendezvous hashing, :func:`owner`)

Persistence is the session's base + log (issue #15): a save appends the call's log chunk
(~13 bytes an answer, whatever the class's size) to the class's list; when the log reaches a
quarter of the base (:meth:`AnnotationSession.needs_rebase`) the save writes a new base instead
and empties the list.  Bases live in Redis too: one key a class, rewritten only at compaction
(amortized ~5x the log's bytes), and a load is one round trip (GET + LRANGE).

Durability (transactional outbox): one Lua script saves a class's log chunk (or new base), its
version, its progress counters, its lease changes and the serialized label events its new
decisions produced (XADD into the outbox), and releases the class lock.  The outbox relay
publishes them.

Memory: the copies of sessions this process keeps are bounded (least recently used first) by
``cache_masks``, the masks of all cached classes together; a class is loaded when a call
first needs it, and a copy behind another replica's saves catches up by applying only the
chunks it lacks.  Leases and progress read the counters, never a session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from redis.exceptions import LockError

from maskprop.errors import MaskpropError
from maskprop.session import AnnotationSession
from maskprop.tree import Tree
from maskprop_runtime import topics
from maskprop_runtime.outbox import Outbox, Publish, relay_loop
from maskprop_runtime.watchdog import Heartbeat
from maskprop_search import wire
from maskprop_search.wire import BadRequest, ClassMasks

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 60.0
#: The set of campaigns with a label outbox (each is ``outbox_key(campaign)``).
OUTBOXES_KEY = "maskprop:search:outboxes"
#: The replicas that leased lately (zset id -> unix seconds).
REPLICAS_KEY = "maskprop:search:replicas"
#: A replica that has not leased for this long no longer owns classes.
REPLICA_TTL_S = 10.0
RELAY_LOCK_MS = 10_000  # a relay killed mid-batch delays the outbox this long
#: Mask tables of classes not cached that the relay keeps to expand decisions records (at
#: least; a relay process keeps up to its ``relay_masks`` of masks).
RELAY_TABLES = 2
#: Events per broker flush when the relay publishes the outbox (an event is at most
#: wire.LABELS_PER_EVENT labels, ~1 MB; sweeps make small ones).
RELAY_BATCH = 200
#: Arguments per Lua ``unpack`` (Lua's C stack limit is 8000).
_UNPACK = 1000
#: A save (one Lua call: every Redis client waits while it runs) slower than this is logged
#: with what it wrote.
SLOW_SAVE_S = 0.05
#: Default bound on the masks of the classes this process keeps in memory (~0.9 KB a mask
#: with its tree and mask table: ~3.6 GB).  A class larger than the bound is still served
#: (it is then the only one cached).
CACHE_MASKS = 4_000_000

#: The progress counters a save sets (absolute values), in the order the save script takes
#: them; ``accepted``/``rejected``/``undecided`` are changed by increments instead.
_SET_FIELDS = ("open", "questions", "clusters_accepted", "clusters_rejected", "done", "ready")
_PROGRESS_FIELDS = ("masks", "accepted", "rejected", "undecided", *_SET_FIELDS)


def classes_key(campaign: str) -> str:
    """The hash of a campaign's classes (class id -> JSON meta)."""
    return f"maskprop:search:{campaign}:classes"


def class_prefix(campaign: str) -> str:
    """What every per-class key of ``campaign`` starts with (``prefix + "{k}:" + what``)."""
    return f"maskprop:search:{campaign}:"


def outbox_key(campaign: str) -> str:
    """The label outbox stream of a campaign."""
    return f"{class_prefix(campaign)}outbox"


def class_key(campaign: str, class_id: int, what: str) -> str:
    """A class's key: ``what`` is ``base``, ``log``, ``state``, ``version``, ``leases`` or
    ``lock``."""
    return f"{class_prefix(campaign)}{class_id}:{what}"


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
# KEYS: the outbox, then (lock, base, log, state, version, leases) of each class saved, then
# the locks of classes only released.  ARGV: token, unpack chunk, classes saved, then per
# class saved: mode (``b`` a new base, ``l`` a log chunk, ``n`` neither), the base or chunk,
# the increments of accepted and rejected masks, the _SET_FIELDS values, n_drop, n_add,
# n_events, the dropped question ids, the added (deadline, question id) pairs and the (Kafka
# key, event) pairs.  One atomic round trip for every class a call touched: the states, their
# counters and the labels they decided are saved together (the outbox), and the locks are
# released.  Refused, writing nothing, when any lock is no longer ours (it expired and another
# replica may have saved since).  Returns per class saved its new version and epoch.
_SAVE = """
local token, chunk, m = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for k = 0, m - 1 do
  if redis.call('get', KEYS[2 + 6 * k]) ~= token then
    return redis.error_reply('LOCKLOST class lock expired before the save')
  end
end
for i = 2 + 6 * m, #KEYS do
  if redis.call('get', KEYS[i]) ~= token then
    return redis.error_reply('LOCKLOST class lock expired before the save')
  end
end
local out = {}
local i = 4
for k = 0, m - 1 do
  local base, logk, state = KEYS[3 + 6 * k], KEYS[4 + 6 * k], KEYS[5 + 6 * k]
  local leases = KEYS[7 + 6 * k]
  local mode = ARGV[i]
  if mode == 'b' then
    redis.call('set', base, ARGV[i + 1])
    redis.call('del', logk)
    redis.call('hincrby', state, 'epoch', 1)
  elseif mode == 'l' then
    redis.call('rpush', logk, ARGV[i + 1])
  end
  local acc, rej = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  if acc ~= 0 then redis.call('hincrby', state, 'accepted', acc) end
  if rej ~= 0 then redis.call('hincrby', state, 'rejected', rej) end
  if acc + rej ~= 0 then redis.call('hincrby', state, 'undecided', -(acc + rej)) end
  redis.call('hset', state, 'open', ARGV[i + 4], 'questions', ARGV[i + 5],
    'clusters_accepted', ARGV[i + 6], 'clusters_rejected', ARGV[i + 7],
    'done', ARGV[i + 8], 'ready', ARGV[i + 9])
  out[#out + 1] = redis.call('incr', KEYS[6 + 6 * k])
  out[#out + 1] = tonumber(redis.call('hget', state, 'epoch') or '0')
  local n_drop, n_add = tonumber(ARGV[i + 10]), tonumber(ARGV[i + 11])
  local n_events = tonumber(ARGV[i + 12])
  i = i + 13
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
for k = 0, m - 1 do redis.call('del', KEYS[2 + 6 * k]) end
for j = 2 + 6 * m, #KEYS do redis.call('del', KEYS[j]) end
return out
"""
# KEYS: per class its base, log, state and version; ARGV: per class the epoch and log length
# of this process's copy (-1 -1: none).  Per class: {version, epoch, base or false, chunks}:
# the chunks after the copy's when its base is still the stored one (base false then), else
# the base and every chunk.  Run with the classes locked (no save can come in between).
_LOAD = """
local out = {}
for k = 0, #KEYS / 4 - 1 do
  local version = tonumber(redis.call('get', KEYS[4 + 4 * k]) or '0')
  local epoch = tonumber(redis.call('hget', KEYS[3 + 4 * k], 'epoch') or '0')
  local base = false
  local from = tonumber(ARGV[2 + 2 * k])
  if epoch ~= tonumber(ARGV[1 + 2 * k]) then
    base = redis.call('get', KEYS[1 + 4 * k])
    from = 0
  end
  out[#out + 1] = {version, epoch, base, redis.call('lrange', KEYS[2 + 4 * k], from, -1)}
end
return out
"""
# KEYS: the campaign's classes hash, the replicas zset; ARGV: the per-class key prefix, now,
# this replica's id, the replica TTL.  Marks this replica alive and drops those silent for
# the TTL; returns {live replica ids, per class (flat): class id, 1 if a lease is overdue at
# ``now``, the stored version, done, ready}.  Everything a lease needs to pick its classes,
# without loading a session, in one round trip.
_SURVEY = """
redis.call('zadd', KEYS[2], ARGV[2], ARGV[3])
redis.call('zremrangebyscore', KEYS[2], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[4]))
local out = {}
for _, k in ipairs(redis.call('hkeys', KEYS[1])) do
  local p = ARGV[1] .. k .. ':'
  local hit = redis.call('zrangebyscore', p .. 'leases', '-inf', ARGV[2], 'LIMIT', 0, 1)
  local st = redis.call('hmget', p .. 'state', 'done', 'ready')
  out[#out + 1] = tonumber(k)
  out[#out + 1] = #hit
  out[#out + 1] = tonumber(redis.call('get', p .. 'version') or '0')
  out[#out + 1] = tonumber(st[1] or '0')
  out[#out + 1] = tonumber(st[2] or '0')
end
return {redis.call('zrange', KEYS[2], 0, -1), out}
"""
# KEYS: the campaign's classes hash; ARGV: the per-class key prefix, then _PROGRESS_FIELDS.
# Per class (flat): class id, its meta JSON, the fields' values.  No lock, no session.
_PROGRESS = """
local out = {}
local meta = redis.call('hgetall', KEYS[1])
for i = 1, #meta, 2 do
  out[#out + 1] = meta[i]
  out[#out + 1] = meta[i + 1]
  out[#out + 1] = redis.call('hmget', ARGV[1] .. meta[i] .. ':state', unpack(ARGV, 2))
end
return out
"""


@dataclass
class Loaded:
    """A class's session at a stored ``version`` over the base ``epoch``, with its tree and
    masks (never change)."""

    version: int
    epoch: int
    session: AnnotationSession
    tree: Tree
    masks: ClassMasks


class Survey(NamedTuple):
    """A class as a lease sees it (:meth:`SearchStore.survey`), read from its counters."""

    class_id: int
    overdue: bool  # a lease has expired: its questions go back to the pool
    version: int
    done: bool
    ready: int  # about the questions it could hand out (AnnotationSession.questions_ready)


@dataclass
class Held:
    """A class locked by this caller: the lock's token, the stored version, the session, and
    what to save with it when the call ends (``changed``: the session itself; a session whose
    log grew since the load is saved too, so a copy is never ahead of Redis unsaved)."""

    campaign: str
    class_id: int
    token: str
    version: int
    loaded: Loaded | None = None
    changed: bool = False
    add_leases: dict[str, float] = field(default_factory=dict)
    drop_leases: list[str] = field(default_factory=list)
    log_at_load: int = 0  # the session's log_bytes when loaded


@dataclass
class Batch:
    """The classes of one campaign a call holds (class id -> :class:`Held`), and the label
    events their save put in the outbox (set when the batch ends)."""

    held: dict[int, Held]
    events: int = 0


class SessionCache:
    """This process's copies of sessions, least recently used first out once the masks of
    all copies pass ``max_masks`` (the copy just added stays, however large).  Thread-safe;
    evicting a copy a call is using only means the next call loads it again."""

    def __init__(self, max_masks: int) -> None:
        if max_masks < 1:
            raise ValueError("cache_masks must be at least 1")
        self.max_masks = max_masks
        self.masks = 0  # masks of the copies held
        self._copies: OrderedDict[tuple[str, int], Loaded] = OrderedDict()
        self._guard = threading.Lock()

    def __len__(self) -> int:
        return len(self._copies)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._copies

    def get(self, key: tuple[str, int]) -> Loaded | None:
        with self._guard:
            copy = self._copies.get(key)
            if copy is not None:
                self._copies.move_to_end(key)
            return copy

    def put(self, key: tuple[str, int], loaded: Loaded) -> None:
        with self._guard:
            old = self._copies.pop(key, None)
            if old is not None:
                self.masks -= old.tree.n_leaves
            self._copies[key] = loaded
            self.masks += loaded.tree.n_leaves
            while self.masks > self.max_masks and len(self._copies) > 1:
                _, evicted = self._copies.popitem(last=False)
                self.masks -= evicted.tree.n_leaves

    def drop(self, key: tuple[str, int]) -> None:
        with self._guard:
            old = self._copies.pop(key, None)
            if old is not None:
                self.masks -= old.tree.n_leaves


def owner(replicas: list[str], campaign: str, class_id: int) -> str:
    """The replica whose leases serve a class first (rendezvous hashing: the highest hash of
    (replica, campaign, class)); when a replica comes or goes only its share moves."""
    name = f"{campaign}\x00{class_id}".encode()
    return max(
        replicas,
        key=lambda r: hashlib.blake2b(r.encode() + b"\x00" + name, digest_size=8).digest(),
    )


class LabelOutboxes:
    """The label outboxes of every campaign (one :class:`Outbox` stream each, listed in the
    set ``OUTBOXES_KEY``) and their one relay: a drain publishes each campaign's in turn, and a
    campaign whose publish fails does not stop the others (the first error is raised after)."""

    def __init__(self, redis: Any) -> None:
        self.r = redis
        self._outboxes: dict[str, Outbox] = {}
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self.heartbeat = Heartbeat("label relay")  # beaten by run_relay (watchdog.py)

    def of(self, campaign: str) -> Outbox:
        """The campaign's outbox (its stream key, relay lock, drain)."""
        with self._guard:
            outbox = self._outboxes.get(campaign)
            if outbox is None:
                outbox = self._outboxes[campaign] = Outbox(
                    self.r, outbox_key(campaign), lock_ms=RELAY_LOCK_MS, batch=RELAY_BATCH
                )
            return outbox

    def campaigns(self) -> list[str]:
        return sorted(
            c.decode() if isinstance(c, bytes) else c for c in self.r.smembers(OUTBOXES_KEY)
        )

    def drain(self, publish: Publish, *, batch: int | None = None) -> int:
        """:meth:`Outbox.drain` of every campaign's outbox; returns the events published."""
        sent = 0
        failed: Exception | None = None
        for campaign in self.campaigns():
            try:
                sent += self.of(campaign).drain(publish, batch=batch)
            except Exception as exc:  # the other campaigns still go out
                log.error(
                    "publishing a campaign's labels failed",
                    extra={"campaign": campaign, "error": str(exc)},
                )
                failed = failed or exc
        if failed is not None:
            raise failed
        return sent

    def run_relay(
        self, publish: Publish, stop: threading.Event, *, idle_s: float = 0.2, linger_s: float = 0.0
    ) -> None:
        """The relay thread (:func:`relay_loop` over :meth:`drain`), until ``stop``."""
        relay_loop(
            lambda: self.drain(publish),
            self._wake,
            stop,
            idle_s=idle_s,
            linger_s=linger_s,
            name=OUTBOXES_KEY,
            heartbeat=self.heartbeat,
        )

    def signal(self) -> None:
        """Wake this process's relay thread now (a save added events)."""
        self._wake.set()

    def pending(self) -> int:
        """Events waiting in every campaign's outbox."""
        return sum(self.of(c).pending() for c in self.campaigns())


def _pop_record(campaign: str, class_id: int, session: AnnotationSession) -> tuple[bytes, int, int]:
    """The session's terminal decisions since the last pop as one outbox record, and the
    masks they labelled accepted and rejected (:func:`wire.pack_decisions`): the decisions,
    not their label events, which the relay expands off the class lock."""
    decisions = [d for d in session.pop_decisions() if d.terminal]
    return wire.pack_decisions(campaign, class_id, session, decisions)


def counters(session: AnnotationSession, class_id: int) -> list[int]:
    """The _SET_FIELDS values of a class's session (O(open clusters), no per-mask pass)."""
    outcomes = session.outcomes
    return [
        session.open_clusters(class_id),
        session.questions,
        outcomes.get("accept", 0),
        outcomes.get("reject", 0) + outcomes.get("auto_reject", 0),
        int(session.done),
        session.questions_ready(),
    ]


class SearchStore:
    """Search's sessions in Redis and this process's cache of them.

    ``outboxes``: the label outboxes; a save appends to its campaign's and signals the relay.
    ``cache_masks``: the bound of :class:`SessionCache`.  ``label_bytes``: the most bytes a
    label event may take (:func:`maskprop_runtime.topics.record_limit` of the setting
    ``kafka_max_message_bytes``).  ``relay_masks``: the masks of the mask tables the relay
    keeps for classes not in the session cache, least recently used out first (at least
    ``RELAY_TABLES`` tables): the only cache of a relay process, which holds no sessions."""

    def __init__(
        self,
        redis: Any,
        *,
        cache_masks: int = CACHE_MASKS,
        replica_id: str | None = None,
        label_bytes: int = topics.record_limit(),
        relay_masks: int = 0,
    ) -> None:
        self.r = redis
        self.label_bytes = label_bytes
        self.replica_id = replica_id or os.urandom(6).hex()
        self.outboxes = LabelOutboxes(redis)
        self.cache = SessionCache(cache_masks)
        self._local_locks: dict[tuple[str, int], threading.Lock] = {}
        # mask tables the relay loaded for classes not in the session cache
        self._relay_masks: OrderedDict[tuple[str, int], ClassMasks] = OrderedDict()
        self._relay_held = 0  # masks of those tables
        self.relay_masks = relay_masks
        self._relay_guard = threading.Lock()
        self._locks_guard = threading.Lock()
        # Script objects reload themselves after a Redis restart (NOSCRIPT).
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._release_script = redis.register_script(_RELEASE)
        self._save_script = redis.register_script(_SAVE)
        self._load_script = redis.register_script(_LOAD)
        self._survey_script = redis.register_script(_SURVEY)
        self._progress_script = redis.register_script(_PROGRESS)

    # ------------------------------------------------------------------ campaigns, classes
    def classes(self, campaign: str) -> list[int]:
        return sorted(int(k) for k in self.r.hkeys(classes_key(campaign)))

    def campaign_exists(self, campaign: str) -> bool:
        """Whether any class of ``campaign`` has reached search (one EXISTS)."""
        return bool(self.r.exists(classes_key(campaign)))

    def has_session(self, campaign: str, class_id: int) -> bool:
        return bool(self.r.exists(class_key(campaign, class_id, "base")))

    def create(
        self,
        campaign: str,
        class_id: int,
        session: AnnotationSession,
        tree: Tree,
        masks: ClassMasks,
        meta: dict[str, Any],
    ) -> int:
        """Store a new class's first base, counters and ``meta``, and the decisions its
        session already made (a :meth:`AnnotationSession.prepare` as its tree arrived) in its
        outbox, all in one MULTI; call with the class locked.  The copy stays cached:
        questions come next.  Returns the masks those decisions labelled."""
        n = tree.n_leaves
        record, accepted, rejected = _pop_record(campaign, class_id, session)
        state: dict[str, int] = {
            "masks": n,
            "accepted": accepted,
            "rejected": rejected,
            "undecided": n - accepted - rejected,
        }
        state.update(zip(_SET_FIELDS, counters(session, class_id), strict=True))
        pipe = self.r.pipeline(transaction=True)
        pipe.set(class_key(campaign, class_id, "base"), session.rebase())
        pipe.delete(class_key(campaign, class_id, "log"))
        pipe.hset(class_key(campaign, class_id, "state"), mapping=state)
        pipe.hincrby(class_key(campaign, class_id, "state"), "epoch", 1)
        pipe.incr(class_key(campaign, class_id, "version"))
        pipe.hset(classes_key(campaign), str(class_id), json.dumps(meta))
        pipe.sadd(OUTBOXES_KEY, campaign)
        if record:
            pipe.xadd(
                outbox_key(campaign), {"k": topics.class_key(campaign, class_id), "v": record}
            )
        replies = pipe.execute()
        epoch, version = int(replies[3]), int(replies[4])
        self.cache.put((campaign, class_id), Loaded(version, epoch, session, tree, masks))
        if record:
            self.outboxes.signal()
        return accepted + rejected

    # ------------------------------------------------------------------ counters
    def survey(self, campaign: str, now: float) -> tuple[list[str], list[Survey]]:
        """The live replicas (this one marked alive at ``now``) and every class of the
        campaign as its counters say (one round trip, no session): whether a lease is overdue
        at ``now``, the stored version, done and ready."""
        replicas, flat = self._survey_script(
            keys=[classes_key(campaign), REPLICAS_KEY],
            args=[class_prefix(campaign), now, self.replica_id, REPLICA_TTL_S],
        )
        live = sorted(r.decode() if isinstance(r, bytes) else str(r) for r in replicas)
        return live, sorted(
            Survey(
                int(flat[i]),
                bool(flat[i + 1]),
                int(flat[i + 2]),
                bool(flat[i + 3]),
                int(flat[i + 4]),
            )
            for i in range(0, len(flat), 5)
        )

    def progress(self, campaign: str) -> dict[int, tuple[str, dict[str, int]]]:
        """Class id -> (class name, progress counters named as _PROGRESS_FIELDS), read in one
        round trip without any lock or session (the last save's values)."""
        flat = self._progress_script(
            keys=[classes_key(campaign)], args=[class_prefix(campaign), *_PROGRESS_FIELDS]
        )
        out: dict[int, tuple[str, dict[str, int]]] = {}
        for i in range(0, len(flat), 3):
            meta = json.loads(flat[i + 1])
            values = {f: int(v or 0) for f, v in zip(_PROGRESS_FIELDS, flat[i + 2], strict=True)}
            out[int(flat[i])] = (str(meta["class_name"]), values)
        return out

    def overdue_leases(self, campaign: str, class_id: int, now: float) -> list[str]:
        """Question ids of the class whose lease deadline is at or before ``now``."""
        key = class_key(campaign, class_id, "leases")
        return [q.decode() for q in self.r.zrangebyscore(key, "-inf", now)]

    def class_masks(self, campaign: str, class_id: int) -> ClassMasks:
        """A class's mask table for the label relay (:func:`wire.expand_decisions`): this
        process's cached copy's, else the class file's (kept in a small LRU of its own)."""
        copy = self.cache.get((campaign, class_id))
        if copy is not None:
            return copy.masks
        key = (campaign, class_id)
        with self._relay_guard:
            masks = self._relay_masks.get(key)
            if masks is not None:
                self._relay_masks.move_to_end(key)
                return masks
        meta_raw = self.r.hget(classes_key(campaign), str(class_id))
        if meta_raw is None:
            raise BadRequest(f"campaign {campaign!r} has no class {class_id}")
        masks = wire.load_masks(Path(json.loads(meta_raw)["tree_uri"]))  # no tree: not walked
        with self._relay_guard:
            old = self._relay_masks.pop(key, None)
            self._relay_held += len(masks.table) - (len(old.table) if old else 0)
            self._relay_masks[key] = masks
            while len(self._relay_masks) > RELAY_TABLES and self._relay_held > self.relay_masks:
                _, out = self._relay_masks.popitem(last=False)
                self._relay_held -= len(out.table)
        return masks

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
        Classes without a current copy cost one more round trip, all of them together.
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
                    self._load(list(batch.held.values()))
                yield batch
                batch.events = self._save(batch)
            except BaseException:
                for k in ids:
                    self.cache.drop((campaign, k))
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

    def _load(self, held: list[Held]) -> None:
        """Set ``loaded`` of each held class: this process's copy when it is at the stored
        version, else (one round trip for all the others) the copy brought up to date with
        the chunks it lacks, or a session restored from the base and its log.  Call locked."""
        stale: list[tuple[Held, Loaded | None]] = []
        for h in held:
            copy = self.cache.get((h.campaign, h.class_id))
            if copy is not None and copy.version == h.version:
                h.loaded = copy
                h.log_at_load = copy.session.log_bytes
            else:
                stale.append((h, copy))
        if not stale:
            return
        keys: list[str] = []
        args: list[int] = []
        for h, copy in stale:
            keys += [class_key(h.campaign, h.class_id, w) for w in ("base", "log", "state")]
            keys.append(class_key(h.campaign, h.class_id, "version"))
            args += (-1, -1) if copy is None else (copy.epoch, copy.session.log_seq)
        for (h, copy), (version, epoch, base, chunks) in zip(
            stale, self._load_script(keys=keys, args=args), strict=True
        ):
            loaded = None
            if not base and copy is not None:
                try:
                    copy.session.apply_log(chunks)
                    copy.version = int(version)
                    loaded = copy
                except MaskpropError:  # half applied: restore from the base below
                    self.cache.drop((h.campaign, h.class_id))
                    base, chunks = self._base_and_log(h)
            if loaded is None:
                loaded = self._restore(
                    h.campaign, h.class_id, int(version), int(epoch), base, chunks, copy
                )
            h.loaded = loaded
            h.log_at_load = loaded.session.log_bytes
            self.cache.put((h.campaign, h.class_id), loaded)

    def _base_and_log(self, h: Held) -> tuple[bytes | None, list[bytes]]:
        pipe = self.r.pipeline(transaction=True)
        pipe.get(class_key(h.campaign, h.class_id, "base"))
        pipe.lrange(class_key(h.campaign, h.class_id, "log"), 0, -1)
        base, chunks = pipe.execute()
        return base, chunks

    def _restore(
        self,
        campaign: str,
        class_id: int,
        version: int,
        epoch: int,
        base: bytes | None,
        chunks: list[bytes],
        copy: Loaded | None,
    ) -> Loaded:
        """The session of ``base`` and its log ``chunks`` at ``version``, over the tree of
        this process's older ``copy`` if any (trees never change), else the tree file the
        class's meta names."""
        if not base:
            raise BadRequest(f"campaign {campaign!r} has no class {class_id}")
        if copy is not None:
            tree, masks = copy.tree, copy.masks
        else:
            meta_raw = self.r.hget(classes_key(campaign), str(class_id))
            if meta_raw is None:
                raise BadRequest(f"campaign {campaign!r} has no class {class_id}")
            tree, masks = wire.load_class(Path(json.loads(meta_raw)["tree_uri"]))
        session = AnnotationSession.restore(base, {class_id: tree}, log=chunks)
        return Loaded(version, epoch, session, tree, masks)

    def _save(self, batch: Batch) -> int:
        """Save the batch's changed classes (log chunks or new bases, counters, lease changes,
        the label events of their new decisions) and release all its locks, in one round
        trip.  Returns the number of events added to the outbox (its relay is signalled when
        there are any)."""
        held = list(batch.held.values())
        for h in held:
            if h.loaded is not None and h.loaded.session.log_bytes != h.log_at_load:
                h.changed = True
        changed = [h for h in held if h.changed]
        if not held:
            return 0
        campaign = held[0].campaign
        keys: list[str] = [outbox_key(campaign)]
        args: list[Any] = [held[0].token, _UNPACK, len(changed)]
        events = 0
        saved: list[dict[str, Any]] = []  # what each class wrote, for the slow-save log
        for h in changed:
            loaded = h.loaded
            assert loaded is not None
            k, session = h.class_id, loaded.session
            record, accepted, rejected = _pop_record(campaign, k, session)
            entries = [(topics.class_key(campaign, k), record)] if record else []
            if session.needs_rebase():
                mode, payload = "b", session.rebase()
            else:
                payload = session.take_log()
                mode = "l" if payload else "n"
            keys += [
                class_key(campaign, k, w)
                for w in ("lock", "base", "log", "state", "version", "leases")
            ]
            args += (
                mode,
                payload,
                accepted,
                rejected,
                *counters(session, k),
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
            saved.append(
                {
                    "class_id": k,
                    "mode": mode,
                    "state_bytes": len(payload),
                    "leases_added": len(h.add_leases),
                    "leases_dropped": len(h.drop_leases),
                    "decisions_bytes": len(record),
                }
            )
        keys += [class_key(campaign, h.class_id, "lock") for h in held if not h.changed]
        started = time.perf_counter()
        replies = self._save_script(keys=keys, args=args)
        took = time.perf_counter() - started
        if took > SLOW_SAVE_S:
            # One Lua call blocks every Redis client while it runs: say what made it long.
            log.warning(
                "slow save",
                extra={
                    "campaign": campaign,
                    "ms": round(took * 1e3, 1),
                    "classes": saved,
                    "locks_released": len(held) - len(changed),
                },
            )
        for j, h in enumerate(changed):
            assert h.loaded is not None
            h.loaded.version = h.version = int(replies[2 * j])
            h.loaded.epoch = int(replies[2 * j + 1])
        if events:
            self.outboxes.signal()
        return events
