"""``maskprop campaign export``: every round's accepted masks from the sink's dataset as one
COCO file, round as provenance, de-duplicated across rounds (loaded back with pycocotools)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from maskprop_sink.campaign_export import dataset_rounds, export_campaign
from pycocotools.coco import COCO
from typer.testing import CliRunner

from maskprop.errors import MaskpropError
from maskprop_app.cli import app


def test_rounds_merge_with_provenance_and_repeats_dropped(tmp_path: Path, dataset: Any) -> None:
    root, masks = dataset
    assert dataset_rounds(root, "shapes") == [(1, "shapes"), (2, "shapes.r2")]
    out = tmp_path / "out" / "shapes.json"
    summary = export_campaign(root, "shapes", out)
    assert summary == {
        "campaign": "shapes",
        "rounds": {1: 3, 2: 4},
        "images": 2,
        "annotations": 5,
        "categories": 1,
        "duplicates_dropped": 2,
        "skipped_late": 0,
    }
    coco = COCO(str(out))
    anns = coco.loadAnns(coco.getAnnIds())
    got = {(a["maskprop"]["mask_id"], a["maskprop_round"]) for a in anns}
    # m0-2, m0-3 are kept from round 1 (earlier rounds win); m0-1 was rejected
    assert got == {("m0-0", 1), ("m0-2", 1), ("m0-3", 1), ("m0-4", 2), ("m0-5", 2)}
    assert [a["id"] for a in anns] == [1, 2, 3, 4, 5]
    for a in anns:
        assert a["maskprop"]["round"] == a["maskprop_round"]
        assert np.array_equal(coco.annToMask(a), masks[a["maskprop"]["mask_id"]])
        image = coco.imgs[a["image_id"]]
        assert image["maskprop_image_id"] == f"img{int(a['maskprop']['mask_id'][3:]) % 2}"
    assert sorted(im["maskprop_image_id"] for im in coco.imgs.values()) == ["img0", "img1"]
    info = json.loads(out.read_text())["info"]["maskprop"]
    assert info == {
        "campaign": "shapes",
        "rounds": [1, 2],
        "accepted_only": True,
        "deduplicated_across_rounds": True,
    }
    assert not [p for p in out.parent.iterdir() if p.name != "shapes.json"]  # no temp left


def test_without_deduplication_every_round_is_kept(tmp_path: Path, dataset: Any) -> None:
    root, _ = dataset
    out = tmp_path / "all.json"
    summary = export_campaign(root, "shapes", out, deduplicate_rounds=False)
    assert summary["annotations"] == 7 and summary["duplicates_dropped"] == 0
    rounds = [a["maskprop_round"] for a in json.loads(out.read_text())["annotations"]]
    assert rounds == [1, 1, 1, 2, 2, 2, 2]


def test_a_single_round_is_the_sinks_export_with_its_round(tmp_path: Path, dataset: Any) -> None:
    root, _ = dataset
    summary = export_campaign(root, "other", tmp_path / "other.json")
    assert summary["rounds"] == {1: 2} and summary["annotations"] == 2
    doc = json.loads((tmp_path / "other.json").read_text())
    assert {c["name"] for c in doc["categories"]} == {"dog"}
    assert {a["maskprop_round"] for a in doc["annotations"]} == {1}


def test_unknown_campaign_is_refused(tmp_path: Path, dataset: Any) -> None:
    root, _ = dataset
    with pytest.raises(MaskpropError, match="no labels of campaign 'ghost'"):
        export_campaign(root, "ghost", tmp_path / "g.json")
    # "shapes.r2" is a round of "shapes", not a campaign of its own
    with pytest.raises(MaskpropError, match=r"no labels of campaign 'shapes\.r2'"):
        export_campaign(root, "shapes.r2", tmp_path / "g.json")
    assert not (tmp_path / "g.json").exists()


def test_cli_exports_from_the_sinks_dataset_dir(
    tmp_path: Path, dataset: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = dataset
    monkeypatch.setenv("MASKPROP_DATASET_DIR", str(root))
    out = tmp_path / "cli.json"
    res = CliRunner().invoke(app, ["campaign", "export", "shapes", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["annotations"] == 5
    assert len(COCO(str(out)).getAnnIds()) == 5
    res = CliRunner().invoke(
        app, ["campaign", "export", "ghost", "--out", str(out), "--dataset", str(root)]
    )
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: no labels of campaign 'ghost' under {root} (the sink's MASKPROP_DATASET_DIR)"
    ]
