"""Quality control's rules (maskprop_gateway.qc_rules): pure functions, no Redis."""

from __future__ import annotations

import doctest

import pytest
from maskprop_gateway import qc_rules
from maskprop_gateway.qc_rules import (
    GoldItem,
    QualityPolicy,
    WorkerState,
    counted_votes,
    decide,
    fast_share,
    gold_correct,
    gold_due,
    missing_votes,
    qualification_outcome,
    reliability,
    suspension_reasons,
    vote_weight,
    worker_state,
)


def state(worker: str, *, right: int = 0, of: int = 0, **record: str) -> WorkerState:
    window = [1] * right + [0] * (of - right)
    return worker_state(worker, record, window, [], None, QualityPolicy())


def test_the_module_examples_hold():
    assert doctest.testmod(qc_rules).failed == 0


def test_vote_weight_is_the_log_odds_floored_above_zero():
    assert vote_weight(0.5) == qc_rules.MIN_WEIGHT  # a coin flip weighs (almost) nothing
    assert vote_weight(0.1) == qc_rules.MIN_WEIGHT  # worse than chance too, never negative
    assert vote_weight(0.9) == pytest.approx(2.1972, abs=1e-4)  # log(9)


def test_reliability_is_the_beta_smoothed_gold_accuracy():
    p = QualityPolicy()
    assert reliability(0, 0, p) == pytest.approx(0.8)  # the Beta(4, 1) prior
    assert reliability(10, 10, p) == pytest.approx(14 / 15)
    assert reliability(5, 10, p) == pytest.approx(9 / 15)


def test_worker_state_reads_qualification_and_suspension_from_the_record():
    p = QualityPolicy()
    assert worker_state("w", {}, [], [], None, p).qualification == "required"
    assert worker_state("w", {}, [], [], None, QualityPolicy(qualification_size=0)).can_work
    assert worker_state("w", {"qual_ids": "[]"}, [], [], None, p).qualification == "in_progress"
    st = worker_state("w", {"qual_result": "failed"}, [], [], None, p)
    assert st.qualification == "failed" and not st.can_work
    st = worker_state(
        "w",
        {"qual_result": "passed", "suspended_at": "5.0", "suspended_reason": "accuracy"},
        [1, 0, 1, 1],
        [1000.0, 200.0],
        1500.0,
        p,
    )
    assert st.suspended and st.suspended_at == 5.0 and not st.can_work
    assert st.gold_accuracy == 0.75 and st.fast_share == 0.5 and st.recent_times == 2


def test_too_fast_is_below_a_fraction_of_the_crowd_median():
    assert fast_share([], 1500.0, 0.5) is None
    assert fast_share([100.0], None, 0.5) is None
    assert fast_share([100.0, 700.0, 800.0, 2000.0], 1500.0, 0.5) == 0.5  # 100 and 700 < 750


def test_suspension_needs_enough_evidence_and_names_its_reasons():
    p = QualityPolicy(min_gold=8, min_accuracy=0.7, max_fast_share=0.3)
    few = worker_state("w", {"gold_total": "5"}, [0] * 5, [], None, p)
    assert suspension_reasons(few, p) == []  # 0 % right, but only 5 gold answers
    bad = worker_state("w", {"gold_total": "10"}, [1] * 6 + [0] * 4, [], None, p)
    assert suspension_reasons(bad, p) == ["accuracy"]  # 60 %
    fast = worker_state("w", {"gold_total": "10"}, [1] * 10, [100.0] * 8, 1500.0, p)
    assert suspension_reasons(fast, p) == ["too_fast"]
    both = worker_state("w", {"gold_total": "10"}, [0] * 10, [100.0] * 8, 1500.0, p)
    assert suspension_reasons(both, p) == ["accuracy", "too_fast"]


def test_gold_scoring_and_qualification_pass_mark():
    items = [GoldItem(f"g{i}", "c", "cat", "i", 4, 4, b"0g0", i % 2 == 0) for i in range(10)]
    assert gold_correct([True, True], items[:2]) == [True, False]
    p = QualityPolicy(qualification_pass=0.8)
    assert qualification_outcome({g.gold_id: g.answer for g in items}, items, p) == ("passed", 10)
    eight = {g.gold_id: (g.answer if i >= 2 else not g.answer) for i, g in enumerate(items)}
    assert qualification_outcome(eight, items, p) == ("passed", 8)  # exactly the pass mark
    seven = {g.gold_id: (g.answer if i >= 3 else not g.answer) for i, g in enumerate(items)}
    assert qualification_outcome(seven, items, p) == ("failed", 7)


def test_hidden_gold_slots_are_a_reproducible_share():
    slots = gold_due(7, "v:w", range(1, 4001), 0.05)
    assert 0.04 <= sum(slots) / 4000 <= 0.06
    assert gold_due(7, "v:w", range(1, 4001), 0.05) == slots
    assert gold_due(7, "v:w2", range(1, 4001), 0.05) != slots
    assert gold_due(7, "v:w", range(101, 201), 0.05) == slots[100:200]  # counted per worker


def test_votes_of_failed_and_lately_suspended_workers_do_not_count():
    p = QualityPolicy(discount_window_s=3600)
    states = {
        "ok": state("ok", qual_result="passed"),
        "failed": state("failed", qual_result="failed"),
        "late": state("late", qual_result="passed", suspended_at="10000"),
    }
    votes = {"ok": (True, 0.0), "failed": (True, 0.0), "late": (False, 9000.0)}
    assert counted_votes(votes, states, p) == {"ok": True}
    early = {"ok": (True, 0.0), "late": (False, 6000.0)}  # cast 4000 s before the suspension
    assert counted_votes(early, states, p) == {"ok": True, "late": False}


def test_dynamic_redundancy_asks_more_on_disagreement_then_the_weighted_vote_decides():
    p = QualityPolicy(redundancy=3)  # vote cap 5
    good = {w: state(w, right=30, of=30) for w in ("h1", "h2")}
    coin = {w: state(w, right=15, of=30) for w in ("r1", "r2", "r3")}
    states = {**good, **coin}
    agreed = {"h1": True, "r1": True, "r2": True}
    assert missing_votes(agreed, p) == 0 and decide("q", agreed, states, p) is True
    two = {"h1": True, "r1": True}
    assert missing_votes(two, p) == 1 and decide("q", two, states, p) is None
    split = {"h1": True, "r1": False, "r2": False}
    assert missing_votes(split, p) == 2 and decide("q", split, states, p) is None
    five = {**split, "h2": True, "r3": False}
    # three coin-flippers against two reliable workers: the reliable side wins
    assert missing_votes(five, p) == 0 and decide("q", five, states, p) is True


def test_an_exact_tie_never_accepts_a_mask():
    p = QualityPolicy(redundancy=2, max_redundancy=2)
    states = {w: state(w, right=20, of=20) for w in ("a", "b")}
    assert decide("q", {"a": True, "b": False}, states, p) is False
