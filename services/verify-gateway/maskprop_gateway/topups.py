"""Refills of the gateway's question pool from search, and leases on the event loop that wait
for them.

Search pays per call for every class it locks and saves, so the pool is topped up in large
calls (``refill_questions`` or more, at most :data:`SEARCH_MAX_ANSWERS`), one at a time per
campaign: the thread calling search holds the campaign's lock, and the event loop's leases
share one task per campaign.  A top-up starts early, when the pool falls below
``refill_questions``, so leases seldom wait for it.  The forwarder asks for the new questions
answers open in the SubmitAnswers call that delivers them (:meth:`TopUps.wanted`,
:meth:`TopUps.take`): search leases them under the class locks the answers take anyway, where
a LeaseQuestions call after it would lock, load and save those classes again.  Then it wakes the
leases waiting for questions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

from maskprop_gateway import views
from maskprop_gateway.pool import QuestionPool
from maskprop_gateway.search_client import SearchClient, SearchUnavailable
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2

log = logging.getLogger(__name__)

#: Questions (and answers) per search call: search refuses more (search.proto).
SEARCH_MAX_ANSWERS = 1000


class TopUps:
    """Top-ups of ``pool`` from ``search``: ``refill_questions`` per call at least (and the
    threshold below which one starts early); ``lease_wait_s``: how long an empty lease waits
    for answers in flight to open new questions; ``clock``: unix seconds."""

    def __init__(
        self,
        search: SearchClient,
        pool: QuestionPool,
        *,
        refill_questions: int,
        lease_wait_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.search = search
        self.pool = pool
        self.refill_questions = refill_questions
        self.lease_wait_s = lease_wait_s
        self.clock = clock
        # One search call at a time per campaign: the thread calling search holds the
        # campaign's lock; the event loop's leases share one task (before_lease).
        self._locks_guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._tasks: dict[str, asyncio.Task[int]] = {}
        # Leases waiting on the event loop for new questions (wait_for_questions), woken by
        # the forwarder thread through the loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrivals: dict[str, asyncio.Event] = {}
        # Set in a background process (background.py): tells the HTTP process's leases too.
        self.broadcast: Callable[[Iterable[str]], None] | None = None

    def refill(self, campaign: str, want: int, *, fresh: bool = False) -> int:
        """Lease up to ``want`` questions (at least ``refill_questions``, at most what one
        search call carries) from search into the pool; returns how many arrived.

        One call at a time per campaign: a thread that finds another one asking waits for
        it and returns -1 (the pool has whatever it brought), or with ``fresh`` (search's
        state changed since that call began) then asks itself.  32 workers' leases each
        asking search for their own shortfall made ~3x as many search calls, each returning
        a few dozen questions, and search pays per call for every class it locks and saves."""
        with self._locks_guard:
            lock = self._locks.setdefault(campaign, threading.Lock())
        if not lock.acquire(blocking=False):
            if not fresh:
                with lock:
                    return -1
            lock.acquire()
        try:
            want = min(max(want, self.refill_questions), SEARCH_MAX_ANSWERS)
            try:
                questions, _done = self.search.lease(campaign, want, "gateway")
            except SearchUnavailable:
                return 0
            self.take(questions)
            return len(questions)
        finally:
            lock.release()

    def take(self, questions: Iterable[search_pb2.Question]) -> None:
        """Put questions search leased to this gateway in the pool, each campaign's at once."""
        by_campaign: dict[str, dict[str, str]] = {}
        for q in questions:
            by_campaign.setdefault(q.campaign, {})[q.question_id] = views.render(
                q.class_name, q.image_file, q.rle.height, q.rle.width, q.rle.counts.decode("ascii")
            )
        now = self.clock()
        for campaign, items in by_campaign.items():
            self.pool.add(campaign, items, now)

    def wanted(self, campaigns: Iterable[str]) -> dict[str, int]:
        """The top-ups to ask with answers of ``campaigns`` (SubmitAnswers' ``top_ups``):
        ``refill_questions`` for each whose pool runs short.  Answers may open new clusters,
        so the forwarder asks for them as it delivers the answers, before leases find the
        pool dry (they would wait for a top-up of their own)."""
        return {
            campaign: self.refill_questions
            for campaign, ready in self.pool.ready_counts(campaigns).items()
            if ready < self.refill_questions
        }

    async def before_lease(self, campaign: str, n: int) -> int:
        """On the event loop, before a lease of ``n`` questions: start a top-up (off the loop)
        when fewer than ``refill_questions`` are ready, and wait for it only when fewer than
        ``n`` are.  Returns the questions ready then."""
        ready = self.pool.ready_count(campaign)
        if ready < self.refill_questions:
            task = self._tasks.get(campaign)
            if task is None or task.done():
                # refill asks for at least refill_questions
                task = asyncio.create_task(self._refill_off_loop(campaign, 2 * (n - ready)))
                self._tasks[campaign] = task
            if ready < n:
                # shielded: a client that goes away must not cancel the others' top-up
                await asyncio.shield(task)
                ready = self.pool.ready_count(campaign)
        return ready

    async def wait_for_questions(
        self, campaign: str, ready: int, forwarding: Callable[[], bool]
    ) -> None:
        """Nothing to hand out (``ready`` 0), but answers are on their way to search
        (``forwarding()``) and may open new clusters (the forwarder tops up once search has
        them): wait for those up to ``lease_wait_s`` rather than send the worker away
        empty-handed to poll again."""
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.lease_wait_s
        while ready == 0 and forwarding() and (left := deadline - time.monotonic()) > 0:
            arrival = self._arrivals.setdefault(campaign, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrival.wait(), left)
            ready = self.pool.ready_count(campaign)

    def announce(self, campaigns: Iterable[str]) -> None:
        """From the forwarder thread: search has new answers of ``campaigns`` and the pool
        was topped up; leases waiting on the event loop look again (and, from a background
        process, those of the HTTP process: :attr:`broadcast`)."""
        campaigns = list(campaigns)
        if self.broadcast is not None:
            self.broadcast(campaigns)
        loop = self._loop
        if loop is None:
            return

        def wake() -> None:
            for campaign in campaigns:
                arrival = self._arrivals.pop(campaign, None)
                if arrival is not None:
                    arrival.set()

        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            loop.call_soon_threadsafe(wake)

    async def drain(self) -> None:
        """At shutdown: let the top-ups in flight finish (their questions are in the pool)."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    async def _refill_off_loop(self, campaign: str, want: int) -> int:
        try:
            return await asyncio.to_thread(self.refill, campaign, want)
        except Exception:  # a lease gets what the pool holds; the next one tries again
            log.exception("topping up questions from search failed", extra={"campaign": campaign})
            return 0
