"""Worker quality control (maskprop_gateway.quality) over fakeredis, with a simulated crowd,
through the calls the gateway makes (next_golds, record_answer_times, score_golds,
review_suspends, cast_votes, tally)."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from maskprop_gateway import keys
from maskprop_gateway.qc_rules import GoldItem, GoldQuestion, QualityPolicy, WorkerState
from maskprop_gateway.quality import (
    NotEnoughGold,
    QualificationError,
    QualityControl,
    UnknownGold,
)

CAMPAIGN = "c1"


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_gold(n: int, campaign: str = CAMPAIGN) -> list[GoldItem]:
    # Half "yes", half "no", so an always-"yes" bot is right about half the time.
    return [
        GoldItem(f"{campaign}-g{i:03d}", campaign, "cat", f"img{i}", 4, 6, b"0;8;4", i % 2 == 0)
        for i in range(n)
    ]


def make_qc(n_gold: int, **policy: Any) -> tuple[QualityControl, dict[str, bool], Clock]:
    clock = Clock()
    qc = QualityControl(fakeredis.FakeRedis(), QualityPolicy(**policy), clock=clock, seed=7)
    items = make_gold(n_gold)
    assert qc.import_gold(items) == n_gold
    return qc, {g.gold_id: g.answer for g in items}, clock


def next_gold(qc: QualityControl, campaign: str, worker: str) -> GoldQuestion | None:
    got = qc.next_golds(campaign, worker, 1)
    return got[0] if got else None


def score_gold(qc: QualityControl, worker: str, gold_id: str, answer: bool, ms: int) -> bool:
    return qc.score_golds(worker, [(gold_id, answer, ms)])[0]


def review(qc: QualityControl, worker: str) -> WorkerState:
    return qc.review_suspends(worker)[0]


def can_work(qc: QualityControl, worker: str) -> bool:
    return qc.standing(worker).can_work


def gold_count(qc: QualityControl, campaign: str) -> int:
    return int(qc.r.scard(keys.campaign_gold(campaign)))


def vote(qc: QualityControl, question_id: str, worker: str, label: bool) -> bool:
    """Cast one vote as the gateway does; whether it is the worker's first on the question."""
    return qc.cast_votes(worker, [(question_id, label)])[question_id][0]


def needs_more_votes(qc: QualityControl, question_id: str) -> int:
    return qc.tally_many([question_id])[question_id][0]


def aggregate(qc: QualityControl, question_id: str) -> bool | None:
    return qc.tally_many([question_id])[question_id][1]


def answer_gold(
    qc: QualityControl,
    truth: dict[str, bool],
    worker: str,
    rng: random.Random,
    *,
    accuracy: float,
    ms: Callable[[random.Random], float],
    always: bool | None = None,
) -> None:
    g = next_gold(qc, CAMPAIGN, worker)
    assert g is not None
    right = truth[g.gold_id]
    if always is not None:
        ans = always
    else:
        ans = right if rng.random() < accuracy else not right
    elapsed_ms = int(ms(rng))
    qc.record_answer_times(worker, [elapsed_ms])  # every answer, gold included (as the gateway)
    qc.score_golds(worker, [(g.gold_id, ans, elapsed_ms)])


HONEST: dict[str, Any] = {"accuracy": 0.95, "ms": lambda rng: rng.gauss(1500, 200)}
RANDOM: dict[str, Any] = {"accuracy": 0.5, "ms": lambda rng: rng.gauss(1500, 300)}
BOT: dict[str, Any] = {"accuracy": 0.0, "ms": lambda rng: 200, "always": True}
FAST_EXPERT: dict[str, Any] = {"accuracy": 1.0, "ms": lambda rng: rng.gauss(400, 50)}


def run_crowd(
    qc: QualityControl, truth: dict[str, bool], crowd: dict[str, dict[str, Any]], rounds: int
) -> None:
    """Round-robin gold answers (with a review after each, as the gateway does)."""
    rng = random.Random(3)
    for _ in range(rounds):
        for worker, kind in crowd.items():
            if qc.state(worker).suspended:
                continue
            answer_gold(qc, truth, worker, rng, **kind)
            review(qc, worker)


# ---------------------------------------------------------------------- gold pool


def test_import_is_idempotent_and_counts_per_campaign():
    qc, _, _ = make_qc(12)
    assert qc.import_gold(make_gold(12)) == 0
    assert qc.import_gold(make_gold(3, campaign="c2")) == 3
    assert gold_count(qc, CAMPAIGN) == 12 and gold_count(qc, "c2") == 3


def test_gold_never_repeats_to_a_worker_and_runs_out():
    qc, _, _ = make_qc(20, gold_exposure=2)  # (default: as often as a real question, once)
    served = [next_gold(qc, CAMPAIGN, "v1:w1") for _ in range(20)]
    ids = [g.gold_id for g in served if g is not None]
    assert len(set(ids)) == 20
    assert next_gold(qc, CAMPAIGN, "v1:w1") is None
    assert next_gold(qc, CAMPAIGN, "v1:w2") is not None  # another worker has their own pool
    with pytest.raises(UnknownGold):
        score_gold(qc, "v1:w3", ids[0], True, 1000)  # never served to w3


@pytest.mark.parametrize("redundancy", [1, 3])
def test_hidden_gold_repeats_across_workers_no_more_than_a_real_question(redundancy):
    """Issue #18: hidden gold was drawn uniformly for each worker, so with many workers an item
    repeated far more often than a real question (shown to ``vote_cap`` workers at most), and
    colluding workers could tell gold by repetition.  Items are now drawn least shown first,
    each shown to at most ``gold_cap`` workers (default: ``vote_cap``)."""
    qc, _, _ = make_qc(30, redundancy=redundancy)
    cap = qc.policy.gold_cap
    assert cap == qc.policy.vote_cap
    shown: dict[str, int] = {}
    for w in range(200):
        for g in qc.next_golds(CAMPAIGN, f"v1:w{w}", 2):
            shown[g.gold_id] = shown.get(g.gold_id, 0) + 1
    assert max(shown.values()) == cap and len(shown) == 30  # every item used, none beyond cap
    assert sum(shown.values()) == 30 * cap and qc.gold_left(CAMPAIGN) == 0
    assert qc.next_golds(CAMPAIGN, "v1:new", 2) == []  # exhausted: import more
    qc.import_gold(make_gold(32)[30:])
    assert len(qc.next_golds(CAMPAIGN, "v1:new", 2)) == 2


def test_qualification_items_never_become_hidden_gold_and_shown_gold_never_qualifies():
    """A qualification test shows its items openly as gold: one later hidden among a colluding
    worker's real questions would be recognised.  The roles never mix."""
    qc, _, _ = make_qc(30, qualification_size=10, gold_exposure=5)
    hidden = {g.gold_id for g in qc.next_golds(CAMPAIGN, "v1:a", 5)}
    qual = {g.gold_id for w in ("v1:b", "v1:c") for g in qc.qualification_questions(CAMPAIGN, w)}
    assert not hidden & qual
    later = {g.gold_id for w in range(40) for g in qc.next_golds(CAMPAIGN, f"v1:x{w}", 3)}
    assert later and not later & qual


def test_gold_due_rate_and_determinism():
    qc, _, _ = make_qc(1)
    draws = [d for _ in range(20) for d in qc.gold_due_many("v1:w1", 100)]
    assert 0.035 <= sum(draws) / 2000 <= 0.065  # gold_share 0.05, sd ~0.005
    again = QualityControl(fakeredis.FakeRedis(), QualityPolicy(), seed=7)
    assert again.gold_due_many("v1:w1", 2000) == draws
    assert again.gold_due_many("v1:w2", 2000) != draws


def test_gold_answers_never_leave_the_module(caplog):
    caplog.set_level(logging.DEBUG)
    qc, truth, _ = make_qc(60)
    assert "answer" not in repr(make_gold(1)[0])
    questions = qc.qualification_questions(CAMPAIGN, "v1:w1")
    assert questions and not any(hasattr(q, "answer") for q in questions)
    qc.submit_qualification("v1:w1", {q.gold_id: truth[q.gold_id] for q in questions})
    g = next_gold(qc, CAMPAIGN, "v1:w1")
    assert g is not None and not hasattr(g, "answer")
    run_crowd(qc, truth, {"v1:bot": BOT, "v1:ok": HONEST}, rounds=12)
    assert qc.state("v1:bot").suspended
    fields = {f.name for f in dataclasses.fields(qc.state("v1:bot"))}
    assert not any("answer" in f and f != "gold_answers" for f in fields)
    assert caplog.records  # qualification and suspension were logged...
    standard = set(logging.makeLogRecord({}).__dict__)
    for rec in caplog.records:
        extras = {k: v for k, v in rec.__dict__.items() if k not in standard}
        assert not any("answer" in k for k in extras)
        text = rec.getMessage() + repr(extras)
        assert not any(gid in text for gid in truth)  # ...without naming a gold item


# ---------------------------------------------------------------------- qualification


def test_qualification_pass_fail_and_failed_stays_failed():
    qc, truth, _ = make_qc(40)
    qs = qc.qualification_questions(CAMPAIGN, "v1:good")
    assert len(qs) == 10 and qc.state("v1:good").qualification == "in_progress"
    assert qc.qualification_questions(CAMPAIGN, "v1:good") == qs  # same set while in progress
    with pytest.raises(QualificationError):
        qc.submit_qualification("v1:good", {qs[0].gold_id: True})  # every question needed
    answers = {q.gold_id: truth[q.gold_id] for q in qs}
    for q in qs[:2]:
        answers[q.gold_id] = not answers[q.gold_id]  # 8/10 = qualification_pass
    st = qc.submit_qualification("v1:good", answers)
    assert st.qualification == "passed" and st.can_work and can_work(qc, "v1:good")
    good_qs = qs

    qs = qc.qualification_questions(CAMPAIGN, "v1:bad")
    answers = {q.gold_id: truth[q.gold_id] for q in qs}
    for q in qs[:3]:
        answers[q.gold_id] = not answers[q.gold_id]  # 7/10
    assert qc.submit_qualification("v1:bad", answers).qualification == "failed"
    perfect = {q.gold_id: truth[q.gold_id] for q in qs}
    assert qc.submit_qualification("v1:bad", perfect).qualification == "failed"  # no retake
    with pytest.raises(QualificationError):
        qc.qualification_questions(CAMPAIGN, "v1:bad")
    assert not can_work(qc, "v1:bad")
    # Qualification items (anyone's, issue #18: they were shown openly as gold) are never
    # served as hidden gold.
    used = {q.gold_id for q in (*good_qs, *qs)}
    rest = {g.gold_id for _ in range(40) if (g := next_gold(qc, CAMPAIGN, "v1:bad"))}
    assert len(rest) == 40 - len(used) and rest.isdisjoint(used)


def test_qualification_needs_enough_unseen_gold():
    qc, _, _ = make_qc(5)
    with pytest.raises(NotEnoughGold):
        qc.qualification_questions(CAMPAIGN, "v1:w1")
    with pytest.raises(QualificationError):
        qc.submit_qualification("v1:w1", {})


# ---------------------------------------------------------------------- suspension


def test_suspension_of_random_clicker_bot_and_fast_worker_but_not_honest_crowd():
    qc, truth, _ = make_qc(80, gold_exposure=9)  # 9 workers draw 360 items from 80
    honest = {f"v1:h{i}": HONEST for i in range(6)}
    crowd = {**honest, "v1:random": RANDOM, "v2:bot": BOT, "v2:fast": FAST_EXPERT}
    run_crowd(qc, truth, crowd, rounds=4)  # fewer than min_gold answers: nobody suspended yet
    assert not any(qc.state(w).suspended for w in crowd)
    run_crowd(qc, truth, crowd, rounds=36)
    for w in honest:
        st = qc.state(w)
        assert not st.suspended and st.fast_share == 0.0 and (st.gold_accuracy or 0) >= 0.8, st
    rnd, bot, fast = qc.state("v1:random"), qc.state("v2:bot"), qc.state("v2:fast")
    assert rnd.suspended and rnd.suspension_reason == "accuracy", rnd
    assert bot.suspended and "too_fast" in (bot.suspension_reason or ""), bot
    assert fast.suspended and fast.suspension_reason == "too_fast", fast
    # Sticky: a suspended worker who then answers well stays suspended.
    for _ in range(20):
        answer_gold(qc, truth, "v1:random", random.Random(0), accuracy=1.0, ms=lambda r: 1500)
    assert review(qc, "v1:random").suspended


def test_reliability_orders_honest_above_new_above_random():
    qc, truth, _ = make_qc(40)
    run_crowd(qc, truth, {"v1:h": HONEST, "v1:r": RANDOM}, rounds=30)
    h, r, new = (qc.state(w).reliability for w in ("v1:h", "v1:r", "v1:new"))
    assert new == pytest.approx(0.8)  # the Beta(4, 1) prior
    assert h > new > r


# ---------------------------------------------------------------------- votes


def trained(
    redundancy: int = 3, max_redundancy: int | None = 3
) -> tuple[QualityControl, dict[str, bool], Clock]:
    """Two honest workers and a random clicker with 30 gold answers each, not yet reviewed.
    ``max_redundancy`` 3: no dynamic overlap, so the weighted vote decides at 3 votes."""
    qc, truth, clock = make_qc(40, redundancy=redundancy, max_redundancy=max_redundancy)
    rng = random.Random(5)
    for _ in range(30):
        for w, kind in (("v1:h1", HONEST), ("v1:h2", HONEST), ("v1:r", RANDOM)):
            answer_gold(qc, truth, w, rng, **kind)
    return qc, truth, clock


def test_two_honest_outvote_one_random_and_weights_beat_counts():
    qc, _, _ = trained()
    vote(qc, "q1", "v1:h1", True)
    assert aggregate(qc, "q1") is None and needs_more_votes(qc, "q1") == 2
    vote(qc, "q1", "v1:r", False)
    vote(qc, "q1", "v1:h2", True)
    assert needs_more_votes(qc, "q1") == 0
    assert aggregate(qc, "q1") is True
    # One reliable worker against a ~50% clicker and a newcomer (prior 0.8): a plain majority
    # says yes; log-odds weights (~2.5 vs ~0.2 + 1.4) side with the reliable worker.
    vote(qc, "q2", "v1:h1", False)
    vote(qc, "q2", "v1:r", True)
    vote(qc, "q2", "v1:new", True)
    assert qc.state("v1:h1").reliability > 0.85
    assert aggregate(qc, "q2") is False


def test_disagreement_asks_more_workers_before_the_weighted_vote():
    qc, _, _ = trained(max_redundancy=None)  # default cap: 2 x 3 - 1 = 5
    for w in ("v1:h1", "v1:h2", "v1:new"):
        vote(qc, "q1", w, True)
    assert needs_more_votes(qc, "q1") == 0 and aggregate(qc, "q1") is True  # agreed at 3
    vote(qc, "q2", "v1:h1", True)
    vote(qc, "q2", "v1:r", False)
    vote(qc, "q2", "v1:new", False)
    assert aggregate(qc, "q2") is None and needs_more_votes(qc, "q2") == 2  # disagreed at 3
    vote(qc, "q2", "v1:h2", True)
    assert aggregate(qc, "q2") is None and needs_more_votes(qc, "q2") == 1
    vote(qc, "q2", "v1:late", True)
    assert needs_more_votes(qc, "q2") == 0 and aggregate(qc, "q2") is True  # 5 votes: weighted


def test_duplicate_vote_is_ignored():
    qc, _, _ = trained()
    assert vote(qc, "q1", "v1:h1", True) is True
    assert vote(qc, "q1", "v1:h1", False) is False
    assert needs_more_votes(qc, "q1") == 2
    vote(qc, "q1", "v1:h2", True)
    vote(qc, "q1", "v1:r", False)
    assert aggregate(qc, "q1") is True


def test_votes_of_a_worker_suspended_after_voting_are_discounted():
    qc, truth, clock = trained()
    rng = random.Random(1)
    vote(qc, "q1", "v1:h1", True)
    vote(qc, "q1", "v1:h2", True)
    vote(qc, "q1", "v3:late", False)  # looks fine when voting (no gold yet)
    vote(qc, "q2", "v1:r", True)  # cast long before the clicker's suspension
    assert needs_more_votes(qc, "q1") == 0 and aggregate(qc, "q1") is True
    clock.t += 600
    for _ in range(10):
        answer_gold(qc, truth, "v3:late", rng, accuracy=0.0, ms=lambda r: 1500)
    assert review(qc, "v3:late").suspended
    assert needs_more_votes(qc, "q1") == 1 and aggregate(qc, "q1") is None
    vote(qc, "q1", "v1:r", False)
    assert needs_more_votes(qc, "q1") == 0 and aggregate(qc, "q1") is True
    clock.t += 2 * 3600
    assert review(qc, "v1:r").suspended  # accuracy ~0.5
    assert needs_more_votes(qc, "q2") == 2  # its q2 vote was 2 h 10 min before: still counted
    assert needs_more_votes(qc, "q1") == 0  # ...and so is its q1 vote (2 h before)


def test_a_large_crowds_median_time_is_reused_briefly_a_small_ones_never():
    r = fakeredis.FakeRedis()
    qc = QualityControl(r, QualityPolicy())
    key = keys.MEDIANS
    r.hset(key, mapping={f"v:w{i}": 1500.0 for i in range(10)})
    assert qc._crowd_median_ms() == 1500.0
    r.hset(key, mapping={f"v:w{i}": 900.0 for i in range(10)})
    assert qc._crowd_median_ms() == 900.0  # small crowd: read every time
    n = QualityControl.CROWD_MEDIAN_CACHE_FROM
    r.hset(key, mapping={f"v:w{i}": 1200.0 for i in range(n)})
    assert qc._crowd_median_ms() == 1200.0
    r.hset(key, mapping={f"v:w{i}": 600.0 for i in range(n)})
    assert qc._crowd_median_ms() == 1200.0  # large crowd: reused within the TTL
    qc.CROWD_MEDIAN_TTL_S = 0.0
    assert qc._crowd_median_ms() == 600.0
