"""`maskprop demo` / `maskprop detector ...` as a user meets them: one-line errors, and a
train -> predict round trip on a bring-your-own COCO set."""

import json

import pytest
from typer.testing import CliRunner

from maskprop.data.synth import synth_scenes
from maskprop_app.cli import app


def invoke(*args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["demo", "--images", "5"], "at least 20 images"),
        (["demo", "--annotator-error", "0.7"], "annotator error"),
        (["demo", "--device", "cuda:3"], None),
    ],
)
def test_demo_bad_input_is_one_line(tmp_path, args, needle):
    import torch

    res = invoke(*args, "--out", str(tmp_path / "o"), "--no-progress")
    if needle is None:  # a GPU asked for on a machine without one
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        needle = "no CUDA GPU"
    assert res.exit_code == 2
    assert needle in res.output and "Traceback" not in res.output


def test_train_then_predict_on_a_coco_set(tmp_path):
    synth_scenes(10, tmp_path / "s", size=64, classes=("disc", "ring"), max_objects=3)
    ckpt = tmp_path / "w.pt"
    res = invoke(
        "detector", "train", "--coco", str(tmp_path / "s/annotations/train.json"),
        "--images", str(tmp_path / "s/images/train"), "--out", str(ckpt), "--steps", "2",
        "--batch-size", "2", "--image-size", "64", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["classes"] == ["disc", "ring"]
    res = invoke(
        "detector", "predict", "--weights", str(ckpt),
        "--coco", str(tmp_path / "s/annotations/val.json"),
        "--images", str(tmp_path / "s/images/val"), "--out", str(tmp_path / "p.json"),
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    rows = json.loads((tmp_path / "p.json").read_text())
    assert summary["masks"] == len(rows)
    assert "mask_ap" in summary
    for row in rows:
        assert {"image_id", "category_id", "segmentation", "score", "mask_iou", "feature"} <= set(
            row
        )


def test_predict_with_missing_weights_is_one_line(tmp_path):
    synth_scenes(3, tmp_path / "s", size=64)
    res = invoke(
        "detector", "predict", "--weights", str(tmp_path / "none.pt"),
        "--coco", str(tmp_path / "s/annotations/val.json"), "--images", str(tmp_path),
        "--out", str(tmp_path / "p.json"), "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 2
    assert "detector weights not found" in res.output and "Traceback" not in res.output


def _train_args(tmp_path, *extra):
    return (
        "detector", "train", "--coco", str(tmp_path / "s/annotations/train.json"),
        "--images", str(tmp_path / "s/images/train"), "--out", str(tmp_path / "w.pt"),
        "--steps", "1", "--batch-size", "2", "--image-size", "64", "--device", "cpu",
        "--no-progress", *extra,
    )  # fmt: skip


def test_backend_errors_are_one_line(tmp_path, monkeypatch):
    import sys

    synth_scenes(4, tmp_path / "s", size=64, classes=("disc", "ring"), max_objects=2)
    res = invoke(*_train_args(tmp_path, "--backend", "mmdet"))
    assert res.exit_code == 2 and "unknown detector backend" in res.output
    (tmp_path / "evil.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")  # os.system("true")
    res = invoke(*_train_args(tmp_path, "--pretrained", str(tmp_path / "evil.pkl")))
    assert res.exit_code == 2 and "is not allowed in a weights file" in res.output
    monkeypatch.setitem(sys.modules, "detectron2", None)  # as where it is not installed
    res = invoke(*_train_args(tmp_path, "--backend", "detectron2"))
    assert res.exit_code == 2
    assert "bash scripts/bootstrap.sh detectron2" in res.output and "Traceback" not in res.output


def test_pointrend_train_then_predict_on_a_coco_set(tmp_path):
    pytest.importorskip("detectron2", reason="bash scripts/bootstrap.sh detectron2")
    synth_scenes(6, tmp_path / "s", size=64, classes=("disc", "ring"), max_objects=2)
    res = invoke(*_train_args(tmp_path, "--backend", "detectron2"))
    assert res.exit_code == 0, res.output
    res = invoke(
        "detector", "predict", "--weights", str(tmp_path / "w.pt"),
        "--coco", str(tmp_path / "s/annotations/val.json"),
        "--images", str(tmp_path / "s/images/val"), "--out", str(tmp_path / "p.json"),
        "--device", "cpu", "--backend", "detectron2", "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["masks"] == len(json.loads((tmp_path / "p.json").read_text()))
    res = invoke(
        "detector", "predict", "--weights", str(tmp_path / "w.pt"),
        "--coco", str(tmp_path / "s/annotations/val.json"),
        "--images", str(tmp_path / "s/images/val"), "--out", str(tmp_path / "p.json"),
        "--backend", "torchvision", "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 2 and "'detectron2' detector weights" in res.output
