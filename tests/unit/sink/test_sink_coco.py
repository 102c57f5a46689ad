"""The streaming COCO export, checked by loading it with pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pytest
from maskprop_sink.coco import export_coco
from maskprop_sink.dataset import DatasetWriter
from pycocotools.coco import COCO


@pytest.fixture
def dataset(tmp_path, make_event):
    """Class 0 "cat": m0-0..m0-4 with m0-1 and m0-3 rejected; class 2 "dog": m2-5..m2-7."""
    cats = make_event(n=5, n_images=3, accepted=[True, False, True, False, True])
    dogs = make_event(n=3, first=5, class_id=2, class_name="dog", n_images=3, outcome="reject")
    root = tmp_path / "dataset"
    with DatasetWriter(root) as w:
        w.write(cats.event, 0)
        w.write(dogs.event, 1)
    return root, {**cats.masks, **dogs.masks}


def test_export_loads_in_pycocotools_and_round_trips_the_masks(tmp_path, dataset):
    root, masks = dataset
    out = tmp_path / "coco" / "demo.json"
    summary = export_coco(root, "demo", out)
    assert summary == {
        "images": 3,
        "annotations": 6,
        "categories": 2,
        "skipped_late": 0,
        "skipped_no_outline": 0,
    }

    coco = COCO(str(out))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 6
    assert sorted(a["maskprop"]["mask_id"] for a in anns) == [
        "m0-0", "m0-2", "m0-4", "m2-5", "m2-6", "m2-7",
    ]  # fmt: skip
    assert [a["id"] for a in anns] == list(range(1, 7))
    for ann in anns:
        mask = masks[ann["maskprop"]["mask_id"]]
        assert np.array_equal(coco.annToMask(ann), mask)
        assert ann["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["iscrowd"] == 0 and ann["maskprop"]["accepted"] is True
        image = coco.imgs[ann["image_id"]]
        assert image["maskprop_image_id"] == f"img{int(ann['maskprop']['mask_id'][3:]) % 3}"
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {1: "cat", 3: "dog"}
    assert coco.getAnnIds(catIds=[3]) == [
        a["id"] for a in anns if a["maskprop"]["mask_id"][1] == "2"
    ]
    dog = next(a for a in anns if a["category_id"] == 3)
    assert dog["maskprop"]["outcome"] == "reject" and dog["maskprop"]["node"] == 1
    assert {a["maskprop"]["source"] for a in anns} == {"verified", "propagated"}
    images = sorted(coco.imgs.values(), key=lambda im: im["id"])
    assert [im["maskprop_image_id"] for im in images] == ["img0", "img1", "img2"]
    assert [im["file_name"] for im in images] == ["img0", "images/img1.jpg", "images/img2.jpg"]
    assert all((im["width"], im["height"]) == (8, 6) for im in images)


def test_rejected_labels_are_exported_only_when_asked(tmp_path, dataset):
    root, _ = dataset
    out = tmp_path / "all.json"
    assert export_coco(root, "demo", out, accepted_only=False)["annotations"] == 8
    doc = json.loads(out.read_text())
    rejected = sorted(
        a["maskprop"]["mask_id"] for a in doc["annotations"] if not a["maskprop"]["accepted"]
    )
    assert rejected == ["m0-1", "m0-3"]
    assert doc["info"]["maskprop"] == {"campaign": "demo", "accepted_only": False}


def test_export_replaces_the_file_atomically_and_refuses_unknown_campaigns(tmp_path, dataset):
    root, _ = dataset
    out = tmp_path / "out" / "demo.json"
    out.parent.mkdir()
    out.write_text("old")
    export_coco(root, "demo", out)
    assert json.loads(out.read_text())["licenses"] == []
    with pytest.raises(FileNotFoundError, match="no dataset"):
        export_coco(root, "nope", tmp_path / "out" / "nope.json")
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.json"]  # no temp files left
