"""The gateway's domain logic, free of HTTP: leases of questions for a vendor's worker, answers
with quality control, aggregation and forwarding to the search service.

Redis keys (prefix ``maskprop:gw:``):

* the question pool (``{campaign}:items``, ``:open``, ``:ready``, ``want``, per-question
  holders and seen-by): see :mod:`maskprop_gateway.pool`;
* ``lease:{id}`` hash (vendor, worker, campaign, kind, created, expires, ``refs``: JSON
  opaque id -> [kind, gold or question id], kind ``q`` qualification, ``g``
  hidden gold, ``r`` real), ``lease:{id}:views`` hash opaque id -> view
  (:mod:`maskprop_gateway.views`; read only by the image and overlay routes) and
  ``lease:{id}:answered`` set: one answer per (lease, question, worker).  Records of the
  previous version (``items``: JSON opaque id -> kind, ref and view) are still read;
* ``forward`` hash question id -> ``"<0|1>:<decided at>"``, an aggregated label not yet
  acknowledged by search (retried, so a search outage loses nothing);
* ``stats:{campaign}`` hash of counters (answers, gold answers).

Questions handed to vendors carry opaque ids (``q_<random>``) so a hidden gold question looks
exactly like a real one; gold answers never leave this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from maskprop_gateway import views
from maskprop_gateway.auth import WorkerClaims
from maskprop_gateway.metrics import ANSWERS, BLOCKED
from maskprop_gateway.pool import QuestionPool
from maskprop_gateway.quality import GoldQuestion, QualityControl, QualityError, _s
from maskprop_gateway.search_client import SearchClient, SearchUnavailable
from maskprop_gateway.settings import GatewaySettings
from maskprop_gateway.views import ItemView, LeaseOffer

log = logging.getLogger(__name__)

P = "maskprop:gw:"


# KEYS: answered set, stats hash.  ARGV: ttl, then (lease question id, kind g|r|q) pairs.  One
# answer per (lease, question): which answers are new, counted in the campaign's stats.
_ANSWERED = """
local fresh, golds, out = 0, 0, {}
for i = 2, #ARGV, 2 do
  local new = redis.call('sadd', KEYS[1], ARGV[i])
  out[#out + 1] = new
  if new == 1 then
    fresh = fresh + 1
    if ARGV[i + 1] == 'g' then golds = golds + 1 end
  end
end
redis.call('expire', KEYS[1], ARGV[1])
redis.call('hincrby', KEYS[2], 'answers', fresh)
redis.call('hincrby', KEYS[2], 'gold_answers', golds)
return out
"""

# A decided answer still in the ``forward`` hash after this long lost its own request's
# forwarding (search was down or refused it): the expiry loop retries it (retry_forward).
FORWARD_RETRY_S = 5.0
#: Answers per SubmitAnswers call (the search service refuses more: search.proto).
SEARCH_MAX_ANSWERS = 1000


def _forward_time(value: Any) -> float:
    """The time a ``forward`` entry (``"<0|1>:<unix s>"``; old entries ``"0"``/``"1"``) was
    decided; old entries count as stale."""
    _, _, at = _s(value).partition(":")
    return float(at) if at else 0.0


class NotFound(Exception):
    pass


class Forbidden(Exception):
    pass


class Gone(Exception):
    pass


class Invalid(Exception):
    pass


class Gateway:
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
        self.pool = QuestionPool(redis)
        self._answered = redis.register_script(_ANSWERED)
        # called with (vendor_id, lease_id) after answers were recorded (vendor callbacks)
        self.submitted_hooks: list[Callable[[str, str], None]] = []
        # Labels this process decided, waiting for the forwarder (run_forwarder) to send
        # them to search together; unused when ``forward_linger_s`` is 0 (inline).
        self._queued: list[str] = []
        self._queued_lock = threading.Lock()
        self._queued_signal = threading.Event()
        # Top-ups from search, one at a time per campaign: the thread calling search holds
        # the campaign's lock; the event loop's leases share one task (create_lease_on_loop).
        self._refill_locks: dict[str, threading.Lock] = {}
        self._refill_tasks: dict[str, asyncio.Task[int]] = {}
        self._in_flight = 0  # labels the forwarder is sending now
        # Leases waiting on the event loop for new questions (create_lease_on_loop), woken
        # by the forwarder thread through the loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrivals: dict[str, asyncio.Event] = {}

    @property
    def record_ttl_s(self) -> int:
        """Seconds a lease's record lives from its creation (``lease_retention_s`` after its
        deadline)."""
        return int(self.settings.lease_ttl_s + self.settings.lease_retention_s) + 1

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
        """A lease of up to ``max_questions`` real questions (capped by the
        ``max_lease_questions`` setting; hidden gold comes on top), or a worker's
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
            ids = _opaque_ids(len(gold))
            for g in gold:
                oid = next(ids)
                refs[oid], shown[oid] = ("q", g.gold_id), _gold_view(g)
        else:
            kind = "work"
            real = self._take(campaign, worker, max_questions, expires, refill)
            due = self.qc.gold_due_many(worker, len(real))
            golds = self.qc.next_golds(campaign, worker, sum(due))
            hidden, ids = iter(golds), _opaque_ids(len(real) + len(golds))
            for (qid, view), gold_due in zip(real, due, strict=True):
                h = next(hidden, None) if gold_due else None
                if h is not None:
                    oid = next(ids)
                    refs[oid], shown[oid] = ("g", h.gold_id), _gold_view(h)
                oid = next(ids)
                refs[oid], shown[oid] = ("r", qid), view
        lease_id = "l_" + secrets.token_urlsafe(12)
        key, ttl = f"{P}lease:{lease_id}", self.record_ttl_s
        pipe = self.r.pipeline(transaction=True)  # a lease exists with its expiry or not at all
        pipe.hset(
            key,
            mapping={
                "vendor": vendor_id,
                "worker": worker_id,
                "campaign": campaign,
                "kind": kind,
                "created": now,
                "expires": expires,
                "refs": json.dumps(refs, separators=(",", ":")),
            },
        )
        pipe.expire(key, ttl)
        if shown:  # for the image and overlay routes, during the lease only
            pipe.hset(f"{key}:views", mapping=shown)
            pipe.expire(f"{key}:views", int(self.settings.lease_ttl_s) + 60)
        pipe.zadd(f"{P}leases", {lease_id: expires})
        pipe.execute()
        token = None
        if self.token_for is not None:
            token = self.token_for(
                WorkerClaims(vendor_id, worker_id, campaign, now + self.settings.worker_token_ttl_s)
            )
        return LeaseOffer(lease_id, kind, campaign, worker_id, expires, list(shown.items()), token)

    async def create_lease_on_loop(
        self, vendor_id: str, worker_id: str, campaign: str, max_questions: int
    ) -> LeaseOffer:
        """:meth:`create_lease` for a caller on the event loop.  Its Redis round trips run on
        the loop; topping up from search (tens of ms) runs in a thread, one call at a time per
        campaign whose result every lease waiting for it shares, and starts early, when the
        pool falls below ``refill_questions``, so leases seldom wait for it."""
        n = min(max_questions, self.settings.max_lease_questions)
        ready = self.pool.ready_count(campaign)
        if ready < self.settings.refill_questions:
            task = self._refill_tasks.get(campaign)
            if task is None or task.done():
                # refill asks for at least refill_questions
                task = asyncio.create_task(self._refill_off_loop(campaign, 2 * (n - ready)))
                self._refill_tasks[campaign] = task
            if ready < n:
                # shielded: a client that goes away must not cancel the others' top-up
                await asyncio.shield(task)
                ready = self.pool.ready_count(campaign)
        # Nothing to hand out, but answers are on their way to search and may open new
        # clusters (the forwarder tops up once search has them): wait for those a little
        # rather than send the worker away empty-handed to poll again.
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.lease_wait_s
        while ready == 0 and self.forwarding() and (left := deadline - time.monotonic()) > 0:
            arrival = self._arrivals.setdefault(campaign, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrival.wait(), left)
            ready = self.pool.ready_count(campaign)
        return self.create_lease(vendor_id, worker_id, campaign, max_questions, refill=False)

    def _announce(self, campaigns: Iterable[str]) -> None:
        """From the forwarder thread: search has new answers of ``campaigns`` and the pool
        was topped up; leases waiting on the event loop look again."""
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

    async def drain_refills(self) -> None:
        """At shutdown: let the top-ups in flight finish (their questions are in the pool)."""
        await asyncio.gather(*self._refill_tasks.values(), return_exceptions=True)
        self._refill_tasks.clear()

    async def _refill_off_loop(self, campaign: str, want: int) -> int:
        try:
            return await asyncio.to_thread(self.refill, campaign, want)
        except Exception:  # a lease gets what the pool holds; the next one tries again
            log.exception("topping up questions from search failed", extra={"campaign": campaign})
            return 0

    def _take(
        self, campaign: str, worker: str, n: int, expires: float, refill: bool = True
    ) -> list[tuple[str, str]]:
        """Up to ``n`` real questions (question id, view) this worker has not seen, claimed
        atomically (one Lua call); with ``refill``, topping up from search when the pool runs
        short."""
        redundancy = self.qc.policy.redundancy
        got = self.pool.claim(campaign, worker, n, expires, self.clock(), redundancy)
        if refill and len(got) < n and self.refill(campaign, 2 * (n - len(got))):
            got += self.pool.claim(
                campaign, worker, n - len(got), expires, self.clock(), redundancy
            )
        return got

    def refill(self, campaign: str, want: int, *, fresh: bool = False) -> int:
        """Lease up to ``want`` questions (at least ``refill_questions``, at most what one
        search call carries) from search into the pool; returns how many arrived.

        One call at a time per campaign: a thread that finds another one asking waits for
        it and returns -1 (the pool has whatever it brought), or with ``fresh`` (search's
        state changed since that call began) then asks itself.  32 workers' leases each
        asking search for their own shortfall made ~3x as many search calls, each returning
        a few dozen questions, and search pays per call for every class it locks and saves."""
        with self._queued_lock:
            lock = self._refill_locks.setdefault(campaign, threading.Lock())
        if not lock.acquire(blocking=False):
            if not fresh:
                with lock:
                    return -1
            lock.acquire()
        try:
            want = min(max(want, self.settings.refill_questions), SEARCH_MAX_ANSWERS)
            try:
                questions, _done = self.search.lease(campaign, want, "gateway")
            except SearchUnavailable:
                return 0
            self.pool.add(
                campaign,
                {
                    q.question_id: views.render(
                        q.class_name,
                        q.image_file,
                        q.rle.height,
                        q.rle.width,
                        q.rle.counts.decode("ascii"),
                    )
                    for q in questions
                },
                self.clock(),
            )
            return len(questions)
        finally:
            lock.release()

    def lease(self, vendor_id: str, lease_id: str) -> dict[str, Any]:
        """A lease's stored record (without its views); only its own vendor may see it
        (others get NotFound).  ``refs``: opaque id -> (kind, gold or question id)."""
        rec = self._record(lease_id)
        if rec is None or rec["vendor"] != vendor_id:
            raise NotFound("no such lease")
        return rec

    def _record(self, lease_id: str) -> dict[str, Any] | None:
        """A lease's stored record, whoever's it is (None once gone)."""
        fields = ("vendor", "worker", "campaign", "kind", "expires", "created", "refs", "items")
        values = self.r.hmget(f"{P}lease:{lease_id}", fields)
        rec: dict[str, Any] = {
            k: _s(v) for k, v in zip(fields, values, strict=True) if v is not None
        }
        if "vendor" not in rec:
            return None
        if "refs" in rec:
            rec["refs"] = json.loads(rec["refs"])
        else:  # a record of the previous version: full items
            codes = {"gold": "q" if rec["kind"] == "qualification" else "g", "real": "r"}
            items = json.loads(rec.pop("items", "{}"))
            rec["refs"] = {o: [codes[it["kind"]], it["ref"]] for o, it in items.items()}
        return rec

    def answered_count(self, lease_id: str) -> int:
        return int(self.r.scard(f"{P}lease:{lease_id}:answered"))

    def item_view(self, vendor_id: str, lease_id: str, oid: str) -> ItemView:
        self.lease(vendor_id, lease_id)  # the vendor's own lease, or NotFound
        view = self.r.hget(f"{P}lease:{lease_id}:views", oid)
        if view is not None:
            return views.parse(_s(view))
        # a record of the previous version keeps the views in its items
        it = json.loads(_s(self.r.hget(f"{P}lease:{lease_id}", "items") or b"{}")).get(oid)
        if it is None:
            raise NotFound("no such question in this lease")
        return ItemView(
            it["class_name"], it["image_file"], it["rle_h"], it["rle_w"], it["rle_counts"].encode()
        )

    # ------------------------------------------------------------------ answers
    def submit(
        self,
        vendor_id: str,
        lease_id: str,
        worker_id: str,
        answers: list[tuple[str, bool, int]],
    ) -> dict[str, Any]:
        lease = self.lease(vendor_id, lease_id)
        if lease["worker"] != worker_id:
            raise Forbidden("this lease belongs to another worker")
        if float(lease["expires"]) < self.clock():
            raise Gone("lease expired; its questions went back to the pool")
        refs: dict[str, list[str]] = lease["refs"]
        unknown = [oid for oid, _, _ in answers if oid not in refs]
        if unknown:
            raise Invalid(f"questions not in this lease: {unknown[:3]}")
        worker = f"{vendor_id}:{worker_id}"
        campaign = lease["campaign"]

        args: list[Any] = [self.record_ttl_s]
        for oid, _, _ in answers:
            args += (oid, refs[oid][0])
        new = self._answered(
            keys=[f"{P}lease:{lease_id}:answered", f"{P}stats:{campaign}"], args=args
        )
        fresh = [a for a, n in zip(answers, new, strict=True) if n]
        accepted, duplicates = len(fresh), len(answers) - len(fresh)
        qualification: dict[str, bool] = {}
        golds: list[tuple[str, bool, int]] = []
        votes: list[tuple[str, bool]] = []
        for oid, label, ms in fresh:
            code, ref = refs[oid]
            if code == "r":
                votes.append((ref, label))
            elif code == "g":
                golds.append((ref, label, ms))
            else:
                qualification[ref] = label
        if qualification:
            self.r.hset(
                f"{P}lease:{lease_id}:qual",
                mapping={g: "1" if v else "0" for g, v in qualification.items()},
            )
        self.qc.record_answer_times(worker, [ms for _, _, ms in fresh])
        self.qc.score_golds(worker, golds)
        cast = self.qc.cast_votes(worker, votes)
        if qualification:
            try:
                self._finish_qualification(lease_id, worker, refs)
            except QualityError as exc:
                raise Invalid(str(exc)) from None
        state, newly_suspended = self.qc.review_suspends(worker)
        # Tally after the votes are in and release the worker's hold in the same Redis step,
        # so no claim sees the slot free before the vote counts.
        tally = self.qc.tally({qid: vs for qid, (_, vs) in cast.items()}, {worker: state})
        self.pool.settle(worker, tally, self.clock())
        ready = [qid for qid, (_, label) in tally.items() if label is not None]
        if newly_suspended:
            self.sweep()  # its recent votes no longer count: their questions need others
        forwarded = self._forward(ready)
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
                "forwarded": forwarded,
                "worker_suspended": state.suspended,
            },
        )
        return {
            "lease_id": lease_id,
            "accepted": accepted,
            "duplicates": duplicates,
            "forwarded_to_search": forwarded,
            "worker_status": "suspended" if state.suspended else state.qualification,
        }

    def _finish_qualification(self, lease_id: str, worker: str, refs: dict[str, Any]) -> None:
        answered = {m.decode() for m in self.r.smembers(f"{P}lease:{lease_id}:answered")}
        if answered >= set(refs):
            stored = self.r.hgetall(f"{P}lease:{lease_id}:qual")
            merged = {k.decode(): v == b"1" for k, v in stored.items()}
            self.qc.submit_qualification(worker, merged)

    def _forward(self, qids: list[str]) -> int:
        """Labels a request decided (already durable in ``forward``): sent to search now when
        ``forward_linger_s`` is 0, else queued for the forwarder thread.  Returns how many
        were sent or queued."""
        if self.settings.forward_linger_s <= 0:
            return self._flush_forward(qids)
        if qids:
            with self._queued_lock:
                self._queued += qids
            self._queued_signal.set()
        return len(qids)

    def start_forwarder(self) -> Callable[[], None]:
        """Run :meth:`run_forwarder` in a thread; returns the function that stops it (after
        sending what is queued)."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self.run_forwarder, args=(stop,), name="forwarder", daemon=True
        )
        thread.start()

        def halt() -> None:
            stop.set()
            self._queued_signal.set()
            thread.join(30)

        return halt

    def run_forwarder(self, stop: threading.Event, idle_s: float = 1.0) -> None:
        """The forwarder thread: sends the labels requests queued, many requests' at a time
        (woken by a queued label, then lingering ``forward_linger_s`` for more), until
        ``stop``; what is queued then is sent before it returns.  Search saves each class a
        call touches once, so one call of 300 labels costs it far less than three of 100.
        A failed send leaves the labels in ``forward`` for :meth:`retry_forward`."""
        linger = self.settings.forward_linger_s
        while True:
            stopping = stop.is_set()
            if not stopping and self._queued_signal.wait(idle_s):
                stop.wait(linger)
            self._queued_signal.clear()
            with self._queued_lock:
                qids, self._queued = self._queued, []
                self._in_flight = len(qids)
            campaigns = {QuestionPool.campaign_of(q) for q in qids}
            try:
                if qids:
                    self._flush_forward(qids)
                    # Search just applied these answers, which may open new clusters: top
                    # up now, before leases find the pool dry (they would wait for it).
                    for campaign in campaigns:
                        if self.pool.ready_count(campaign) < self.settings.refill_questions:
                            self.refill(campaign, self.settings.refill_questions, fresh=True)
            except Exception:  # Redis down: the labels wait in ``forward``
                log.exception("forwarding labels failed; retried later")
            finally:
                self._in_flight = 0
                self._announce(campaigns)
            if stopping:
                return

    def forwarding(self) -> bool:
        """Whether this process has decided labels on their way to search (queued for the
        forwarder or being sent): answers that may open new questions any moment."""
        return bool(self._queued or self._in_flight)

    def _flush_forward(self, qids: list[str] | None = None, *, stale_only: bool = False) -> int:
        """Send aggregated labels to search; they stay in the ``forward`` hash until search
        acknowledged them, so a failed call is retried later.

        A request forwards the ``qids`` it decided itself; with ``stale_only``
        (:meth:`retry_forward`) only entries older than ``FORWARD_RETRY_S`` are sent, i.e.
        those whose own request failed to forward them.  Forwarding everything pending from
        every request made concurrent requests send the same answers to search over and over."""
        if qids is not None:
            if not qids:
                return 0
            values = self.r.hmget(f"{P}forward", qids)
            pending = {q: v for q, v in zip(qids, values, strict=True) if v is not None}
        else:
            raw = self.r.hgetall(f"{P}forward")
            pending = {k.decode(): v for k, v in raw.items()}
        if stale_only:
            cutoff = self.clock() - FORWARD_RETRY_S
            pending = {q: v for q, v in pending.items() if _forward_time(v) < cutoff}
        if not pending:
            return 0
        answers = [(q, _s(v).startswith("1")) for q, v in pending.items()]
        sent = 0
        for lo in range(0, len(answers), SEARCH_MAX_ANSWERS):  # search takes 1..1000 a call
            chunk = answers[lo : lo + SEARCH_MAX_ANSWERS]
            try:
                self.search.submit(chunk)
            except SearchUnavailable:
                log.warning("search unavailable; aggregated answers kept", extra={"n": len(chunk)})
                break
            except grpc.RpcError as exc:
                # The workers' answers are safe here; a failing forward must not fail their
                # request.  Kept and retried on the next call.
                log.error(
                    "search refused aggregated answers; kept for retry",
                    extra={"n": len(chunk), "code": str(exc.code()), "details": exc.details()},
                )
                break
            self.pool.done([q for q, _ in chunk], self.qc.votes_prefix)
            sent += len(chunk)
        return sent

    # ------------------------------------------------------------------ expiry, progress
    def retry_forward(self) -> int:
        """Forward decided labels whose own request could not (search was down or refused
        them) once they are ``FORWARD_RETRY_S`` old; the expiry loop calls this.  (Every lease
        used to, reading the whole ``forward`` hash each time.)"""
        return self._flush_forward(stale_only=True)

    def expire_leases(self) -> list[dict[str, str]]:
        """Leases past their deadline: their unanswered questions are free again.  Returns
        what expired (for the vendors' "lease.expired" callbacks)."""
        now = self.clock()
        out = []
        for raw in self.r.zrangebyscore(f"{P}leases", "-inf", now):
            lease_id = raw.decode()
            self.r.zrem(f"{P}leases", lease_id)
            rec = self._record(lease_id)
            if rec is None:
                continue
            refs = rec["refs"]
            answered = {m.decode() for m in self.r.smembers(f"{P}lease:{lease_id}:answered")}
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

    def sweep(self) -> int:
        """Re-tally open questions that nobody holds and that are not claimable: a suspended
        worker's discounted votes leave them short, and a call cut off half-way can leave
        one out of ``ready``.  Runs when a worker is suspended and now and then from the
        expiry loop; O(open questions).  Returns the questions re-tallied."""
        n = 0
        now = self.clock()
        decided: list[str] = []
        for campaign in self.pool.campaigns():
            for qids in self.pool.unheld(campaign, now):
                tally = self.qc.tally_many(qids)
                self.pool.settle("", tally, now)
                decided += [q for q, (_, label) in tally.items() if label is not None]
                n += len(qids)
        self._forward(decided)
        return n

    def progress(self, campaign: str) -> dict[str, Any]:
        resp = self.search.progress(campaign)
        stats = {k.decode(): int(v) for k, v in self.r.hgetall(f"{P}stats:{campaign}").items()}
        sec = self.settings.seconds_per_question
        classes = []
        for c in resp.classes:
            hours = c.questions * sec / 3600.0
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
                    "estimated_cost_usd": hours * self.settings.hourly_wage,
                }
            )
        worker_answers = stats.get("answers", 0)
        worker_hours = worker_answers * sec / 3600.0
        return {
            "campaign": campaign,
            "done": resp.done,
            "classes": classes,
            "worker_answers": worker_answers,
            "gold_answers": stats.get("gold_answers", 0),
            "worker_hours": worker_hours,
            "worker_cost_usd": worker_hours * self.settings.hourly_wage,
        }


def _opaque_ids(n: int) -> Iterator[str]:
    """``n`` random question ids (``q_`` + 72 bits, URL-safe): a lease's from one read of the
    OS's random source (one syscall per id was ~1 % of the gateway's CPU)."""
    raw = secrets.token_bytes(9 * n)
    for i in range(0, 9 * n, 9):
        yield "q_" + base64.urlsafe_b64encode(raw[i : i + 9]).decode()


def _gold_view(g: GoldQuestion) -> str:
    # A gold item's image_id is its file path under the image store root.
    counts = g.rle_counts.decode("ascii") if isinstance(g.rle_counts, bytes) else str(g.rle_counts)
    return views.render(g.class_name, g.image_id, g.rle_h, g.rle_w, counts)
