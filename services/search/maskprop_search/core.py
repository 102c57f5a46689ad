"""The search service's core: one :class:`maskprop.session.AnnotationSession` per class of a
campaign, driven by gRPC calls (lease, submit, progress) and by ``maskprop.trees`` events,
publishing the labels its decisions propagate.

Where things live: :mod:`maskprop_search.store` keeps the sessions in Redis (locks, versions,
the cache, the save that puts label events in the outbox); :mod:`maskprop_search.wire` maps
library values to protobuf messages.  Each campaign's label outbox is a runtime
:class:`~maskprop_runtime.outbox.Outbox` (:class:`~maskprop_search.store.LabelOutboxes`): the
relay (:meth:`SearchCore.run_relay`, a thread of the service process; or
:meth:`SearchCore.drain_outbox` after each API call in embedded mode) publishes events in
batches, one broker flush per batch, and deletes what the broker acknowledged.  A crash in
between publishes the same events (same event ids) again; the sink keeps one label per mask.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import AnnotationSession, Answer, Question
from maskprop_runtime import topics
from maskprop_runtime.bus import Producer, Record
from maskprop_runtime.campaigns import SessionParams
from maskprop_runtime.loop import Emit, InvalidEvent
from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from maskprop_runtime.treestore import check_name
from maskprop_search import wire
from maskprop_search.budget import SPENT, CampaignGate
from maskprop_search.store import CACHE_MASKS, Batch, Loaded, SearchStore
from maskprop_search.store import owner as store_owner

log = logging.getLogger(__name__)

#: Bytes of masks (RLE counts) the top-ups of one SubmitAnswers call lease at most; the class
#: that passes it finishes its batch (a lease's worth at most), so a response stays well under
#: gRPC's 8 MiB (maskprop_runtime.server.MAX_MESSAGE_BYTES) as LeaseQuestions' does.
TOP_UP_BYTES = 4 * 1024 * 1024

#: Questions a new class's session opens clusters for as its tree arrives
#: (:meth:`AnnotationSession.prepare`): the most one LeaseQuestions call asks (search.proto).
PREPARE_QUESTIONS = 1000


class CallerGone(Exception):
    """A lease whose caller's deadline passed before it could be committed: nothing was
    leased (the questions stay in the pool), so the caller's retry finds them (issue #15)."""


@functools.lru_cache(maxsize=65536)
def _owner(live: tuple[str, ...], campaign: str, class_id: int) -> str:
    return store_owner(list(live), campaign, class_id)


def _unlease(batch: Batch, leased: dict[int, list[Question]]) -> None:
    """Put the questions a call leased back in their (locked) sessions' pools and save no
    lease entry for them: the caller gave up before the save."""
    for k, qs in leased.items():
        held = batch.held[k]
        assert held.loaded is not None
        held.loaded.session.expire(qs)
        held.add_leases = {}


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
        cache_masks: int = CACHE_MASKS,
        replica_id: str | None = None,
        params_for: Callable[[str], SessionParams | None] | None = None,
        label_bytes: int = topics.record_limit(),
        relay_masks: int = 0,
    ) -> None:
        """``publish_inline``: each API call publishes the labels it decided before it
        returns (embedded mode, tests); with False a relay thread runs :meth:`run_relay`.
        ``cache_masks``: the masks of the classes kept in memory (:class:`SessionCache`).
        ``replica_id``: this replica's name among the live ones (default: random).
        ``label_bytes``: the most bytes a label event may take (``topics.record_limit`` of
        the topic's ``max.message.bytes``).
        ``relay_masks``: the relay's own cache of mask tables (:class:`SearchStore`).
        ``params_for(campaign)``: the parameters a campaign's new sessions open with (the
        campaign registry, :meth:`CampaignRegistry.session_params`); ``None`` from it, or no
        ``params_for``, means this process's ``params``/``selection``/``strategy``/``seed``."""
        self.params_for = params_for
        self.params = params
        self.selection = selection
        self.producer = producer
        self.seed = seed
        self.strategy = strategy
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.publish_inline = publish_inline
        self.store = SearchStore(
            redis,
            cache_masks=cache_masks,
            replica_id=replica_id,
            label_bytes=label_bytes,
            relay_masks=relay_masks,
        )
        self.outboxes = self.store.outboxes
        self.gate = CampaignGate(redis)  # a campaign's budget, pause and stop (issue #16)
        # Campaigns whose spent budget this replica has acted on (decide_without_asking).
        self._spent: set[str] = set()
        self._rr = 0  # round-robin start over classes, so concurrent workers spread out

    def classes(self, campaign: str) -> list[int]:
        return self.store.classes(campaign)

    def campaign_exists(self, campaign: str) -> bool:
        """Whether any class of ``campaign`` has reached search (one EXISTS)."""
        return self.store.campaign_exists(campaign)

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
        tree, masks = wire.load_class(path)
        if tree.n_leaves != msg.n_masks:
            raise InvalidEvent(f"tree has {tree.n_leaves} masks, event says {msg.n_masks}")
        campaign, k = msg.campaign, int(msg.class_id)
        with self.store.locked(campaign, [k], load=False):
            if self.store.has_session(campaign, k):
                return []  # redelivered: the session already exists and may have progressed
            own = self.params_for(campaign) if self.params_for is not None else None
            session = AnnotationSession(
                {k: tree},
                own.params if own else self.params,
                own.selection if own else self.selection,
                strategy=own.strategy if own else self.strategy,
                seed=own.seed if own else self.seed,
            )
            # The sweep a class starts with runs here, as its tree arrives, not inside a
            # crowd's lease (a 1M-mask class: ~470k leaves decided in ~3 s).
            started = time.perf_counter()
            session.prepare(PREPARE_QUESTIONS)
            meta = {"class_name": masks.class_name, "tree_uri": str(path), "masks": tree.n_leaves}
            decided = self.store.create(campaign, k, session, tree, masks, meta)
        self._published(decided)
        log.info(
            "session opened",
            extra={
                "campaign": campaign,
                "class_id": k,
                "decided_masks": decided,
                "s": round(time.perf_counter() - started, 3),
            },
        )
        return []

    # ------------------------------------------------------------------ the label relay
    def _publish(self, entries: list[tuple[bytes, bytes]]) -> None:
        """Outbox ``publish``: send a batch of label events, one broker flush (the ack).  An
        entry that is a record of decisions (what saves write: :func:`wire.pack_decisions`)
        goes out as its label events (:func:`wire.expand_many`: the batch's records encoded
        together), built here, off the class locks; a crash before the ack sends the same
        events (same ids) again."""
        records = [value for _key, value in entries if wire.is_decisions(value)]
        expanded = iter(
            wire.expand_many(records, self.store.class_masks, max_bytes=self.store.label_bytes)
        )
        for key, value in entries:
            if wire.is_decisions(value):
                for k, event in next(expanded):
                    self.producer.send(topics.LABELS, k, event)
            else:  # an event saved before decisions records (or by an older replica)
                self.producer.send(topics.LABELS, key, value)
        self.producer.flush()

    def drain_outbox(self, batch: int | None = None) -> int:
        """Publish every campaign's label outbox (:meth:`LabelOutboxes.drain`): batches of up
        to ``batch`` events, one broker flush each.  Returns the events published; 0 for a
        campaign whose relay lock another relay holds (it publishes them)."""
        return self.outboxes.drain(self._publish, batch=batch)

    def run_relay(self, stop: threading.Event, idle_s: float = 0.2, linger_s: float = 0.0) -> None:
        """The relay thread (:meth:`LabelOutboxes.run_relay`): publish labels as saves add them,
        lingering ``linger_s`` for more so one flush carries many calls' labels, until
        ``stop``."""
        self.outboxes.run_relay(self._publish, stop, idle_s=idle_s, linger_s=linger_s)

    def drain_at_shutdown(self) -> None:
        """The last :meth:`drain_outbox` of a process that relays labels: what the last calls
        decided; whatever it cannot send now, the next relay sends (logged, not raised)."""
        try:
            self.drain_outbox()
        except Exception as exc:
            log.warning("labels left in the outbox at shutdown", extra={"error": str(exc)})

    def outbox_backlog(self) -> float:
        """Records waiting in every campaign's label outbox; NaN when Redis does not answer
        (a metrics scrape must not fail)."""
        try:
            return float(self.outboxes.pending())
        except Exception:
            return float("nan")

    def _published(self, events: int) -> None:
        """After an API call: in embedded mode, publish what it decided before returning.

        The call's state and its label events are already saved together, so a broker that
        fails here must not fail the call: a lease whose caller got an error instead of its
        questions would hold them until the lease expires.  The events wait in the outbox
        for the next call's drain (or :meth:`recover`)."""
        if events and self.publish_inline:
            try:
                self.drain_outbox()
            except Exception as exc:  # broker down: the events wait in Redis
                log.error("publishing labels failed; kept in the outbox", extra={"error": str(exc)})

    def recover(self) -> int:
        """At start-up: publish labels a crash left in the outbox (no class is loaded: each is
        when a call first needs it).  Returns events sent."""
        return self.drain_outbox()

    # ------------------------------------------------------------------ API
    def lease(
        self,
        campaign: str,
        max_questions: int,
        owner: str = "",
        *,
        answer_by: float | None = None,
    ) -> tuple[list[search_pb2.Question], bool]:
        """:meth:`_lease` within the campaign's budget and state (:mod:`.budget`): the
        questions are reserved before they are handed out, none beyond the budget and none
        while the campaign is paused or stopped; ``done`` is also true once it is stopped or
        its budget is spent (nothing will be handed out again).

        ``answer_by``: the ``time.monotonic()`` by which the caller must have the answer (its
        gRPC deadline less a margin).  A lease that waited on class locks past it commits
        nothing and raises :class:`CallerGone`: a lease committed for a caller that already
        gave up would keep its questions from everyone for ``lease_seconds`` (issue #15:
        with two replicas a campaign stalled on such leases for its last 82 s)."""
        if answer_by is not None and time.monotonic() > answer_by:
            raise CallerGone("the caller's deadline passed before the lease started")
        grant = self.gate.reserve(campaign, max_questions)
        if grant.code == SPENT and campaign not in self._spent:
            self.decide_without_asking(campaign)  # first seen here (or after a restart)
        if grant.questions <= 0 and max_questions > 0:
            return [], grant.finished
        self._spent.discard(campaign)  # a revised budget hands out again
        try:
            out, done = self._lease(campaign, grant.questions, owner, answer_by)
        except BaseException:
            self.gate.refund(grant, 0)
            raise
        self.gate.refund(grant, len(out))
        if grant.spends_budget(len(out)):
            self.decide_without_asking(campaign)
        return out, done

    def decide_without_asking(self, campaign: str) -> int:
        """Asking has ended for ``campaign`` (its budget is spent): every class makes the
        decisions that need no question (:meth:`AnnotationSession.decide_without_asking`), so
        a budget of exactly the questions a campaign needs labels what a budget to spare
        labels; :meth:`submit` does the same after each answer still to come.  Returns the
        candidates advanced.  Embedded runs, whose loop holds the budget, call it when they
        stop asking."""
        self._spent.add(campaign)
        _, survey = self.store.survey(campaign, self.clock())
        pending = [s.class_id for s in survey if not s.done]
        if not pending:
            return 0
        advanced = 0
        with self.store.locked(campaign, pending) as batch:
            for k in pending:
                loaded = batch.held[k].loaded
                assert loaded is not None
                n = loaded.session.decide_without_asking()
                if n:
                    batch.held[k].changed = True
                    advanced += n
        self._published(batch.events)
        return advanced

    def _lease(
        self, campaign: str, max_questions: int, owner: str = "", answer_by: float | None = None
    ) -> tuple[list[search_pb2.Question], bool]:
        """Up to ``max_questions`` questions over the campaign's classes; (questions, done).

        The classes' counters (one round trip, no session) say which have overdue leases and
        about how many questions each could hand out (``ready``); the call locks and loads the
        classes with overdue leases and, in round-robin order, only as many of the others as
        their ``ready`` takes to fill ``max_questions``.  When they give fewer (an estimate),
        it goes on with the next ones, twice as many each round.  ``done``: no question handed
        out and every class done, by the counters of classes not locked.

        Replicas spread the classes: the classes this replica owns among the live ones
        (:func:`~maskprop_search.store.owner`) come first, the others only when those cannot
        fill the call (their owner serves them), so two replicas' leases rarely meet on a
        class lock or make each other's copies stale.

        Past ``answer_by`` (checked with the classes locked, just before the save commits) the
        batch's questions go back to its sessions unleased, those of earlier batches are
        given back (:meth:`_give_back`), and :class:`CallerGone` is raised."""
        out: list[search_pb2.Question] = []
        committed: list[tuple[str, Question]] = []  # (question id, question) saved as leased
        live, survey = self.store.survey(campaign, self.clock())  # one round trip
        if not survey:
            return out, False
        start = self._rr % len(survey)
        self._rr += 1
        order = survey[start:] + survey[:start]
        done = {s.class_id: s.done for s in order}
        me = self.store.replica_id
        owned = {
            s.class_id
            for s in order
            if len(live) < 2 or _owner(tuple(live), campaign, s.class_id) == me
        }
        # Classes this process holds a copy of come first (still in round-robin order among
        # themselves): a lease that could be filled from them never evicts one to load another
        # (4 classes, a one-class cache: 12 loads in 32 leases instead of 25).  It does not
        # help when the crowd's working set spans more campaigns than the cache holds (40
        # campaigns of 6.85M masks on a 4M cache: 1,889 answers/s with it, 1,987 without;
        # 3,854 with an 8M cache): size `cache_masks` (or the replicas) to that set.
        cached = self.store.cache
        order.sort(key=lambda s: (campaign, s.class_id) not in cached)  # stable
        mine = [s for s in order if s.class_id in owned]
        others = [s for s in order if s.class_id not in owned]
        # Classes with overdue leases first: their questions are already sampled and waiting.
        expiring = {s.class_id for s in order if s.overdue}
        overdue = [s.class_id for s in mine if s.overdue]
        candidates = [s for s in mine if not s.overdue and s.ready > 0]
        candidates += [s for s in others if s.overdue or s.ready > 0]
        deadline = self.clock() + self.lease_seconds
        events, at_least = 0, 1
        while True:
            serve, need, taken = list(overdue), max_questions - len(out), 0
            while candidates and (need > 0 or taken < at_least):
                picked = candidates.pop(0)
                serve.append(picked.class_id)
                need -= max(picked.ready, 1)
                taken += 1
            if not serve:
                break
            gone = False
            with self.store.locked(campaign, serve) as batch:
                leased: dict[int, list[Question]] = {}
                for k in serve:
                    loaded = batch.held[k].loaded
                    assert loaded is not None
                    # Only classes the survey found with overdue leases pay for the query.
                    expired = self._expire(campaign, k, loaded) if k in expiring else []
                    room = max_questions - len(out)
                    qs = loaded.session.lease(room) if room > 0 else []
                    if qs or expired or loaded.session.has_pending_decisions():
                        held = batch.held[k]
                        held.changed = True
                        held.add_leases = {wire.question_id(campaign, q): deadline for q in qs}
                        held.drop_leases = expired
                    done[k] = loaded.session.done
                    if qs:
                        leased[k] = qs
                        out += wire.questions(campaign, loaded.masks, qs, deadline)
                if answer_by is not None and leased and time.monotonic() > answer_by:
                    # The caller gave up: save the sessions with these questions back in
                    # the pool (the decisions leasing made stand) and no lease entries.
                    gone = True
                    _unlease(batch, leased)
                else:
                    committed += [
                        (wire.question_id(campaign, q), q) for qs in leased.values() for q in qs
                    ]
            events += batch.events
            if gone:
                self._published(events)
                self._give_back(campaign, committed)
                raise CallerGone(
                    f"the caller's deadline passed while the lease waited on classes {serve}"
                )
            overdue = []
            at_least *= 2
            if len(out) >= max_questions or not candidates:
                break
        self._published(events)
        if answer_by is not None and committed and time.monotonic() > answer_by:
            self._give_back(campaign, committed)
            raise CallerGone("the caller's deadline passed while the lease went on")
        if out:
            log.debug("leased", extra={"campaign": campaign, "n": len(out), "owner": owner})
        return out, not out and all(done.values())

    def _give_back(self, campaign: str, leased: list[tuple[str, Question]]) -> None:
        """Return questions this call saved as leased to their sessions' pools and drop their
        lease entries (their caller is gone)."""
        if not leased:
            return
        by_class: dict[int, list[tuple[str, Question]]] = {}
        for qid, q in leased:
            by_class.setdefault(q.class_id, []).append((qid, q))
        with self.store.locked(campaign, by_class) as batch:
            for k, items in by_class.items():
                held = batch.held[k]
                assert held.loaded is not None
                held.loaded.session.expire(q for _, q in items)
                held.drop_leases = [qid for qid, _ in items]
                held.changed = True
        self._published(batch.events)

    def _expire(self, campaign: str, class_id: int, loaded: Loaded) -> list[str]:
        """Give overdue leases back to the pool; returns their question ids."""
        overdue = self.store.overdue_leases(campaign, class_id, self.clock())
        if overdue:
            loaded.session.expire(wire.parse_question_id(q)[1] for q in overdue)
        return overdue

    def submit(self, answers: Iterable[tuple[str, bool]]) -> tuple[int, int, int]:
        """Record ``(question_id, is_correct)`` answers; returns (applied, duplicates, stale)."""
        applied, duplicates, stale, _ = self.submit_and_lease(answers)
        return applied, duplicates, stale

    def submit_and_lease(
        self,
        answers: Iterable[tuple[str, bool]],
        top_ups: Mapping[str, int] | None = None,
        owner: str = "",
        *,
        answer_by: float | None = None,
    ) -> tuple[int, int, int, list[search_pb2.Question]]:
        """:meth:`submit`, and for each campaign of ``top_ups`` (campaign -> questions) among
        the answers', up to that many new questions from the classes the answers reached,
        leased under the same class locks and saved with the answers; returns (applied,
        duplicates, stale, questions).

        Answers open new clusters in the classes they reach, so a forwarder that tops up its
        pool after delivering answers finds its questions there; asking LeaseQuestions instead
        locked, loaded and saved the same classes again (past capacity ~20 calls of ~46
        questions after each SubmitAnswers; a call's fixed cost is ~2.8 ms of search's CPU:
        benchmarks/README.md, twenty-first session).  The budget and the campaign's state
        apply as in :meth:`lease`.  Past ``answer_by`` (checked with the classes locked) the
        answers are saved and the questions go back to their sessions unleased: a caller that
        gave up would keep them from everyone for ``lease_seconds``."""
        by_campaign: dict[str, dict[int, list[tuple[str, Question, bool]]]] = {}
        known: set[str] = set()
        for qid, ok in answers:
            campaign, q = wire.parse_question_id(qid, known)
            by_class = by_campaign.setdefault(campaign, {})
            by_class.setdefault(q.class_id, []).append((qid, q, bool(ok)))
        top_ups = top_ups or {}
        applied = duplicates = stale = events = 0
        out: list[search_pb2.Question] = []
        committed: dict[str, list[tuple[str, Question]]] = {}  # saved as leased, by campaign
        room_bytes = TOP_UP_BYTES
        for campaign, by_class in sorted(by_campaign.items()):
            # Asking has ended: what these answers leave that needs no question is decided
            # now (one round trip a campaign a call; any replica may get the last answers).
            spent = self.gate.spent(campaign)
            want = 0 if spent else top_ups.get(campaign, 0)
            grant = self.gate.reserve(campaign, want) if want > 0 else None
            room = grant.questions if grant is not None else 0
            got: list[search_pb2.Question] = []
            try:
                with self.store.locked(campaign, by_class) as batch:
                    deadline = self.clock() + self.lease_seconds
                    leased: dict[int, list[Question]] = {}
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
                        if spent:
                            session.decide_without_asking()
                        held.changed = True
                        if room > len(got) and room_bytes > 0:
                            qs = session.lease(room - len(got))
                            if qs:
                                add = {wire.question_id(campaign, q): deadline for q in qs}
                                held.add_leases = add
                                leased[k] = qs
                                new = wire.questions(campaign, held.loaded.masks, qs, deadline)
                                room_bytes -= sum(len(q.rle.counts) for q in new)
                                got += new
                    if leased and answer_by is not None and time.monotonic() > answer_by:
                        _unlease(batch, leased)  # saved with the answers, not leased
                        got, leased = [], {}
            except BaseException:
                if grant is not None:
                    self.gate.refund(grant, 0)
                raise
            events += batch.events
            if grant is not None:
                self.gate.refund(grant, len(got))
                if grant.spends_budget(len(got)):
                    self._published(events)
                    events = 0
                    self.decide_without_asking(campaign)
            out += got
            if leased:
                committed[campaign] = [
                    (wire.question_id(campaign, q), q) for qs in leased.values() for q in qs
                ]
        self._published(events)
        if committed and answer_by is not None and time.monotonic() > answer_by:
            for campaign, taken in committed.items():  # the caller gave up meanwhile
                self._give_back(campaign, taken)
            out = []
        if out:
            log.debug("leased with answers", extra={"n": len(out), "owner": owner})
        return applied, duplicates, stale, out

    def progress(self, campaign: str) -> search_pb2.GetProgressResponse:
        """The campaign's progress from the counters each save keeps in Redis: one round trip,
        no class lock, no session loaded."""
        classes = {}
        for k, (name, c) in self.store.progress(campaign).items():
            msg = search_pb2.ClassProgress(
                class_id=k,
                class_name=name,
                masks=c["masks"],
                accepted_masks=c["accepted"],
                rejected_masks=c["rejected"],
                undecided_masks=c["undecided"],
                open_clusters=c["open"],
                questions=c["questions"],
                clusters_accepted=c["clusters_accepted"],
                clusters_rejected=c["clusters_rejected"],
            )
            classes[k] = (msg, bool(c["done"]))
        return wire.progress_response(classes)

    def labels(self, campaign: str, class_id: int) -> np.ndarray:
        """int8[n] labels of a class in tree leaf order (tests, reports)."""
        with self.store.locked_class(campaign, class_id) as held:
            assert held.loaded is not None
            return held.loaded.session.labels(class_id).copy()
