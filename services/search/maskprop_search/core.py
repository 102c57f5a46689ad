"""The search service's core: one :class:`maskprop.session.AnnotationSession` per class of a
campaign, persisted in Redis, driven by gRPC calls, publishing propagated labels.

Redis keys (``{c}`` campaign, ``{k}`` class id):

* ``maskprop:search:{c}:classes``  hash  class id -> JSON (class name, tree path, masks)
* ``maskprop:search:{c}:{k}:session`` bytes  the session snapshot (its decision outbox included)
* ``maskprop:search:{c}:{k}:version`` int  bumped on every save (in-process cache check)
* ``maskprop:search:{c}:{k}:leases``  zset question id -> lease deadline (unix seconds)
* ``maskprop:search:{c}:{k}:lock``  the per-class lock (several replicas may serve a campaign)
* ``maskprop:search:outbox``  stream of LabelsPropagated events not yet acknowledged by the
  broker (fields ``k`` Kafka key, ``v`` serialized event), every campaign's
* ``maskprop:search:outbox:relay``  lock of the one relay publishing the outbox at a time

Durability (transactional outbox): one Lua script saves a class's snapshot, its version, its
lease changes and the serialized label events its new decisions produced, and releases the
class lock.  A relay (:meth:`SearchCore.drain_outbox`; a thread of the service process, or
called after each API call in embedded mode) publishes the outbox in batches, one broker flush
per batch, then deletes what the broker acknowledged.  A crash in between publishes the same
events (same event ids) again; the sink keeps one label per mask.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from redis.exceptions import LockError

from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import (
    AnnotationSession,
    Answer,
    Decision,
    LabelSource,
    Question,
)
from maskprop.tree import Tree
from maskprop_runtime import topics
from maskprop_runtime.bus import Producer, Record
from maskprop_runtime.loop import Emit, InvalidEvent
from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from maskprop_runtime.treestore import MaskTable, TreeStore, check_name

log = logging.getLogger(__name__)

#: Labels per LabelsPropagated event: a root-level decision can cover 30k masks, and the
#: broker's default message.max.bytes is 1 MB.
LABELS_PER_EVENT = 2000


class BadRequest(ValueError):
    """A caller error, mapped to INVALID_ARGUMENT by the gRPC layer."""


@dataclass
class _Loaded:
    version: int
    session: AnnotationSession
    tree: Tree
    table: MaskTable
    class_name: str
    #: image id -> (width, height, file name) as plain Python values: label events and
    #: questions read them per mask (numpy scalar indexing cost ~2 us an image)
    images: dict[str, tuple[int, int, str]]


def _images(table: MaskTable) -> dict[str, tuple[int, int, str]]:
    return {
        str(i): (w, h, str(f))
        for i, w, h, f in zip(
            table.img_ids.tolist(),
            table.img_w.tolist(),
            table.img_h.tolist(),
            table.img_files.tolist(),
            strict=True,
        )
    }


LOCK_TIMEOUT_S = 60.0
OUTBOX_KEY = "maskprop:search:outbox"
RELAY_LOCK_KEY = "maskprop:search:outbox:relay"
RELAY_LOCK_MS = 10_000  # a relay killed mid-batch delays the outbox this long
#: Events per broker flush when the relay publishes the outbox (an event is at most
#: LABELS_PER_EVENT labels, ~1 MB; sweeps make small ones).
RELAY_BATCH = 200
#: Arguments per Lua ``unpack`` (Lua's C stack limit is 8000).
_UNPACK = 1000
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
# KEYS: relay lock, outbox; ARGV: token, ttl ms, count.  The oldest ``count`` outbox entries
# (taking the relay lock), an empty list when there are none (the lock not taken), or nil
# while another relay holds the lock (one publisher at a time, so replicas do not publish
# every event twice).
_RELAY_TAKE = """
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
# KEYS: relay lock, outbox; ARGV: token, chunk, entry ids.  Delete published entries and
# release the relay lock if it is still ours.
_RELAY_DONE = """
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


@dataclass
class _Held:
    """A class locked by this caller: the lock's token, the stored version, the session, and
    what to save with it when the call ends (``changed``: the session itself)."""

    campaign: str
    class_id: int
    token: str
    version: int
    loaded: _Loaded | None = None
    changed: bool = False
    add_leases: dict[str, float] = field(default_factory=dict)
    drop_leases: list[str] = field(default_factory=list)


@dataclass
class _Batch:
    """The classes of one campaign a call holds (class id -> :class:`_Held`), and the label
    events their save put in the outbox (set when the batch ends)."""

    held: dict[int, _Held]
    events: int = 0


def question_id(campaign: str, q: Question) -> str:
    return f"{campaign}:{q.class_id}:{q.node}:{q.mask}"


def parse_question_id(qid: str, known: set[str] | None = None) -> tuple[str, Question]:
    """``known``: campaign names already checked (a call's answers share one or two)."""
    parts = qid.split(":")
    if len(parts) != 4:
        raise BadRequest(f"malformed question_id {qid[:80]!r}")
    campaign = parts[0]
    try:
        if known is None or campaign not in known:
            check_name("campaign", campaign)
            if known is not None:
                known.add(campaign)
        class_id, node, mask = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        raise BadRequest(f"malformed question_id {qid[:80]!r}") from None
    if class_id < 0 or node < 0 or mask < 0:
        raise BadRequest(f"malformed question_id {qid[:80]!r}")
    return campaign, Question(class_id, node, mask)


class SearchCore:
    """Sessions of every class, with their persistence and label publishing."""

    def __init__(
        self,
        redis: Any,
        params: AnnotationParams,
        selection: Selection,
        producer: Producer,
        *,
        seed: int = 0,
        strategy: str = "heuristic",
        lease_seconds: float = 600.0,
        clock: Callable[[], float] = time.time,
        publish_inline: bool = True,
    ) -> None:
        """``publish_inline``: each API call publishes the labels it decided before it
        returns (embedded mode, tests); with False a relay thread runs :meth:`run_relay`."""
        self.r = redis
        self.params = params
        self.selection = selection
        self.producer = producer
        self.seed = seed
        self.strategy = strategy
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._cache: dict[tuple[str, int], _Loaded] = {}
        self._local_locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Script objects reload themselves after a Redis restart (NOSCRIPT).
        self._acquire_script = self.r.register_script(_ACQUIRE)
        self._release_script = self.r.register_script(_RELEASE)
        self._save_script = self.r.register_script(_SAVE)
        self._survey_script = self.r.register_script(_SURVEY)
        self._relay_take = self.r.register_script(_RELAY_TAKE)
        self._relay_done = self.r.register_script(_RELAY_DONE)
        self.publish_inline = publish_inline
        self._outbox_signal = threading.Event()  # wakes the relay when events were saved
        self._rr = 0  # round-robin start over classes, so concurrent workers spread out

    # ------------------------------------------------------------------ keys
    @staticmethod
    def _k(campaign: str, class_id: int, what: str) -> str:
        return f"maskprop:search:{campaign}:{class_id}:{what}"

    @staticmethod
    def _classes_key(campaign: str) -> str:
        return f"maskprop:search:{campaign}:classes"

    def classes(self, campaign: str) -> list[int]:
        return sorted(int(k) for k in self.r.hkeys(self._classes_key(campaign)))

    def campaign_exists(self, campaign: str) -> bool:
        """Whether any class of ``campaign`` has reached search (one EXISTS)."""
        return bool(self.r.exists(self._classes_key(campaign)))

    # ------------------------------------------------------------------ trees arrive
    def on_tree_built(self, msg: Any, record: Record | None = None) -> list[Emit]:
        """Handler for ``maskprop.trees``: open an annotation session for the class."""
        assert isinstance(msg, clusterer_pb2.TreeBuilt)
        try:
            check_name("campaign", msg.campaign)
        except ValueError as exc:
            raise InvalidEvent(str(exc)) from None
        path = Path(msg.tree_uri)
        if not path.is_file():
            raise InvalidEvent(f"tree file {msg.tree_uri!r} does not exist")
        tree, table, class_name = TreeStore.load_tree(path)
        if tree.n_leaves != msg.n_masks:
            raise InvalidEvent(f"tree has {tree.n_leaves} masks, event says {msg.n_masks}")
        campaign, k = msg.campaign, int(msg.class_id)
        with self._classes(campaign, [k], load=False):
            if self.r.exists(self._k(campaign, k, "session")):
                return []  # redelivered: the session already exists and may have progressed
            session = AnnotationSession(
                {k: tree}, self.params, self.selection, strategy=self.strategy, seed=self.seed
            )
            meta = {"class_name": class_name, "tree_uri": str(path), "masks": tree.n_leaves}
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self._k(campaign, k, "session"), session.snapshot())
            pipe.incr(self._k(campaign, k, "version"))
            pipe.hset(self._classes_key(campaign), str(k), json.dumps(meta))
            version = int(pipe.execute()[1])
            # Questions come next: keep what was just loaded instead of reading it again.
            self._cache[(campaign, k)] = _Loaded(
                version, session, tree, table, class_name, _images(table)
            )
        log.info("session opened", extra={"campaign": campaign, "class_id": k})
        return []

    # ------------------------------------------------------------------ state
    @contextmanager
    def _classes(
        self, campaign: str, class_ids: Iterable[int], *, load: bool = True
    ) -> Iterator[_Batch]:
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
            batch = _Batch(
                {k: _Held(campaign, k, token, v) for k, v in zip(ids, versions, strict=True)}
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
                            keys=[self._k(campaign, k, "lock") for k in ids], args=[token]
                        )
                raise

    @contextmanager
    def _class(self, campaign: str, class_id: int) -> Iterator[_Held]:
        """:meth:`_classes` of one class."""
        with self._classes(campaign, [class_id]) as batch:
            yield batch.held[class_id]

    def _acquire(self, campaign: str, class_ids: list[int], token: str) -> list[int]:
        """Take the classes' Redis locks (60 s TTL; all or none, polled every 5 ms for up to
        60 s) and return the sessions' stored versions."""
        keys: list[str] = []
        for k in class_ids:
            keys += (self._k(campaign, k, "lock"), self._k(campaign, k, "version"))
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

    def _load(self, held: _Held) -> _Loaded:
        """The class's session (cached while the stored version is unchanged); call locked."""
        campaign, class_id = held.campaign, held.class_id
        cached = self._cache.get((campaign, class_id))
        if cached is not None and cached.version == held.version:
            return cached
        blob = self.r.get(self._k(campaign, class_id, "session"))
        meta_raw = self.r.hget(self._classes_key(campaign), str(class_id))
        if blob is None or meta_raw is None:
            raise BadRequest(f"campaign {campaign!r} has no class {class_id}")
        meta = json.loads(meta_raw)
        if cached is not None and cached.tree is not None:
            tree, table, name = cached.tree, cached.table, cached.class_name
        else:
            tree, table, name = TreeStore.load_tree(Path(meta["tree_uri"]))
        session = AnnotationSession.restore(blob, {class_id: tree})
        loaded = _Loaded(held.version, session, tree, table, name, _images(table))
        self._cache[(campaign, class_id)] = loaded
        if session.has_pending_decisions():
            # Saved by a version that kept decisions in the snapshot until the broker acked:
            # saved with the batch, they move to the outbox stream.
            held.changed = True
        return loaded

    def _save(self, batch: _Batch) -> int:
        """Save the batch's changed classes (sessions, lease changes, the label events of
        their new decisions) and release all its locks, in one round trip.  Returns the
        number of events added to the outbox."""
        held = list(batch.held.values())
        changed = [h for h in held if h.changed]
        if not held:
            return 0
        campaign = held[0].campaign
        keys: list[str] = [OUTBOX_KEY]
        args: list[Any] = [held[0].token, _UNPACK, len(changed)]
        events = 0
        for h in changed:
            loaded = h.loaded
            assert loaded is not None
            k = h.class_id
            decisions = [d for d in loaded.session.pop_decisions() if d.terminal]
            evs = self._label_events(campaign, k, loaded, decisions) if decisions else []
            keys += (
                self._k(campaign, k, "lock"),
                self._k(campaign, k, "session"),
                self._k(campaign, k, "version"),
                self._k(campaign, k, "leases"),
            )
            args += (
                loaded.session.snapshot(),
                len(h.drop_leases),
                len(h.add_leases),
                len(evs),
                *h.drop_leases,
            )
            for qid, deadline in h.add_leases.items():
                args += (deadline, qid)
            key = topics.class_key(campaign, k)
            for ev in evs:
                args += (key, ev.SerializeToString())
            events += len(evs)
        keys += [self._k(campaign, h.class_id, "lock") for h in held if not h.changed]
        versions = self._save_script(keys=keys, args=args)
        for h, version in zip(changed, versions, strict=True):
            assert h.loaded is not None
            h.loaded.version = h.version = int(version)
        if events and not self.publish_inline:
            self._outbox_signal.set()
        return events

    # ------------------------------------------------------------------ the outbox relay
    def drain_outbox(self, batch: int = RELAY_BATCH) -> int:
        """Publish the outbox: batches of up to ``batch`` events, one broker flush each,
        deleted from Redis once acknowledged.  Returns the events published; 0 as well while
        another relay holds the relay lock (it publishes them)."""
        token = os.urandom(12).hex()
        keys = [RELAY_LOCK_KEY, OUTBOX_KEY]
        sent = 0
        while True:
            entries = self._relay_take(keys=keys, args=[token, RELAY_LOCK_MS, batch])
            if not entries:  # none left, or another relay is publishing them
                return sent
            try:
                for _entry_id, fields in entries:
                    f = dict(zip(fields[::2], fields[1::2], strict=True))
                    self.producer.send(topics.LABELS, f[b"k"], f[b"v"])
                self.producer.flush()  # acknowledged before the entries are deleted
            except BaseException:
                self._relay_done(keys=keys, args=[token, _UNPACK])  # others may retry now
                raise
            self._relay_done(keys=keys, args=[token, _UNPACK, *(e[0] for e in entries)])
            sent += len(entries)
            if len(entries) < batch:
                return sent

    def run_relay(self, stop: threading.Event, idle_s: float = 0.2, linger_s: float = 0.0) -> None:
        """The relay thread: publish the outbox as events arrive (woken by saves) and every
        ``idle_s`` (events other replicas or a crashed process left) until ``stop``.  Woken
        by a save, it first waits ``linger_s`` for more: under load one broker flush then
        carries the labels of many calls instead of one or two."""
        while not stop.is_set():
            self._outbox_signal.clear()
            try:
                sent = self.drain_outbox()
            except Exception as exc:  # broker or Redis down: the events wait in Redis
                log.error("label relay failed; retrying", extra={"error": str(exc)})
                stop.wait(1.0)
                continue
            if not sent and self._outbox_signal.wait(idle_s) and linger_s:
                stop.wait(linger_s)
            elif sent and linger_s:
                stop.wait(linger_s)

    def _published(self, events: int) -> None:
        """After an API call: in embedded mode, publish what it decided before returning."""
        if events and self.publish_inline:
            self.drain_outbox()

    def _label_events(
        self, campaign: str, class_id: int, loaded: _Loaded, decisions: list[Decision]
    ) -> list[search_pb2.LabelsPropagated]:
        """The labels of ``decisions`` in events of at most LABELS_PER_EVENT labels.

        Built column-wise (numpy ``tolist`` per column, then ``labels.add`` with plain Python
        values): a sweep labels thousands of masks a call, and a message built from numpy
        scalars and nested constructors cost ~13 us a label, this ~1.5 us."""
        table = loaded.table
        masks, values, verified_or_not, which_a = loaded.session.decisions_labels(decisions)
        if not masks.shape[0]:
            return []
        accepted = (values == 1).tolist()
        sources = np.where(
            verified_or_not == LabelSource.VERIFIED,
            search_pb2.LABEL_SOURCE_VERIFIED,
            search_pb2.LABEL_SOURCE_PROPAGATED,
        ).tolist()
        which = which_a.tolist()
        mask_ids = table.mask_ids[masks].tolist()
        image_ids = table.image_ids[masks].tolist()
        heights = table.rle_h[masks].tolist()
        widths = table.rle_w[masks].tolist()
        scores = table.scores[masks].tolist()
        starts = table.rle_offsets[masks].tolist()
        ends = table.rle_offsets[masks + 1].tolist()
        blob = table.rle_blob
        out = []
        first = decisions[0].node
        for chunk, lo in enumerate(range(0, len(mask_ids), LABELS_PER_EVENT)):
            hi = lo + LABELS_PER_EVENT
            ev = search_pb2.LabelsPropagated(
                event_id=f"labels.{campaign}.{class_id}.{first}.{chunk}",
                campaign=campaign,
                class_id=class_id,
                class_name=loaded.class_name,
            )
            labels = ev.labels
            for i in range(lo, min(hi, len(mask_ids))):
                d = decisions[which[i]]
                lab = labels.add(
                    mask_id=mask_ids[i],
                    image_id=image_ids[i],
                    accepted=accepted[i],
                    source=sources[i],
                    score=scores[i],
                    node=d.node,
                    outcome=d.outcome,
                    yes=d.yes,
                    answered=d.answered,
                )
                rle = lab.rle
                rle.height = heights[i]
                rle.width = widths[i]
                rle.counts = blob[starts[i] : ends[i]]
            for image_id in dict.fromkeys(image_ids[lo:hi]):  # first appearance order
                width, height, file_name = loaded.images[image_id]
                ev.images.add(image_id=image_id, width=width, height=height, file_name=file_name)
            out.append(ev)
        return out

    def recover(self) -> int:
        """At start-up: publish labels a crash left in the outbox (and move decisions that
        snapshots of the previous format still hold into it).  Returns events sent."""
        for key in self.r.scan_iter(match="maskprop:search:*:classes"):
            campaign = key.decode().split(":")[2]
            for k in self.classes(campaign):
                self._cache.pop((campaign, k), None)
                try:
                    with self._class(campaign, k):
                        pass  # loading moves a snapshot's pending decisions to the outbox
                except (OSError, BadRequest) as exc:
                    # One class whose tree file is gone must not keep the service down.
                    log.error(
                        "cannot recover class; its labels wait in Redis",
                        extra={"campaign": campaign, "class_id": k, "error": str(exc)},
                    )
        return self.drain_outbox()

    # ------------------------------------------------------------------ API
    def lease(
        self, campaign: str, max_questions: int, owner: str = ""
    ) -> tuple[list[search_pb2.Question], bool]:
        """Up to ``max_questions`` questions over the campaign's classes; (questions, done)."""
        out: list[search_pb2.Question] = []
        classes = self.classes(campaign)
        if not classes:
            return out, False
        start = self._rr % len(classes)
        self._rr += 1
        order = classes[start:] + classes[:start]
        # Classes with overdue leases first: their questions are already sampled and waiting.
        keys: list[str] = []
        for k in order:
            keys += (self._k(campaign, k, "leases"), self._k(campaign, k, "version"))
        replies = self._survey_script(keys=keys, args=[self.clock()])  # one round trip
        overdue = [k for k, hit in zip(order, replies[0::2], strict=True) if hit]
        versions = dict(zip(order, (int(v) for v in replies[1::2]), strict=True))
        order = overdue + [k for k in order if k not in overdue]
        done = True
        busy = []  # classes to lock: overdue leases, or possibly questions to hand out
        for k in order:
            if k not in overdue:
                idle_done = self._idle(campaign, k, versions[k])
                if idle_done is not None:
                    done = done and idle_done
                    continue
            busy.append(k)
        deadline = self.clock() + self.lease_seconds
        with self._classes(campaign, busy) as batch:
            for k in busy:
                if len(out) >= max_questions:
                    done = False  # not checked: unknown, so not done
                    break
                held = batch.held[k]
                loaded = held.loaded
                assert loaded is not None
                # Only classes the survey above found with overdue leases pay for the
                # expiry query.
                expired = self._expire(campaign, k, loaded) if k in overdue else []
                qs = loaded.session.lease(max_questions - len(out))
                if qs or expired or loaded.session.has_pending_decisions():
                    held.changed = True
                    held.add_leases = {question_id(campaign, q): deadline for q in qs}
                    held.drop_leases = expired
                done = done and loaded.session.done
                if qs:
                    out += self._questions(campaign, loaded, qs, deadline)
        self._published(batch.events)
        if out:
            log.debug("leased", extra={"campaign": campaign, "n": len(out), "owner": owner})
        return out, done and not out

    def _idle(self, campaign: str, class_id: int, version: int) -> bool | None:
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

    def _expire(self, campaign: str, class_id: int, loaded: _Loaded) -> list[str]:
        """Give overdue leases back to the pool; returns their question ids."""
        key = self._k(campaign, class_id, "leases")
        overdue = [q.decode() for q in self.r.zrangebyscore(key, "-inf", self.clock())]
        if overdue:
            loaded.session.expire(parse_question_id(q)[1] for q in overdue)
        return overdue

    def _questions(
        self, campaign: str, loaded: _Loaded, qs: list[Question], deadline: float
    ) -> list[search_pb2.Question]:
        """The wire form of ``qs`` (one class), built column-wise like the label events."""
        t = loaded.table
        masks = np.fromiter((q.mask for q in qs), np.int64, len(qs))
        image_ids = t.image_ids[masks].tolist()
        out = []
        for q, mask_id, image_id, h, w, lo, hi in zip(
            qs,
            t.mask_ids[masks].tolist(),
            image_ids,
            t.rle_h[masks].tolist(),
            t.rle_w[masks].tolist(),
            t.rle_offsets[masks].tolist(),
            t.rle_offsets[masks + 1].tolist(),
            strict=True,
        ):
            out.append(
                search_pb2.Question(
                    question_id=question_id(campaign, q),
                    campaign=campaign,
                    class_id=q.class_id,
                    class_name=loaded.class_name,
                    mask_id=mask_id,
                    image_id=image_id,
                    rle=common_pb2.RleMask(height=h, width=w, counts=t.rle_blob[lo:hi]),
                    lease_expires_unix=deadline,
                    image_file=loaded.images[image_id][2],
                )
            )
        return out

    def submit(self, answers: Iterable[tuple[str, bool]]) -> tuple[int, int, int]:
        """Record ``(question_id, is_correct)`` answers; returns (applied, duplicates, stale)."""
        by_campaign: dict[str, dict[int, list[tuple[str, Question, bool]]]] = {}
        known: set[str] = set()
        for qid, ok in answers:
            campaign, q = parse_question_id(qid, known)
            by_class = by_campaign.setdefault(campaign, {})
            by_class.setdefault(q.class_id, []).append((qid, q, bool(ok)))
        applied = duplicates = stale = events = 0
        for campaign, by_class in sorted(by_campaign.items()):
            with self._classes(campaign, by_class) as batch:
                for k, items in sorted(by_class.items()):
                    held = batch.held[k]
                    assert held.loaded is not None
                    session = held.loaded.session
                    drop = held.drop_leases
                    for qid, q, ok in items:
                        if session.is_answered(k, q.mask):
                            duplicates += 1
                            drop.append(qid)
                            continue
                        try:
                            session.submit((Answer(k, q.node, q.mask, ok),))
                        except MaskpropError:
                            stale += 1  # lease expired (or never leased): the answer is unused
                            continue
                        applied += 1
                        drop.append(qid)
                    held.changed = True
            events += batch.events
        self._published(events)
        return applied, duplicates, stale

    def progress(self, campaign: str) -> search_pb2.GetProgressResponse:
        resp = search_pb2.GetProgressResponse()
        total_q = 0
        done = True
        classes = self.classes(campaign)
        with self._classes(campaign, classes) as batch:  # one round trip to lock them all
            loaded = {k: h.loaded for k, h in batch.held.items()}
        for k in classes:
            lk = loaded[k]
            assert lk is not None
            s = lk.session
            p = s.progress()[k]
            total_q += s.questions
            done = done and s.done
            resp.classes.append(
                search_pb2.ClassProgress(
                    class_id=k,
                    class_name=lk.class_name,
                    masks=p["masks"],
                    accepted_masks=p["accepted_masks"],
                    rejected_masks=p["rejected_masks"],
                    undecided_masks=p["undecided_masks"],
                    open_clusters=p["open_clusters"],
                    questions=s.questions,
                    clusters_accepted=s.outcomes.get("accept", 0),
                    clusters_rejected=s.outcomes.get("reject", 0)
                    + s.outcomes.get("auto_reject", 0),
                )
            )
        resp.questions = total_q
        resp.done = bool(classes) and done
        return resp

    def labels(self, campaign: str, class_id: int) -> np.ndarray:
        """int8[n] labels of a class in tree leaf order (tests, reports)."""
        with self._class(campaign, class_id) as held:
            assert held.loaded is not None
            return held.loaded.session.labels(class_id).copy()
