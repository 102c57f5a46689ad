"""The gateway's domain logic, free of HTTP: a facade the routes call, composing

* :mod:`~maskprop_gateway.leases`: lease records (opaque question ids, deadlines, answers);
* :mod:`~maskprop_gateway.pool`: the question pool (which question goes to which worker);
* :mod:`~maskprop_gateway.quality`: worker quality control (qualification, hidden gold,
  suspension, the weighted vote; its rules in :mod:`~maskprop_gateway.qc_rules`);
* :mod:`~maskprop_gateway.topups`: refills of the pool from search;
* :mod:`~maskprop_gateway.forwarder`: decided labels to search, through the label outbox;
* :mod:`~maskprop_gateway.settler`: answers applied off the request path (scoring, votes,
  labels), from the answer inbox the request path appends to.

Its Redis keys are all in :mod:`maskprop_gateway.keys`.  Gold answers never leave quality
control, and gold ids never leave the gateway: a lease shows every question under an opaque id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from maskprop.metrics import cost_usd, human_hours
from maskprop_gateway import keys, views
from maskprop_gateway.auth import WorkerClaims
from maskprop_gateway.campaigns import CampaignSpecs
from maskprop_gateway.errors import Forbidden, Gone, Invalid, NotFound
from maskprop_gateway.forwarder import Forwarder
from maskprop_gateway.idempotency import IdempotencyStore
from maskprop_gateway.leases import VIEW_GRACE_S, Leases, gold_view, opaque_ids
from maskprop_gateway.metrics import ANSWERS, BLOCKED, GOLD_SHORT
from maskprop_gateway.pool import QuestionPool
from maskprop_gateway.quality import QualityControl, QualityError
from maskprop_gateway.search_client import SearchClient
from maskprop_gateway.settings import GatewaySettings
from maskprop_gateway.settler import InboxEntry, Poison, Settler
from maskprop_gateway.topups import TopUps
from maskprop_gateway.views import ItemView, LeaseOffer

log = logging.getLogger(__name__)


class Gateway:
    """Leases of questions for a vendor's worker, answers with quality control, aggregation
    and forwarding to search (see the module docstring for the parts)."""

    def __init__(
        self,
        redis: Any,
        search: SearchClient,
        qc: QualityControl,
        settings: GatewaySettings,
        *,
        clock: Callable[[], float] = time.time,
        token_for: Callable[[WorkerClaims], str] | None = None,
    ) -> None:
        self.r = redis
        self.search = search
        self.qc = qc
        self.settings = settings
        self.clock = clock
        self.token_for = token_for
        # a decided question's view outlives every lease that may still show it
        self.pool = QuestionPool(
            redis, keep_views_s=settings.lease_ttl_s + VIEW_GRACE_S, clock=clock
        )
        # registered campaigns' image folders and redundancy
        self.campaigns = CampaignSpecs(redis, qc.policy)
        self.idempotency = IdempotencyStore(redis, clock=clock)
        self.leases = Leases(
            redis, lease_ttl_s=settings.lease_ttl_s, retention_s=settings.lease_retention_s
        )
        self.topups = TopUps(
            search,
            self.pool,
            refill_questions=settings.refill_questions,
            lease_wait_s=settings.lease_wait_s,
            clock=clock,
        )
        self.forwarder = Forwarder(
            redis, search, self.pool, self.topups, linger_s=settings.forward_linger_s
        )
        # applies marked answers off the request path (a thread: start_settler)
        self.settler = Settler(
            redis,
            self._apply,
            on_settled=self.topups.announce,
            reclaim_idle_s=settings.settle_reclaim_s,
        )
        # campaign -> (when "hidden gold exhausted" was last logged, slots missed since)
        self._gold_short_log: dict[str, tuple[float, int]] = {}
        # called with (vendor_id, lease_id) after answers were recorded (vendor callbacks)
        self.submitted_hooks: list[Callable[[str, str], None]] = []

    @property
    def record_ttl_s(self) -> int:
        """Seconds a lease's record lives from its creation."""
        return self.leases.record_ttl_s

    # ------------------------------------------------------------------ leases
    def create_lease(
        self,
        vendor_id: str,
        worker_id: str,
        campaign: str,
        max_questions: int,
        *,
        refill: bool = True,
    ) -> LeaseOffer:
        """A lease of up to ``max_questions`` questions (capped by the
        ``max_lease_questions`` setting; hidden gold among them), or a worker's
        qualification test first.  With ``refill`` a pool too short for it is topped up from
        search first (blocking on that call); without, the lease gets what the pool holds
        (:meth:`create_lease_on_loop` tops up before, off the event loop)."""
        max_questions = min(max_questions, self.settings.max_lease_questions)
        worker = f"{vendor_id}:{worker_id}"
        state = self.qc.standing(worker)
        if state.suspended:
            BLOCKED.labels("suspended").inc()
            raise Forbidden("worker is suspended")
        if state.qualification == "failed":
            BLOCKED.labels("failed_qualification").inc()
            raise Forbidden("worker failed the qualification test")
        # (can_work is exactly "passed and not suspended"; the branches below need the reason)
        now = self.clock()
        expires = now + self.settings.lease_ttl_s
        # opaque id -> (kind: "q" qualification, "g" hidden gold, "r" real; gold or question
        # id), and opaque id -> view, in serving order
        refs: dict[str, tuple[str, str]] = {}
        shown: dict[str, str] = {}
        if state.qualification != "passed":
            kind = "qualification"
            try:
                gold = self.qc.qualification_questions(campaign, worker)
            except QualityError as exc:
                raise Invalid(str(exc)) from None
            if not gold:
                raise Invalid(f"campaign {campaign!r} has no gold questions for a qualification")
            ids = opaque_ids(len(gold))
            for g in gold:
                oid = next(ids)
                refs[oid], shown[oid] = ("q", g.gold_id), gold_view(g)
        else:
            kind = "work"
            # Hidden gold takes a real question's place, so a lease holds max_questions in all
            # whenever the pool has them: its size tells nothing about how much gold is in it
            # (with gold on top, 21 questions for 20 asked said "one of these is gold").
            slots = self.qc.gold_due_many(worker, max_questions)
            n_real = used = 0
            for gold_due in slots:
                if used + 1 + gold_due > max_questions:
                    break
                used, n_real = used + 1 + gold_due, n_real + 1
            if n_real == 0:  # a one-question lease: no room for gold
                n_real, slots = 1, [False]
            real = self._take(campaign, worker, n_real, expires, refill)
            due = slots[: len(real)]
            golds = self.qc.next_golds(campaign, worker, sum(due))
            if len(golds) < sum(due):
                self._gold_short(campaign, sum(due) - len(golds), now)
            hidden, ids = iter(golds), opaque_ids(len(real) + len(golds))
            for (qid, view), gold_due in zip(real, due, strict=True):
                h = next(hidden, None) if gold_due else None
                if h is not None:
                    oid = next(ids)
                    refs[oid], shown[oid] = ("g", h.gold_id), gold_view(h)
                oid = next(ids)
                refs[oid], shown[oid] = ("r", qid), view
        lease_id = self.leases.create(
            vendor_id, worker_id, campaign, kind, refs, shown, now, expires
        )
        token = None
        if self.token_for is not None:
            token = self.token_for(
                WorkerClaims(vendor_id, worker_id, campaign, now + self.settings.worker_token_ttl_s)
            )
        return LeaseOffer(lease_id, kind, campaign, worker_id, expires, list(shown.items()), token)

    #: Seconds between two "hidden gold exhausted" warnings of one campaign.
    GOLD_SHORT_LOG_S = 60.0

    def _gold_short(self, campaign: str, short: int, now: float) -> None:
        """Count hidden-gold slots left empty (the metric counts every one) and warn at most
        once a minute a campaign, with the slots missed since the last warning: once a
        campaign's gold is used up every lease is short, and a line a lease (5,106 in a
        120 s run of issue #15's benchmark) buries the logs."""
        GOLD_SHORT.labels(campaign).inc(short)
        last, missed = self._gold_short_log.get(campaign, (float("-inf"), 0))
        missed += short
        if now - last < self.GOLD_SHORT_LOG_S:
            self._gold_short_log[campaign] = (last, missed)
            return
        self._gold_short_log[campaign] = (now, 0)
        log.warning(
            "hidden gold exhausted; import more gold",
            extra={"campaign": campaign, "short": missed},
        )

    async def create_lease_on_loop(
        self, vendor_id: str, worker_id: str, campaign: str, max_questions: int
    ) -> LeaseOffer:
        """:meth:`create_lease` for a caller on the event loop.  Its Redis round trips run on
        the loop; topping up from search (tens of ms) runs in a thread, one call at a time per
        campaign whose result every lease waiting for it shares, and starts early
        (:meth:`TopUps.before_lease`); an empty pool waits a little for the questions answers
        in flight open (:meth:`TopUps.wait_for_questions`): answers not applied yet by the
        settler, decided labels not yet in search."""
        n = min(max_questions, self.settings.max_lease_questions)
        ready = await self.topups.before_lease(campaign, n)
        await self.topups.wait_for_questions(campaign, ready, self.answers_in_flight)
        return self.create_lease(vendor_id, worker_id, campaign, max_questions, refill=False)

    def answers_in_flight(self) -> bool:
        """Whether answers this process received may still free or open questions: marked
        but not applied (:meth:`Settler.pending`), or decided labels on their way to search
        (:meth:`Forwarder.forwarding`).  With the settler and forwarder in a background
        process: whether the answer inbox or the label outbox holds anything (read only by
        leases that found the pool empty)."""
        if self.settings.background == "process":
            return bool(self.settler.backlog() or self.forwarder.outbox.pending())
        return self.settler.pending() or self.forwarder.forwarding()

    async def drain_refills(self) -> None:
        """At shutdown: let the top-ups in flight finish (their questions are in the pool)."""
        await self.topups.drain()

    def _take(
        self, campaign: str, worker: str, n: int, expires: float, refill: bool = True
    ) -> list[tuple[str, str]]:
        """Up to ``n`` real questions (question id, view) this worker has not seen, claimed
        atomically (one Lua call); with ``refill``, topping up from search when the pool runs
        short."""
        redundancy = self.campaigns.policy(campaign).redundancy
        got = self.pool.claim(campaign, worker, n, expires, self.clock(), redundancy)
        if refill and len(got) < n and self.topups.refill(campaign, 2 * (n - len(got))):
            got += self.pool.claim(
                campaign, worker, n - len(got), expires, self.clock(), redundancy
            )
        return got

    def lease(self, vendor_id: str, lease_id: str) -> dict[str, Any]:
        """A lease's stored record (without its views); only its own vendor may see it
        (others get NotFound).  ``refs``: opaque id -> (kind, gold or question id)."""
        return self.leases.get(vendor_id, lease_id)

    def answered_count(self, lease_id: str) -> int:
        return self.leases.answered_count(lease_id)

    def item_view(self, vendor_id: str, lease_id: str, oid: str) -> ItemView:
        """What the worker was shown as question ``oid`` of the vendor's own lease, during
        the lease and ``VIEW_GRACE_S`` after (else NotFound); gold and real questions alike:
        one HGET each, the same answers."""
        rec = self.leases.get(vendor_id, lease_id)
        ref = rec["refs"].get(oid)
        if ref is None or self.clock() > float(rec["expires"]) + VIEW_GRACE_S:
            raise NotFound("no such question in this lease")
        code, target = ref
        if code == "r":
            raw = self.pool.view(rec["campaign"], target)
        else:
            raw = self.leases.gold_view(lease_id, oid)
        if raw is None:
            raise NotFound("no such question in this lease")
        return views.parse(raw)

    # ------------------------------------------------------------------ answers
    def submit(
        self,
        vendor_id: str,
        lease_id: str,
        worker_id: str,
        answers: list[tuple[str, bool, int]],
        *,
        request_key: str | None = None,
    ) -> dict[str, Any]:
        """Record one worker's answers (opaque id, answer, elapsed ms) to its lease: one
        answer per question counts.  The request path does only what is the same for hidden
        gold and real questions (issue #18: one answer's response time must not tell them
        apart): check the lease and the answers, mark the new answers answered and append
        them to the answer inbox (one Lua step, :meth:`Leases.mark_answered`), read the
        worker's standing (:meth:`QualityControl.status`).  Scoring gold, votes, suspension,
        the tally and forwarding happen in the settler (:meth:`settle_pending`,
        :mod:`~maskprop_gateway.settler`), shortly after; a qualification lease (its kind is
        no secret) is applied before the response, so its answer says whether the worker
        passed.

        ``worker_status`` is the worker's standing when the answers were recorded, before the
        settler applies them: a suspension these answers cause shows on the worker's next
        request.  A retry is safe: an answer already marked is a duplicate, and its effects
        come from the inbox entry of the request that marked it (appended in the same step).
        A mark carries the ``request_key`` (Idempotency-Key) of the request that made it, so
        the re-run of a key taken over (:mod:`~maskprop_gateway.idempotency`) reports as
        accepted exactly what the first response would have said: the answers it or the dead
        attempt marked, not those an earlier request marked."""
        lease = self.leases.get(vendor_id, lease_id)
        if lease["worker"] != worker_id:
            raise Forbidden("this lease belongs to another worker")
        now = self.clock()
        if float(lease["expires"]) < now:
            raise Gone("lease expired; its questions went back to the pool")
        refs: dict[str, list[str]] = lease["refs"]
        unknown = [oid for oid, _, _ in answers if oid not in refs]
        if unknown:
            raise Invalid(f"questions not in this lease: {unknown[:3]}")
        worker = f"{vendor_id}:{worker_id}"
        try:
            self.qc.check_answer_times(ms for _, _, ms in answers)
        except QualityError as exc:
            raise Invalid(str(exc)) from None

        codes, entry_id = self.leases.mark_answered(
            lease,
            lease_id,
            answers,
            now=now,
            tag=request_key or "",
            times_key=self.qc.times_key(worker),
            window=self.qc.policy.window,
        )
        if entry_id is not None:
            self.settler.added()
        # questions this request (or a dead attempt of its key) answered first, each once
        first: set[str] = set()
        accepted = 0
        for (oid, _, _), code in zip(answers, codes, strict=True):
            if oid not in first:
                first.add(oid)
                accepted += code in (1, 2)
        duplicates = len(answers) - accepted
        if lease["kind"] == "qualification" and entry_id is not None:
            fresh = [a for a, code in zip(answers, codes, strict=True) if code == 1]
            entry = InboxEntry(
                entry_id, lease_id, vendor_id, worker_id, lease["campaign"], now, tuple(fresh)
            )
            try:
                self._apply(entry)  # the settler applies it again: a no-op
            except Poison as exc:
                raise Invalid(str(exc)) from None
        status = self.qc.status(worker)
        ANSWERS.labels(vendor_id).inc(accepted)
        for hook in self.submitted_hooks:
            hook(vendor_id, lease_id)
        log.info(
            "answers",
            extra={
                "vendor": vendor_id,
                "lease_id": lease_id,
                "accepted": accepted,
                "duplicates": duplicates,
                "worker_status": status,
            },
        )
        return {
            "lease_id": lease_id,
            "accepted": accepted,
            "duplicates": duplicates,
            "worker_status": status,
        }

    def settle_pending(self) -> int:
        """Apply every answer marked so far that no live settler holds (see
        :meth:`Settler.settle_pending`): tests call it to see an answer's effects, shutdown to
        leave nothing behind.  Returns the inbox entries applied."""
        return self.settler.settle_pending()

    def start_settler(self) -> Callable[[], None]:
        """Run the settler thread; returns the function that stops it (after a last pass)."""
        return self.settler.start(linger_s=self.settings.settle_linger_s)

    def _apply(self, entry: InboxEntry) -> None:
        """Apply one inbox entry (the settler, and the request path of a qualification
        lease): score gold, cast votes, keep qualification answers (and decide the test once
        all are in), review the worker's suspension, tally, settle the pool (which queues
        decided labels) and forward.  Every step keeps its first write, so applying an entry
        again (a settler that died before acknowledging it) changes nothing.  Raises
        :class:`Poison` for an entry that can never be applied."""
        rec = self.leases.record(entry.lease_id)
        if rec is None:
            raise Poison("the lease's record is gone (retention passed)")
        refs: dict[str, list[str]] = rec["refs"]
        worker, campaign = entry.worker, entry.campaign
        qualification: dict[str, bool] = {}
        golds: list[tuple[str, bool, int]] = []
        votes: list[tuple[str, bool]] = []
        for oid, label, ms in entry.answers:
            if oid not in refs:
                raise Poison("an answer to a question not in its lease")
            kind, ref = refs[oid]
            if kind == "r":
                votes.append((ref, label))
            elif kind == "g":
                golds.append((ref, label, ms))
            else:
                qualification[ref] = label
        self.qc.refresh_median(worker)
        try:
            if qualification:
                self.leases.keep_qualification_answers(entry.lease_id, qualification)
                self._finish_qualification(entry.lease_id, worker, refs)
            if golds:
                self.qc.score_golds(worker, golds, stats_key=keys.stats(campaign))
        except QualityError as exc:
            raise Poison(str(exc)) from None
        cast = self.qc.cast_votes(worker, votes, at=entry.at) if votes else {}
        state, newly_suspended = self.qc.review_suspends(worker)
        # Tally after the votes are in and release the worker's hold in the same Redis step,
        # so no claim sees the slot free before the vote counts.
        tally = self.qc.tally(
            {qid: vs for qid, (_, vs) in cast.items()},
            {worker: state},
            policy=self.campaigns.policy(campaign),
        )
        self.pool.settle(worker, tally)
        decided = sum(label is not None for _, label in tally.values())
        if newly_suspended:
            # Its recent votes no longer count: their questions need others.  (Re-applying
            # this entry does not sweep again; the expiry loop's periodic sweep covers a
            # settler that died in between.)
            self.sweep()
        forwarded = self.forwarder.forward(decided)
        log.debug(
            "answers applied",
            extra={
                "lease_id": entry.lease_id,
                "answers": len(entry.answers),
                "decided": decided,
                "forwarded": forwarded,
            },
        )

    def _finish_qualification(self, lease_id: str, worker: str, refs: dict[str, Any]) -> None:
        """Decide the worker's qualification once every question of the lease is answered and
        every answer kept; until another request's answers are applied (out of order, after a
        crash), the test waits for them."""
        if not self.leases.answered(lease_id) >= set(refs):
            return
        kept = self.leases.qualification_answers(lease_id)
        if len(kept) < len(refs):
            return  # answers marked by another request, not applied yet: its entry decides
        self.qc.submit_qualification(worker, kept)  # decided once: a re-run returns it

    def start_forwarder(self) -> Callable[[], None]:
        """Run the forwarder's relay thread; returns the function that stops it (after
        sending what is queued)."""
        return self.forwarder.start()

    # ------------------------------------------------------------------ expiry, progress
    def expire_leases(self) -> list[dict[str, str]]:
        """Leases past their deadline: their unanswered questions are free again.  Returns
        what expired (for the vendors' "lease.expired" callbacks); call
        :meth:`finish_expired` with their ids once the callbacks are queued (until then a
        crash leaves them to be expired again, see :meth:`Leases.take_expired`)."""
        self.pool.purge()  # decided questions' views no lease can show any more
        out = []
        for lease_id, rec in self.leases.take_expired(self.clock()):
            refs = rec["refs"]
            answered = self.leases.answered(lease_id)
            self.pool.release(
                rec["campaign"],
                f"{rec['vendor']}:{rec['worker']}",
                [ref for oid, (code, ref) in refs.items() if code == "r" and oid not in answered],
            )
            out.append(
                {
                    "lease_id": lease_id,
                    "vendor": rec["vendor"],
                    "worker_id": rec["worker"],
                    "unanswered": str(len(set(refs) - answered)),
                }
            )
        return out

    def finish_expired(self, expired: list[dict[str, str]]) -> None:
        """The expiries :meth:`expire_leases` returned are complete (callbacks queued)."""
        self.leases.finish_expired(e["lease_id"] for e in expired)

    def retry_forward(self) -> int:
        """Inline forwarding only: send the labels whose own request could not (search was
        down or refused them); the expiry loop calls this.  (The relay retries by itself.)"""
        return self.forwarder.retry() if self.forwarder.retry_due() else 0

    def sweep(self) -> int:
        """Re-tally open questions that nobody holds and that are not claimable: a suspended
        worker's discounted votes leave them short, and a call cut off half-way can leave
        one out of ``ready``.  Runs when a worker is suspended and now and then from the
        expiry loop; O(open questions).  Returns the questions re-tallied."""
        n = decided = 0
        now = self.clock()
        for campaign in self.pool.campaigns():
            for qids in self.pool.unheld(campaign, now):
                tally = self.qc.tally_many(qids, self.campaigns.policy(campaign))
                self.pool.settle("", tally)
                decided += sum(label is not None for _, label in tally.values())
                n += len(qids)
        self.forwarder.forward(decided)
        return n

    def progress(self, campaign: str) -> dict[str, Any]:
        """Per class of ``campaign``: clusters and masks (search's), questions answered and
        their estimated human hours and cost (``redundancy`` answers a question); the
        gateway's own answer counts."""
        resp = self.search.progress(campaign)
        stats = self.leases.stats(campaign)
        sec, wage = self.settings.seconds_per_question, self.settings.hourly_wage
        redundancy = self.campaigns.policy(campaign).redundancy  # answers a question
        classes = []
        for c in resp.classes:
            hours = human_hours(c.questions * redundancy, sec)
            classes.append(
                {
                    "class_id": c.class_id,
                    "class_name": c.class_name,
                    "clusters_accepted": c.clusters_accepted,
                    "clusters_rejected": c.clusters_rejected,
                    "clusters_open": c.open_clusters,
                    "masks": c.masks,
                    "masks_obtained": c.accepted_masks,
                    "masks_undecided": c.undecided_masks,
                    "questions_answered": c.questions,
                    "estimated_hours": hours,
                    "estimated_cost_usd": cost_usd(hours, wage),
                }
            )
        worker_answers = stats.get("answers", 0)
        worker_hours = human_hours(worker_answers, sec)
        return {
            "campaign": campaign,
            "done": resp.done,
            "classes": classes,
            "worker_answers": worker_answers,
            # the campaign's gold count is not shown: it would tell a vendor which of its
            # answers were gold (issue #18); operators read stats:<campaign> in Redis
            "gold_answers": 0,
            "worker_hours": worker_hours,
            "worker_cost_usd": cost_usd(worker_hours, wage),
        }
