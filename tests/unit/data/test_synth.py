"""Synthetic scenes (issue #4, item 2): exact visible masks as COCO."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from maskprop.data import DEFAULT_CLASSES, render_scene, synth_scenes
from maskprop.data.synth import MIN_VISIBLE_FRACTION, min_visible_area
from maskprop.errors import MaskpropError
from maskprop_app.cmd_data import data_app

SIZE = 48
N = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth")
    return out, synth_scenes(N, out, seed=5, size=SIZE)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_files_other_seed_other_images(dataset, tmp_path):
    out, summary = dataset
    again = synth_scenes(N, tmp_path / "again", seed=5, size=SIZE)
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "again")
    assert again["per_class"] == summary["per_class"]
    other = synth_scenes(N, tmp_path / "other", seed=6, size=SIZE)
    assert _tree_bytes(tmp_path / "other") != _tree_bytes(out)
    assert other["images"] == N


def test_layout_splits_and_summary(dataset):
    out, summary = dataset
    assert {k: v["images"] for k, v in summary["splits"].items()} == {
        "train": 1,
        "pool": 10,
        "val": 1,
    }
    assert sum(v["instances"] for v in summary["splits"].values()) == summary["instances"]
    assert sum(summary["per_class"].values()) == summary["instances"]
    assert sorted(p.name for p in (out / "images" / "pool").iterdir())[0] == "000002.png"
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [
        "pool.json",
        "train.json",
        "val.json",
    ]


def test_coco_files_load_in_pycocotools_and_score_ap_one_against_themselves(dataset):
    out, summary = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "annotations" / "pool.json"))
        assert len(gt.getAnnIds()) == summary["splits"]["pool"]["instances"]
        assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(DEFAULT_CLASSES)
        dets = [
            {"image_id": a["image_id"], "category_id": a["category_id"],
             "segmentation": a["segmentation"], "score": 1.0}
            for a in gt.loadAnns(gt.getAnnIds())
        ]  # fmt: skip
        evaluator = COCOeval(gt, gt.loadRes(dets), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_every_mask_is_exactly_the_visible_part_of_its_object(dataset):
    out, _ = dataset
    for split in ("train", "pool", "val"):
        doc = json.loads((out / "annotations" / f"{split}.json").read_text())
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in doc["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for img in doc["images"]:
            scene = render_scene(5, img["id"] - 1, size=SIZE)
            png = np.asarray(Image.open(out / "images" / split / img["file_name"]))
            np.testing.assert_array_equal(png, scene.image)
            anns = by_image.get(img["id"], [])
            assert [a["category_id"] - 1 for a in anns] == scene.class_ids.tolist()
            masks = np.zeros((len(anns), SIZE, SIZE), dtype=bool)
            for k, ann in enumerate(anns):
                rle = {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
                masks[k] = mask_utils.decode(rle).astype(bool)
                assert ann["area"] == masks[k].sum() == mask_utils.area(rle)
                assert ann["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
                assert ann["iscrowd"] == 0
            np.testing.assert_array_equal(masks, scene.visible)
            assert (masks.sum(axis=0) <= 1).all()  # disjoint
            # Outside the masks the image is background: no unlabelled object fragments.
            outside = ~masks.any(axis=0)
            np.testing.assert_array_equal(scene.image[outside], scene.background[outside])


def test_visible_masks_follow_painting_order_and_occlusion_happens():
    occluded = 0
    for index in range(20):
        scene = render_scene(1, index, size=64)
        assert scene.visible.shape == scene.amodal.shape
        assert not (scene.visible & ~scene.amodal).any()
        later = np.zeros((64, 64), dtype=bool)
        for k in range(len(scene.class_ids) - 1, -1, -1):
            np.testing.assert_array_equal(scene.visible[k], scene.amodal[k] & ~later)
            later |= scene.amodal[k]
        area, full = scene.visible.sum(axis=(1, 2)), scene.amodal.sum(axis=(1, 2))
        assert (area >= min_visible_area(64)).all()
        assert (area >= MIN_VISIBLE_FRACTION * full).all()
        occluded += int((area < full).sum())
    assert occluded >= 10


def test_classes_are_roughly_balanced():
    counts = np.zeros(len(DEFAULT_CLASSES), dtype=int)
    for index in range(120):
        np.add.at(counts, render_scene(2, index, size=32).class_ids, 1)
    assert counts.min() >= 0.7 * counts.mean()
    assert counts.max() <= 1.3 * counts.mean()


def test_custom_classes_split_and_progress(tmp_path):
    calls: list[tuple[str, int, int]] = []
    summary = synth_scenes(
        5,
        tmp_path / "o",
        size=32,
        classes=("hexagon", "crescent"),
        split={"a": 0.5, "b": 0.5},
        progress=lambda *args: calls.append(args),
    )
    assert set(summary["per_class"]) == {"hexagon", "crescent"}
    assert {k: v["images"] for k, v in summary["splits"].items()} == {"a": 3, "b": 2}
    assert calls[-1] == ("images", 5, 5) and len(calls) == 5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_images": 0}, "positive integer"),
        ({"size": 31}, "image size"),
        ({"classes": ()}, "at least one shape"),
        ({"classes": ("disc", "blob")}, "unknown shape class 'blob'"),
        ({"classes": ("disc", "disc")}, "distinct"),
        ({"max_objects": 0}, "max_objects"),
        ({"split": {"train": 0.5, "val": 0.4}}, "sum to 1"),
        ({"split": {"../x": 1.0}}, "plain file name"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, needle):
    args: dict[str, Any] = {"n_images": 2, "size": 32, **kwargs}
    n = args.pop("n_images")
    with pytest.raises(MaskpropError, match=needle) as info:
        synth_scenes(n, tmp_path / "o", **args)
    assert "\n" not in str(info.value)


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(MaskpropError, match="cannot write to output directory"):
        synth_scenes(2, blocker / "sub", size=32)


def test_cli_writes_the_dataset_and_reports_errors_in_one_line(tmp_path):
    runner = CliRunner()
    args = ["synth", "--images", "4", "--out", str(tmp_path / "o"), "--size", "32"]
    res = runner.invoke(data_app, [*args, "--seed", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "pool" in res.output and (tmp_path / "o" / "annotations" / "val.json").exists()
    res = runner.invoke(data_app, ["synth", "--images", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error:") and "Traceback" not in res.output
