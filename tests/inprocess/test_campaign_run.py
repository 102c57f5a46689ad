"""``maskprop campaign run``: a spec embedded in one process (issue #16 item 7), its budget met
exactly (item 4), its parameters in every session, and bad input refused before anything is
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the detector needs torch")

from typer.testing import CliRunner  # noqa: E402

from maskprop.campaign_spec import Budget, CampaignSpec  # noqa: E402
from maskprop.errors import MaskpropError  # noqa: E402
from maskprop.params import AnnotationParams  # noqa: E402
from maskprop_app.campaign_run import run_spec  # noqa: E402
from maskprop_app.cli import app  # noqa: E402
from tests.unit.detector.conftest import untrained_pool  # noqa: E402

CLASSES = ("disc", "square")
# Every mask of an untrained detector is wrong: "split" asks on inside rejected clusters, so
# the small pool yields enough questions to spend a budget on.
SPLIT = AnnotationParams(samples_per_cluster=3, prior_accept_threshold=0.0, reject_action="split")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_pool(tmp_path_factory)


def make_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(weights, images folder, ground truth COCO) of 6 synthetic scenes."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pool")
    weights = untrained_pool(root, 6, max_detections=12, classes=CLASSES)
    return weights, root / "synth" / "images" / "pool", root / "synth" / "annotations" / "pool.json"


def _spec(pool: tuple[Path, Path, Path], **kw: object) -> CampaignSpec:
    weights, images, _ = pool
    args: dict = dict(
        name="shapes", classes=CLASSES, images_root=images, detector_weights=weights,
        params=SPLIT, budget=Budget(questions=10_000),
    )  # fmt: skip
    args.update(kw)
    return CampaignSpec(**args)


def test_a_spec_runs_embedded_and_reports_each_round(pool, tmp_path) -> None:
    report = run_spec(_spec(pool), tmp_path, pool[2])
    (r1,) = report["rounds"]
    assert r1["detected_masks"] > 0 and r1["images"] == 6
    assert r1["undecided_masks"] == 0  # the budget was not the limit: every mask decided
    assert 10 < r1["questions"] <= r1["detected_masks"]
    assert r1["masks"] == len(
        json.loads((tmp_path / "annotations.json").read_text())["annotations"]
    )
    assert r1["hours"] == pytest.approx(r1["questions"] * 2.0 / 3600)
    assert report["budget"]["spent_questions"] == r1["questions"]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    with pytest.raises(MaskpropError, match="already holds a finished campaign run"):
        run_spec(_spec(pool), tmp_path, pool[2])


def test_the_budget_is_met_exactly(pool, tmp_path) -> None:
    free = run_spec(_spec(pool), tmp_path / "free", pool[2])["rounds"][0]["questions"]
    cap = free // 2
    report = run_spec(_spec(pool, budget=Budget(questions=cap)), tmp_path / "capped", pool[2])
    (r1,) = report["rounds"]
    assert r1["questions"] == cap == report["budget"]["questions"]
    assert r1["undecided_masks"] > 0
    # hours as the budget: cap questions of 2 s each are cap * 2 / 3600 h
    hours = run_spec(_spec(pool, budget=Budget(hours=cap * 2 / 3600)), tmp_path / "hours", pool[2])[
        "rounds"
    ][0]
    assert hours["questions"] == cap and hours["hours"] <= cap * 2 / 3600


def test_redundancy_asks_each_question_that_many_times_and_the_budget_pays_for_it(
    pool, tmp_path
) -> None:
    """redundancy = 3: three simulated workers a question, the majority to search.  Noise-free
    they agree, so the labels are those of redundancy 1; the hours are three times as many,
    and an hours budget buys a third of the questions."""
    one = run_spec(_spec(pool), tmp_path / "one", pool[2])
    three = run_spec(_spec(pool, redundancy=3), tmp_path / "three", pool[2])
    a, b = one["rounds"][0], three["rounds"][0]
    assert (a["questions"], a["masks"]) == (b["questions"], b["masks"])
    assert b["answers"] == 3 * b["questions"] and b["hours"] == pytest.approx(3 * a["hours"])
    assert three["budget"]["spent_answers"] == 3 * three["budget"]["spent_questions"]
    same = [(tmp_path / d / "annotations.json").read_text() for d in ("one", "three")]
    assert same[0] == same[1]
    cap = a["questions"] // 2
    hours = Budget(hours=cap * 3 * 2 / 3600)  # cap questions at 3 answers of 2 s
    capped = run_spec(_spec(pool, redundancy=3, budget=hours), tmp_path / "capped", pool[2])
    assert capped["rounds"][0]["questions"] == cap == capped["budget"]["questions"]


def test_the_specs_parameters_decide(pool, tmp_path) -> None:
    """reject_action = "split" (a parameter search's own settings cannot even express) keeps
    asking inside rejected clusters; the paper's "reject" stops at them: the spec, not
    search's defaults, opened the sessions."""
    split = run_spec(_spec(pool), tmp_path / "a", pool[2])["rounds"][0]
    spec = _spec(pool, params=AnnotationParams(samples_per_cluster=3, prior_accept_threshold=0.0))
    reject = run_spec(spec, tmp_path / "b", pool[2])["rounds"][0]
    assert reject["questions"] < split["questions"]
    assert reject["undecided_masks"] == split["undecided_masks"] == 0


def test_bad_input_is_one_error_and_writes_nothing(pool, tmp_path) -> None:
    gt = pool[2]
    with pytest.raises(MaskpropError, match="no category 'triangle'"):
        run_spec(_spec(pool, classes=("disc", "triangle")), tmp_path / "x", gt)
    with pytest.raises(MaskpropError, match="names classes"):
        run_spec(_spec(pool, classes=("square", "disc")), tmp_path / "x", gt)
    with pytest.raises(MaskpropError, match="does not exist"):
        run_spec(_spec(pool), tmp_path / "x", tmp_path / "nope.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MaskpropError, match="no image"):
        run_spec(_spec(pool, images_root=empty), tmp_path / "x", gt)
    assert not (tmp_path / "x").exists()


def test_cli_runs_a_spec_file_and_refuses_without_a_crowd(pool, tmp_path) -> None:
    weights, images, gt = pool
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'[campaign]\nname = "shapes"\nclasses = ["disc", "square"]\nimages = "{images}"\n'
        f'[detector]\nweights = "{weights}"\n[annotation]\nsamples_per_cluster = 3\n'
        'prior_accept_threshold = 0.0\nreject_action = "split"\n'
        "[budget]\nquestions = 7\n"
    )
    runner = CliRunner()
    res = runner.invoke(app, ["campaign", "run", "--spec", str(spec), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--simulated-crowd" in res.output
    res = runner.invoke(
        app,
        ["campaign", "run", "--spec", str(spec), "--out", str(tmp_path / "o"),
         "--simulated-crowd", str(gt), "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rounds"][0]["questions"] == 7


def test_two_rounds_retrain_between_and_share_the_budget(pool, tmp_path, monkeypatch) -> None:
    import fakeredis
    from maskprop_detector.train import read_checkpoint

    import maskprop_app.embedded as embedded

    # One store for both rounds, as a real Redis is: round 1's sessions are still there when
    # round 2 starts, so round 2 must travel under a name of its own.
    shared = fakeredis.FakeRedis()
    monkeypatch.setattr(embedded, "make_redis", lambda url, **kw: shared)
    _, images, gt = pool
    spec = _spec(
        pool, budget=Budget(questions=10_000, rounds=2), labelled=gt, labelled_images=images
    )
    report = run_spec(spec, tmp_path, gt, crowd_error=0.3, retrain_steps=2, batch_size=2)
    r1, r2 = report["rounds"]
    assert report["campaign"] == "shapes"
    # Both rounds' sessions are in the one store, each under its round's name.
    assert shared.exists("maskprop:search:shapes:classes")
    assert shared.exists("maskprop:search:shapes.r2:classes")
    assert r1["retrain"] is None and r2["retrain"]["round"] == 2
    assert r2["retrain"]["accepted_masks"] == r1["masks"] > 0  # round 1's masks trained on
    saved = read_checkpoint(tmp_path / "models" / "round2.pt")["extra"]["maskprop_campaign"]
    assert saved["round"] == 2 and r2["weights"].endswith("round2.pt")
    assert report["budget"]["spent_questions"] == r1["questions"] + r2["questions"]
    anns = json.loads((tmp_path / "annotations.json").read_text())["annotations"]
    assert len(anns) == report["total_masks"] <= r1["masks"] + r2["masks"]
    assert {a["maskprop_round"] for a in anns} <= {1, 2} and anns[0]["maskprop_round"] == 1


def test_a_rerun_keeps_round_weights_trained_from_the_same_inputs(pool, tmp_path) -> None:
    _, images, gt = pool
    spec = _spec(
        pool, budget=Budget(questions=10_000, rounds=2), labelled=gt, labelled_images=images
    )
    first = run_spec(spec, tmp_path, gt, retrain_steps=2, batch_size=2)
    weights = tmp_path / "models" / "round2.pt"
    trained_at = weights.stat().st_mtime_ns
    (tmp_path / "report.json").unlink()  # as if the run had been killed before its end
    again = run_spec(spec, tmp_path, gt, retrain_steps=2, batch_size=2)
    assert weights.stat().st_mtime_ns == trained_at  # kept, not trained again
    assert again["rounds"][1]["retrain"]["reused"] is True
    assert (
        again["rounds"][1]["retrain"]["inputs_sha256"]
        == (first["rounds"][1]["retrain"]["inputs_sha256"])
    )
    (tmp_path / "report.json").unlink()
    other = run_spec(spec, tmp_path, gt, retrain_steps=3, batch_size=2)  # other inputs
    assert "reused" not in other["rounds"][1]["retrain"]
    assert other["rounds"][1]["retrain"]["steps"] == 3


def test_the_budget_spans_rounds(pool, tmp_path) -> None:
    _, images, gt = pool
    one = run_spec(_spec(pool), tmp_path / "one", gt)["rounds"][0]["questions"]
    spec = _spec(
        pool, budget=Budget(questions=one + 3, rounds=2), labelled=gt, labelled_images=images
    )
    report = run_spec(spec, tmp_path / "two", gt, retrain_steps=1, batch_size=2)
    assert [r["questions"] for r in report["rounds"]] == [one, 3]
    assert report["budget"]["spent_questions"] == one + 3


def test_rounds_need_a_labelled_set(pool, tmp_path) -> None:
    with pytest.raises(MaskpropError, match="needs \\[detector\\] labelled"):
        run_spec(_spec(pool, budget=Budget(questions=5, rounds=2)), tmp_path / "x", pool[2])
    assert not (tmp_path / "x").exists()


def test_a_heldout_set_scores_each_round_learns_priors_and_trains_a_control(pool, tmp_path) -> None:
    """What ``maskprop demo`` adds to the campaign path: mask AP on a held-out set every round,
    K_pr/K_pa learned there (the spec's own when too few masks to fit, as with this untrained
    detector), a labelled-only control model from round 2, and the plots."""
    _, images, gt = pool
    spec = _spec(
        pool, budget=Budget(questions=10_000, rounds=2), labelled=gt, labelled_images=images
    )
    report = run_spec(
        spec, tmp_path, gt, retrain_steps=1, batch_size=2, heldout=(gt, images), control=True
    )
    r1, r2 = report["rounds"]
    for r in (r1, r2):
        assert 0.0 <= r["detector_ap"] <= 1.0 and 0.0 <= r["detector_ap50"] <= 1.0
        assert r["total_masks"] <= sum(x["masks"] for x in report["rounds"])
        if not r["priors_learned"]:
            assert r["prior_accept_threshold"] == SPLIT.prior_accept_threshold
    assert r1["detector_ap_control_labelled_only"] is None
    assert 0.0 <= r2["detector_ap_control_labelled_only"] <= 1.0
    assert (tmp_path / "models" / "round2_control.pt").exists()
    assert r2["total_masks"] == r1["total_masks"] + r2["new_masks_after_dedup"]
    for plot in ("rounds.png", "fig4_scores.png"):
        assert (tmp_path / plot).stat().st_size > 0
    with pytest.raises(MaskpropError, match="control model is scored on a held-out set"):
        run_spec(spec, tmp_path / "c", gt, control=True)
    res = CliRunner().invoke(app, [
        "campaign", "run", "--spec", "s.toml", "--out", str(tmp_path / "d"),
        "--simulated-crowd", str(gt), "--heldout", str(gt),
    ])  # fmt: skip
    assert res.exit_code == 2 and "--heldout and --heldout-images go together" in res.output
