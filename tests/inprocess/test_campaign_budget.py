"""A campaign's budget and state where search hands out questions (issue #16 item 4): on
fakeredis search, no question beyond the budget (two replicas, leases of any size), none while
paused or after a stop, and status shows spent vs budget with a forecast."""

from __future__ import annotations

import json
from pathlib import Path

import fakeredis
import pytest
from maskprop_search.service import SearchSettings, build_search

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop.errors import MaskpropError
from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.ingest import budget_status, campaign_status
from tests.inprocess.conftest import Wired


def _register(redis, tmp_path: Path, pool, budget: Budget, name: str = "c1") -> CampaignRegistry:
    registry = CampaignRegistry(redis)
    registry.create(
        CampaignSpec(
            name=name, classes=tuple(pool.class_names), images_root=tmp_path,
            detector_weights=tmp_path / "d.pt", budget=budget,
        )
    )  # fmt: skip
    return registry


@pytest.fixture
def wired(tmp_path: Path, pool) -> Wired:
    redis = fakeredis.FakeRedis()
    _register(redis, tmp_path, pool, Budget(questions=137))
    w = Wired(tmp_path, pool, redis=redis)
    w.publish_pool()
    w.settle()
    assert len(w.core.classes("c1")) == len(pool.class_names)
    return w


def test_two_replicas_hand_out_exactly_the_budget(wired: Wired) -> None:
    other, _ = build_search(SearchSettings(data_dir=wired.tmp / "state"), wired.bus, wired.redis)
    handed, sizes, n = 0, [1, 7, 50, 3, 64], 0
    while True:
        core = (wired.core, other)[n % 2]
        qs, done = core.lease("c1", sizes[n % len(sizes)])
        n += 1
        handed += len(qs)
        if done:
            break
        assert qs, "an open campaign within its budget always has questions here"
        core.submit((q.question_id, bool(t)) for q, t in zip(qs, wired.truth(qs), strict=True))
    assert handed == 137
    assert wired.core.gate.leased("c1") == 137
    assert wired.core.lease("c1", 10) == ([], True)  # spent: nothing more, ever
    st = budget_status(CampaignRegistry(wired.redis), "c1")
    assert (st.question_cap, st.questions_leased) == (137, 137)
    assert st.hours_spent == pytest.approx(137 * 2.0 / 3600)
    assert st.dollars_spent == pytest.approx(st.hours_spent * 12.0)
    assert 0 < st.masks_decided <= st.masks and st.masks_accepted <= st.masks_decided
    # at the budget the forecast is the masks accepted so far
    assert st.forecast_masks_at_budget == pytest.approx(st.masks_accepted)


def test_unused_reservations_are_given_back(wired: Wired) -> None:
    # 137 reserved, but only the roots' samples (N_s per class) can be asked yet
    qs, _ = wired.core.lease("c1", 137)
    assert 0 < len(qs) < 137 and wired.core.gate.leased("c1") == len(qs)
    st = campaign_status(CampaignRegistry(wired.redis), "c1").budget
    assert st.questions_leased == len(qs) and st.forecast_masks_at_budget == 0.0  # none decided
    wired.core.submit((q.question_id, bool(t)) for q, t in zip(qs, wired.truth(qs), strict=True))
    st = budget_status(CampaignRegistry(wired.redis), "c1")
    assert st.masks_decided > 0
    expected = st.masks_accepted + st.masks_accepted / len(qs) * (137 - len(qs))
    assert st.forecast_masks_at_budget == pytest.approx(
        min(expected, st.masks - (st.masks_decided - st.masks_accepted))
    )


def test_paused_and_stopped_campaigns_get_no_questions(wired: Wired) -> None:
    registry = CampaignRegistry(wired.redis)
    registry.set_state("c1", "paused")
    assert wired.core.lease("c1", 10) == ([], False)  # paused: resume gives questions again
    assert wired.core.gate.leased("c1") == 0
    registry.set_state("c1", "running")
    qs, done = wired.core.lease("c1", 10)
    assert len(qs) == 10 and not done
    registry.set_state("c1", "stopped")
    assert wired.core.lease("c1", 10) == ([], True)
    assert wired.core.gate.leased("c1") == 10


def test_unregistered_campaigns_have_no_budget(tmp_path: Path, pool) -> None:
    w = Wired(tmp_path, pool)  # a feed-simulated pool: no registry entry
    w.publish_pool()
    w.settle()
    qs, _ = w.core.lease("c1", 500)
    assert len(qs) > 0 and w.core.gate.leased("c1") == 0


def test_the_cap_follows_hours_and_dollars_and_zero_is_refused(tmp_path: Path, pool) -> None:
    redis = fakeredis.FakeRedis()
    registry = _register(redis, tmp_path, pool, Budget(questions=1000, dollars=1.0), "d")
    assert budget_status(registry, "d").question_cap == 150  # $1 at $12/h, 2 s a question
    with pytest.raises(MaskpropError, match="buys no question"):
        _register(redis, tmp_path, pool, Budget(hours=0.0001), "e")
    assert not registry.exists("e")


def test_cli_status_shows_spent_and_forecast(wired: Wired, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from maskprop_app import cmd_campaign
    from maskprop_app.cli import app

    monkeypatch.delenv("MASKPROP_CONTROLLER_ADDR", raising=False)
    monkeypatch.setattr(cmd_campaign, "open_redis", lambda settings: wired.redis)
    qs, _ = wired.core.lease("c1", 137)
    wired.core.submit((q.question_id, bool(t)) for q, t in zip(qs, wired.truth(qs), strict=True))
    res = CliRunner().invoke(app, ["campaign", "status", "c1"])
    assert res.exit_code == 0, res.output
    spent = json.loads(res.stdout)["spent"]
    assert (spent["questions"], spent["of_questions"]) == (len(qs), 137)
    assert spent["hours"] == round(len(qs) * 2.0 / 3600, 4)
    st = budget_status(CampaignRegistry(wired.redis), "c1")
    assert spent["forecast_masks_at_budget"] == round(st.forecast_masks_at_budget, 1) > 0


def _run(tmp_path: Path, pool, budget: Budget, sizes: list[int]) -> tuple[Wired, int]:
    """The campaign through two search replicas leasing in ``sizes`` by turns, every question
    answered from the truth, until search says done; returns the stack and questions asked."""
    redis = fakeredis.FakeRedis()
    _register(redis, tmp_path, pool, budget)
    w = Wired(tmp_path, pool, redis=redis)
    w.publish_pool()
    w.settle()
    other, _ = build_search(SearchSettings(data_dir=w.tmp / "state"), w.bus, w.redis)
    handed, n = 0, 0
    while True:
        qs, done = (w.core, other)[n % 2].lease("c1", sizes[n % len(sizes)])
        handed += len(qs)
        if done:
            return w, handed
        # answers go to the other replica than the one that leased (as two gateways might)
        (other, w.core)[n % 2].submit(
            (q.question_id, bool(t)) for q, t in zip(qs, w.truth(qs), strict=True)
        )
        n += 1


def test_a_budget_of_exactly_the_questions_needed_labels_what_budget_to_spare_labels(
    tmp_path: Path, pool
) -> None:
    """Asking stops at the budget; the decisions that need no question (prior rejects,
    splits, answers already given) still come, on whichever replica gets the last answers."""
    sizes = [1, 7, 50, 3, 64]
    free, need = _run(tmp_path / "free", pool, Budget(questions=10**6), sizes)
    assert need > 0 and all(p.undecided_masks == 0 for p in free.core.progress("c1").classes)
    capped, handed = _run(tmp_path / "capped", pool, Budget(questions=need), sizes)
    assert handed == need and capped.core.gate.leased("c1") == need
    for k in free.core.classes("c1"):
        assert (capped.core.labels("c1", k) == free.core.labels("c1", k)).all(), k
    assert all(p.undecided_masks == 0 for p in capped.core.progress("c1").classes)


def test_top_ups_with_answers_count_against_the_budget(wired: Wired) -> None:
    """Questions leased by SubmitAnswers' top-ups are reserved like LeaseQuestions': the
    campaign hands out exactly its budget, however its questions are asked for."""
    handed, pending = 0, []
    while True:
        if not pending:
            qs, done = wired.core.lease("c1", 10)
            handed += len(qs)
            if done:
                break
            pending = list(qs)
        take, pending = pending[:10], pending[10:]
        answers = [(q.question_id, bool(t)) for q, t in zip(take, wired.truth(take), strict=True)]
        *_, new = wired.core.submit_and_lease(answers, {"c1": 40})
        handed += len(new)
        pending += new
    assert handed == 137 == wired.core.gate.leased("c1")
    assert wired.core.submit_and_lease([], {"c1": 5})[3] == []
