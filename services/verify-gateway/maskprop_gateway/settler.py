"""The settler: applies marked answers off the request path (issue #18).

An answer request only marks its answers (:meth:`Leases.mark_answered
<maskprop_gateway.leases.Leases.mark_answered>`), which appends the new ones, in the same Lua
step, as one entry to the answer inbox (``keys.ANSWER_INBOX``, a Redis stream of the gateway
deployment).  Everything that depends on whether a question is hidden gold or real (scoring
gold, casting and tallying votes, suspending a worker, deciding labels, forwarding them) runs
here, in a thread of every gateway process, so no answer's response time tells a worker which
kind of question it answered.

Delivery: the processes read the inbox as one consumer group (``keys.SETTLERS``, XREADGROUP),
each under its own consumer name; an entry is acknowledged and deleted (XACK + XDEL, one
MULTI) only once applied.  Entries delivered to a process that died before acknowledging them
stay pending in the group; after ``reclaim_idle_s`` any other process takes them over
(XAUTOCLAIM) and applies them.  Applying an entry again is harmless: each step keeps the
first write (a gold score per worker and item, a vote per worker and question, a
qualification answer per question, a label per question, a suspension per worker), so every
answer takes effect exactly once however often its entry is applied.

An entry that can never be applied (its lease record is gone, a gold item vanished) raises
:class:`Poison` and goes to the dead-letter stream (``keys.ANSWER_DEAD``, for operators); one
that keeps failing otherwise (``max_attempts``) too.  Failures such as Redis being down leave
entries pending for the next pass.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from maskprop_gateway import keys
from maskprop_gateway.metrics import (
    SETTLE_BACKLOG,
    SETTLE_DEAD,
    SETTLE_DELAY,
    SETTLE_LAG,
    SETTLED,
)
from maskprop_runtime.outbox import relay_loop

log = logging.getLogger(__name__)


class Poison(Exception):
    """An inbox entry that can never be applied (it goes to the dead-letter stream)."""


@dataclass(frozen=True)
class InboxEntry:
    """One answer request's new answers, as the answered script appended them."""

    entry_id: str
    lease_id: str
    vendor: str
    worker_id: str
    campaign: str
    at: float  # when the answers were marked (unix s): the votes' cast time
    answers: tuple[tuple[str, bool, int], ...]  # (opaque question id, answer, elapsed ms)

    @property
    def worker(self) -> str:
        """Quality control's worker id (``<vendor>:<worker>``)."""
        return f"{self.vendor}:{self.worker_id}"

    @classmethod
    def parse(cls, entry_id: Any, fields: dict[Any, Any]) -> InboxEntry:
        """An entry from its stream fields; raises :class:`Poison` for a malformed one."""
        f = {_s(k): _s(v) for k, v in fields.items()}
        try:
            answers = []
            for part in f["a"].split(","):
                oid, label, ms = part.split(":")
                answers.append((oid, label == "1", int(ms)))
            return cls(_s(entry_id), f["l"], f["v"], f["w"], f["c"], float(f["t"]), tuple(answers))
        except (KeyError, ValueError) as exc:
            raise Poison(f"malformed inbox entry: {exc!r}") from None


Apply = Callable[[InboxEntry], None]


class Settler:
    """Applies the answer inbox with ``apply`` (one entry at a time, any number of times:
    ``apply`` must keep first writes), as consumer ``consumer`` of the group.  ``on_settled``
    hears the campaigns of each applied batch.  ``reclaim_idle_s``: how long an entry may sit
    delivered but unacknowledged (its process died) before another process takes it over."""

    def __init__(
        self,
        redis: Any,
        apply: Apply,
        *,
        on_settled: Callable[[set[str]], None] | None = None,
        reclaim_idle_s: float = 30.0,
        batch: int = 200,
        max_attempts: int = 5,
        consumer: str | None = None,
    ) -> None:
        self.r = redis
        self.apply = apply
        self.on_settled = on_settled
        self.reclaim_idle_s = reclaim_idle_s
        self.batch = batch
        self.max_attempts = max_attempts
        self.consumer = consumer or (f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        self._lock = threading.Lock()  # one pass at a time in this process
        self._signal = threading.Event()
        # Entries this process appended, and how many of them a finished pass covered: while
        # they differ, answers of this process are on their way (pending()).
        self._added = 0
        self._covered = 0
        self._group_ready = False
        self._own_pending = True  # look at entries delivered to us but not acknowledged
        self._reclaimed_at = float("-inf")
        self._failures: dict[str, int] = {}
        # How long a pass may wait for a new entry when it found none (start(wait_s=...)).
        self.wait_s = 0.0

    # ------------------------------------------------------------------ the request path
    def added(self) -> None:
        """An answer request of this process appended an entry: wake the settler thread."""
        self._added += 1
        self._signal.set()

    def pending(self) -> bool:
        """Whether answers this process marked may not be applied yet (no Redis read): read by
        leases that find the pool empty, as those answers may free or open questions."""
        return self._added != self._covered

    # ------------------------------------------------------------------ passes
    def settle_pending(self) -> int:
        """One pass: apply every entry in the inbox now (this process's failed ones first,
        then those of dead processes once idle ``reclaim_idle_s``, then new ones) and return
        how many were applied.  Tests and shutdown call it to drain the inbox; once it
        returns, every answer marked before the call (by any process) was applied or is held
        by another live process's settler."""
        with self._lock:
            target = self._added
            self.ensure_group()
            n = 0
            if self._own_pending:
                self._own_pending = False
                n += self._run(self._read("0"))
            if time.monotonic() - self._reclaimed_at >= self.reclaim_idle_s / 4:
                self._reclaimed_at = time.monotonic()
                n += self._reclaim()
            while True:
                # nothing applied yet this pass: wait up to wait_s for an entry (a background
                # process, which no request of its own wakes)
                got = self._read(">", wait_s=0.0 if n else self.wait_s)
                if not got:
                    break
                n += self._run(got)
            self._covered = target
            self._observe_backlog()
            return n

    def start(
        self, *, idle_s: float = 0.5, linger_s: float = 0.0, wait_s: float = 0.0
    ) -> Callable[[], None]:
        """Run passes in a thread, woken by :meth:`added` (lingering ``linger_s`` for more)
        and every ``idle_s`` (other processes' entries, reclaims); with ``wait_s`` a pass
        that finds nothing waits that long in Redis for a new entry (XREADGROUP BLOCK: a
        process no request wakes, background.py).  Returns the function that stops it after
        a last pass."""
        self.wait_s = wait_s
        stop = threading.Event()
        thread = threading.Thread(
            target=relay_loop,
            args=(self.settle_pending, self._signal, stop),
            kwargs={"idle_s": idle_s, "linger_s": linger_s, "name": keys.ANSWER_INBOX},
            name="settler",
            daemon=True,
        )
        thread.start()

        def halt() -> None:
            stop.set()
            self._signal.set()
            thread.join(30)
            try:
                self.settle_pending()
            except Exception:  # Redis down: the entries wait in the inbox for any settler
                log.exception("settling the last answers failed; they wait in the inbox")

        return halt

    # ------------------------------------------------------------------ the stream
    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless this settler did already."""
        if self._group_ready:
            return
        try:
            # from the stream's start: entries appended before the group existed count
            self.r.xgroup_create(keys.ANSWER_INBOX, keys.SETTLERS, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _read(self, start: str, *, wait_s: float = 0.0) -> list[tuple[Any, dict[Any, Any]]]:
        """Entries delivered to this consumer: new ones (``">"``) or its unacknowledged ones
        (``"0"``); with ``wait_s``, waiting that long for one when there is none."""
        try:
            got = self.r.xreadgroup(
                keys.SETTLERS,
                self.consumer,
                {keys.ANSWER_INBOX: start},
                count=self.batch,
                block=int(wait_s * 1000) or None,  # 0 would block for good
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # the stream was deleted (Redis flushed): make it again
            self.ensure_group()
            return []
        if not got:
            return []
        entries = list(got[0][1])
        if start != ">" and len(entries) == self.batch:
            self._own_pending = True  # more than one batch of our own left: next pass
        return entries

    def _reclaim(self) -> int:
        """Take over entries another consumer (a dead process) left unacknowledged for
        ``reclaim_idle_s``, and apply them."""
        n, start = 0, "0-0"
        idle_ms = int(self.reclaim_idle_s * 1000)
        while True:
            reply = self.r.xautoclaim(
                keys.ANSWER_INBOX,
                keys.SETTLERS,
                self.consumer,
                idle_ms,
                start_id=start,
                count=self.batch,
            )
            start, claimed = _s(reply[0]), list(reply[1])
            if claimed:
                log.warning(
                    "reclaimed answers a dead gateway left unsettled",
                    extra={"entries": len(claimed)},
                )
                n += self._run(claimed)
            if start == "0-0":
                return n

    def _run(self, entries: Iterable[tuple[Any, dict[Any, Any] | None]]) -> int:
        """Apply entries; acknowledge and delete those applied (or dead-lettered)."""
        done: list[Any] = []
        campaigns: set[str] = set()
        answers = 0
        now = time.time()
        for entry_id, fields in entries:
            eid = _s(entry_id)
            if not fields:  # deleted after it was delivered: nothing left to apply
                done.append(entry_id)
                continue
            try:
                entry = InboxEntry.parse(eid, fields)
                self.apply(entry)
            except Poison as exc:
                self._dead_letter(entry_id, fields, str(exc))
                done.append(entry_id)
                continue
            except Exception as exc:
                tries = self._failures.get(eid, 0) + 1
                self._own_pending = True  # still ours: the next pass tries again
                if tries < self.max_attempts:
                    self._failures[eid] = tries
                    log.warning(
                        "applying answers failed; will retry",
                        extra={"entry": eid, "attempt": tries, "error": repr(exc)},
                    )
                    continue
                self._failures.pop(eid, None)
                self._dead_letter(entry_id, fields, f"failed {tries} times: {exc!r}")
                done.append(entry_id)
                continue
            self._failures.pop(eid, None)
            done.append(entry_id)
            campaigns.add(entry.campaign)
            answers += len(entry.answers)
            SETTLE_DELAY.observe(max(0.0, now - _entry_time(eid)))
        if done:
            pipe = self.r.pipeline(transaction=True)
            pipe.xack(keys.ANSWER_INBOX, keys.SETTLERS, *done)
            pipe.xdel(keys.ANSWER_INBOX, *done)
            pipe.execute()
        SETTLED.inc(answers)
        if campaigns and self.on_settled is not None:
            self.on_settled(campaigns)
        return len(done)

    def _dead_letter(self, entry_id: Any, fields: dict[Any, Any], reason: str) -> None:
        log.error(
            "answers could not be applied; dead-lettered",
            extra={"entry": _s(entry_id), "details": reason[:500]},
        )
        SETTLE_DEAD.inc()
        self.r.xadd(
            keys.ANSWER_DEAD,
            {**fields, "reason": reason[:500]},
            maxlen=keys.ANSWER_DEAD_MAXLEN,
            approximate=True,
        )

    def _observe_backlog(self) -> None:
        """The inbox's backlog (entries not applied yet) and the age of its oldest entry."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xlen(keys.ANSWER_INBOX)
        pipe.xrange(keys.ANSWER_INBOX, count=1)
        length, oldest = pipe.execute()
        SETTLE_BACKLOG.set(int(length))
        SETTLE_LAG.set(max(0.0, time.time() - _entry_time(_s(oldest[0][0]))) if oldest else 0.0)

    def backlog(self) -> int:
        """Entries in the inbox not yet applied (any process's)."""
        return int(self.r.xlen(keys.ANSWER_INBOX))


def _entry_time(entry_id: str) -> float:
    """A stream entry id's time (unix s, Redis's clock)."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
