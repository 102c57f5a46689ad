"""Decided labels to search, through the label outbox (a :class:`maskprop_runtime.outbox.Outbox`
on ``outbox:labels``).

:meth:`QuestionPool.settle <maskprop_gateway.pool.QuestionPool.settle>` appends a question's
label in the same Redis step that decides it, so a label is never lost (search down, gateway
killed) nor queued twice.  The relay sends the oldest labels to search, up to
:data:`SEARCH_MAX_ANSWERS` a call, and deletes them only once search acknowledged them; a
failed call leaves them for the next try (at-least-once: search counts a repeated answer as a
duplicate).  Acknowledged questions leave the pool (:meth:`QuestionPool.done`).

Two modes (``forward_linger_s``):

* relay (> 0, deployed): a thread (:meth:`Forwarder.start`) sends the labels of many requests
  together, woken by a request's labels and lingering ``forward_linger_s`` for more: search
  saves each class a call touches once, so one call of 300 labels costs it far less than three
  of 100.  Each call also asks for the new questions of campaigns whose pool runs short
  (search leases them with the answers); then it wakes the leases waiting for questions.
* inline (0: tests, embedded): a request's labels are sent before it answers; labels whose
  sending failed are retried by :meth:`Forwarder.retry`, which the expiry loop calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from maskprop_gateway import keys
from maskprop_gateway.pool import QuestionPool
from maskprop_gateway.search_client import (
    SearchClient,
    SearchNotFound,
    SearchRejected,
    SearchUnavailable,
)
from maskprop_gateway.topups import SEARCH_MAX_ANSWERS, TopUps
from maskprop_runtime.outbox import Outbox

log = logging.getLogger(__name__)


class Forwarder:
    """Relays the label outbox to ``search`` (see the module docstring)."""

    def __init__(
        self,
        redis: Any,
        search: SearchClient,
        pool: QuestionPool,
        topups: TopUps,
        *,
        linger_s: float,
    ) -> None:
        self.search = search
        self.pool = pool
        self.topups = topups
        self.linger_s = linger_s
        self.outbox = Outbox(redis, keys.LABEL_OUTBOX, batch=SEARCH_MAX_ANSWERS)
        # What forwarding() says, without a Redis read: labels this process decided and
        # its relay has not taken yet, and labels being sent now.
        self._queued = 0
        self._in_flight = 0
        self._failed = False  # inline: a send failed, retry() has labels to send

    def forward(self, n: int) -> int:
        """A request decided ``n`` labels (already in the outbox).  Inline: send what the
        outbox holds now; returns the labels sent (0 when search is down or refused them:
        they stay queued).  Relay: wake the relay thread; returns ``n``."""
        if self.linger_s <= 0:
            return self.retry() if n else 0
        if n:
            self._queued += n
            self.outbox.signal()
        return n

    def retry(self) -> int:
        """Inline: send what the outbox holds (once a send failed, the expiry loop calls this
        until one succeeds); returns the labels sent."""
        try:
            sent = self.outbox.drain(self._send)
        except SearchUnavailable:
            self._failed = True
            log.warning("search unavailable; decided labels kept in the outbox")
            return 0
        except (grpc.RpcError, SearchRejected, SearchNotFound) as exc:
            # The workers' answers are safe in the outbox; a failing forward must not fail
            # their request.
            self._failed = True
            log.error(
                "search refused decided labels; kept in the outbox",
                extra={"details": str(exc)},
            )
            return 0
        self._failed = False
        return sent

    def retry_due(self) -> bool:
        """Whether an inline send failed and :meth:`retry` has labels to send."""
        return self._failed

    def _send(self, entries: list[tuple[bytes, bytes]], *, top_up: bool = True) -> None:
        """Send one outbox batch to search; raises (the batch stays queued) unless search
        acknowledged it, then the questions leave the pool.  With ``top_up`` the call also
        asks for new questions of the batch's campaigns whose pool runs short
        (:meth:`TopUps.wanted`), which join the pool.

        The outbox is read from its head, so a label search refuses for good (its campaign or
        class is gone) would block every later label of every campaign.  A refused batch is
        split in halves until the refused labels stand alone; those go to the dead-letter
        stream (``keys.LABEL_DEAD``) and leave the pool, and the rest is delivered.  Search
        unavailable still raises: the whole batch waits."""
        answers = [(k.decode(), v == b"1") for k, v in entries]
        want: dict[str, int] = {}
        if top_up:
            try:
                want = self.topups.wanted({QuestionPool.campaign_of(q) for q, _ in answers})
            except Exception:  # the answers go anyway; leases top up by themselves
                log.exception("reading which campaigns need questions failed")
        try:
            submitted = self.search.submit(answers, want, "gateway")
        except (SearchRejected, SearchNotFound) as exc:
            if len(entries) > 1:
                half = len(entries) // 2
                # delivered halves are resent only as duplicates
                self._send(entries[:half], top_up=False)
                self._send(entries[half:], top_up=False)
                return
            self._dead_letter(entries[0], exc)
            submitted = None
        self.pool.done([q for q, _ in answers])
        if submitted is not None and submitted.questions:
            try:
                self.topups.take(submitted.questions)
            except Exception:  # the answers are delivered: this batch must not be sent again
                log.exception(
                    "adding the questions search leased with the answers failed; they go back "
                    "to its pool when their lease expires",
                    extra={"questions": len(submitted.questions)},
                )

    def _dead_letter(self, entry: tuple[bytes, bytes], exc: Exception) -> None:
        """Park one label search refused alone, with the reason, so the queue moves on."""
        qid, label = entry
        log.error(
            "search refused a decided label; dead-lettered",
            extra={"question": qid.decode(errors="replace"), "details": str(exc)},
        )
        self.outbox.r.xadd(
            keys.LABEL_DEAD,
            {"k": qid, "v": label, "reason": str(exc)[:500]},
            maxlen=keys.LABEL_DEAD_MAXLEN,
            approximate=True,
        )

    def _publish(self, entries: list[tuple[bytes, bytes]]) -> None:
        """The relay's publish: send the batch (its call tops the pool up: search just
        applied these answers, which may open new clusters), then wake waiting leases."""
        self._queued = 0
        self._in_flight = len(entries)
        campaigns = {QuestionPool.campaign_of(k.decode()) for k, _ in entries}
        try:
            self._send(entries)
        finally:
            self._in_flight = 0
            self.topups.announce(campaigns)

    def start(self) -> Callable[[], None]:
        """Run the relay in a thread; returns the function that stops it (after sending what
        is queued)."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self.outbox.run_relay,
            args=(self._publish, stop),
            kwargs={"linger_s": self.linger_s},
            name="forwarder",
            daemon=True,
        )
        thread.start()

        def halt() -> None:
            stop.set()
            self.outbox.signal()
            thread.join(30)
            try:
                self.outbox.drain(self._publish)
            except Exception:  # search or Redis down: the labels wait in the outbox
                log.exception("sending the last labels failed; they wait in the outbox")

        return halt

    def forwarding(self) -> bool:
        """Whether this process has decided labels on their way to search (not yet taken by
        its relay, or being sent): answers that may open new questions any moment.  Read by
        leases that find the pool empty; no Redis read unless this process queued labels its
        relay has not taken (another replica's relay may have sent them: then the outbox is
        empty and they are no longer on their way)."""
        if self._in_flight:
            return True
        if self._queued and not self.outbox.pending():
            self._queued = 0
        return bool(self._queued)
