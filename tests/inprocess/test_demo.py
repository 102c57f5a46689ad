"""`maskprop demo` end to end at toy size (the full-size run is in the README and the notes):
synthetic data, training, detection, the clusterer/search/sink services, the simulated crowd,
retraining, and the report's contract."""

import json

import pytest
from pycocotools.coco import COCO

pytest.importorskip("torch", reason="the demo needs torch")

from maskprop.errors import MaskpropError
from maskprop_app.demo import DemoConfig, run_demo
from maskprop_runtime.settings import RuntimeSettings

ROUND_KEYS = {"masks", "sq", "precision", "questions", "hours", "speedup_vs_manual", "detector_ap"}


def test_demo_writes_report_annotations_and_plots(tmp_path):
    import torch

    torch.set_num_threads(1)
    cfg = DemoConfig(images=60, train_steps=3, retrain_steps=2, batch_size=4, device="cpu")
    report = run_demo(cfg, tmp_path, RuntimeSettings())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert ROUND_KEYS <= set(r)
        assert 0.0 <= r["detector_ap"] <= 1.0
        assert r["masks"] <= r["detected_masks"]
    assert report["rounds"][1]["train_images"] >= report["rounds"][0]["train_images"]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    coco = COCO(str(tmp_path / "annotations.json"))
    assert len(coco.getAnnIds()) == report["rounds"][-1]["total_masks"]
    assert (tmp_path / "rounds.png").stat().st_size > 0
    assert (tmp_path / "fig4_scores.png").stat().st_size > 0
    assert (tmp_path / "models/round2.pt").exists()
    with pytest.raises(MaskpropError, match="already holds a finished demo"):
        run_demo(cfg, tmp_path, RuntimeSettings())


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"images": 5}, "at least 20 images"),
        ({"rounds": 0}, "rounds must be"),
        ({"annotator_error": 0.9}, "annotator error"),
        ({"campaign": "../x"}, "campaign name"),
        ({"labelled": 0.0}, "labelled share"),
        ({"labelled": 0.85}, "labelled share"),
    ],
)
def test_demo_rejects_bad_settings(tmp_path, kwargs, needle):
    with pytest.raises(MaskpropError, match=needle):
        run_demo(DemoConfig(**kwargs), tmp_path, RuntimeSettings())


class _Killed(Exception):
    pass


def test_an_interrupted_demo_resumes_without_retraining_finished_rounds(tmp_path):
    import torch

    torch.set_num_threads(1)
    cfg = DemoConfig(
        images=40, train_steps=2, retrain_steps=2, batch_size=4, device="cpu", control=False
    )

    def kill_in_round_2(label, done, total):
        if label.startswith("r2: train") and done >= 1:
            raise _Killed

    with pytest.raises(_Killed):
        run_demo(cfg, tmp_path, RuntimeSettings(), progress=kill_in_round_2)
    assert (tmp_path / "models/round1.pt").exists() and not (tmp_path / "report.json").exists()
    round1 = (tmp_path / "models/round1.pt").stat().st_mtime_ns
    seen = []
    report = run_demo(cfg, tmp_path, RuntimeSettings(), progress=lambda lb, d, t: seen.append(lb))
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert (tmp_path / "models/round1.pt").stat().st_mtime_ns == round1  # not trained again
    assert "images" not in seen  # the synthetic scenes were reused, not rendered again


def test_the_labelled_share_sizes_the_train_split_and_a_new_share_renders_new_scenes(tmp_path):
    from maskprop.progress import no_progress
    from maskprop_app.demo import _synth

    few = _synth(DemoConfig(images=40, labelled=0.05), tmp_path, no_progress)
    assert {k: v["images"] for k, v in few["splits"].items()} == {"train": 2, "pool": 34, "val": 4}
    again = _synth(DemoConfig(images=40, labelled=0.2), tmp_path, no_progress)
    assert {k: v["images"] for k, v in again["splits"].items()} == {
        "train": 8,
        "pool": 28,
        "val": 4,
    }
