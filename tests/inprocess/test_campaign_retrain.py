"""``maskprop campaign retrain`` (issue #16 item 5): the labelled set plus every round's
accepted masks, de-duplicated across rounds, into new weights with the round as provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the detector needs torch")

from typer.testing import CliRunner  # noqa: E402

from maskprop.data.coco import load_coco_instances, write_coco  # noqa: E402
from maskprop.errors import MaskpropError  # noqa: E402
from maskprop_app.campaign_retrain import retrain  # noqa: E402
from maskprop_app.campaign_run import run_spec  # noqa: E402
from maskprop_app.cli import app  # noqa: E402
from tests.inprocess.test_campaign_run import _spec, make_pool  # noqa: E402

FAST = {"steps": 2, "batch_size": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_pool(tmp_path_factory)


def _round_file(path: Path, gt: Path, image_ids: set[int], round_: int) -> Path:
    images, anns, cats = load_coco_instances(gt)
    write_coco(
        path,
        info={},
        images=[im for im in images if im["id"] in image_ids],
        annotations=[dict(a, maskprop_round=round_) for a in anns if a["image_id"] in image_ids],
        categories=cats,
    )
    return path


def test_rounds_are_merged_deduplicated_and_recorded(pool, tmp_path) -> None:
    from maskprop_detector.train import read_checkpoint

    _, images, gt = pool
    all_images, anns, _ = load_coco_instances(gt)
    ids = sorted(im["id"] for im in all_images)
    r1 = _round_file(tmp_path / "r1.json", gt, set(ids[:3]), 1)
    r2 = _round_file(tmp_path / "r2.json", gt, set(ids[1:]), 2)  # images 2-3 again
    again = sum(1 for a in anns if a["image_id"] in set(ids[1:3]))
    out = tmp_path / "w2.pt"
    got = retrain(
        _spec(pool), labelled=gt, labelled_images=images, accepted=[r2, r1], out=out, round_=2,
        **FAST,
    )  # fmt: skip
    assert got["duplicates_dropped"] == again > 0
    assert got["accepted_masks"] == len(anns)
    assert got["accepted_images"] == len(ids)
    saved = read_checkpoint(out)["extra"]["maskprop_campaign"]
    assert saved["round"] == 2 and saved["campaign"] == "shapes"
    assert not out.with_name("w2.pt.partial").exists()
    with pytest.raises(MaskpropError, match="never overwrites"):
        retrain(_spec(pool), labelled=gt, labelled_images=images, accepted=[r1], out=out,
                round_=2, **FAST)  # fmt: skip


def test_a_campaign_runs_output_retrains(pool, tmp_path) -> None:
    weights, images, gt = pool
    spec = _spec(pool)
    report = run_spec(spec, tmp_path / "run", gt, crowd_error=0.3)
    assert report["rounds"][0]["masks"] > 0  # the noisy crowd accepted some
    res = CliRunner().invoke(
        app,
        ["campaign", "retrain", "--spec", str(_toml(tmp_path, weights, images)),
         "--labelled", str(gt), "--labelled-images", str(images),
         "--accepted", str(tmp_path / "run" / "annotations.json"),
         "--out", str(tmp_path / "w2.pt"), "--steps", "2", "--batch-size", "2",
         "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accepted_masks"] == report["rounds"][0]["masks"]


def _toml(tmp_path: Path, weights: Path, images: Path) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'[campaign]\nname = "shapes"\nclasses = ["disc", "square"]\nimages = "{images}"\n'
        f'[detector]\nweights = "{weights}"\n[budget]\nquestions = 7\n'
    )
    return spec


def test_bad_input_is_refused_before_training(pool, tmp_path) -> None:
    _, images, gt = pool
    escape = tmp_path / "escape.json"
    escape.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "../../x.png", "width": 4, "height": 4}],
                "annotations": [],
                "categories": [{"id": 1, "name": "disc"}],
            }
        )
    )
    kw = dict(labelled=gt, labelled_images=images, out=tmp_path / "w.pt", round_=2, **FAST)
    with pytest.raises(MaskpropError, match="not under the campaign's folder"):
        retrain(_spec(pool), accepted=[escape], **kw)
    with pytest.raises(MaskpropError, match="does not exist"):
        retrain(_spec(pool), accepted=[tmp_path / "none.json"], **kw)
    with pytest.raises(MaskpropError, match="round 2 or later"):
        retrain(_spec(pool), accepted=[gt], **dict(kw, round_=1))
    assert not (tmp_path / "w.pt").exists()
    res = CliRunner().invoke(app, ["campaign", "retrain", "--accepted", str(gt)])
    assert res.exit_code == 2 and "NAME" in res.output


def test_the_accepted_masks_order_does_not_change_what_is_trained_on(pool, tmp_path) -> None:
    """The embedded run writes its masks in detection order, the sink's export in its shards'
    order: the same masks in another order (and under other image ids) must give the same
    training set, or the two runs' next rounds would differ."""
    from maskprop_app.campaign_retrain import load_accepted

    _, images_root, gt = pool
    images, anns, cats = load_coco_instances(gt)
    forward = _round_file(tmp_path / "a.json", gt, {im["id"] for im in images}, 1)
    write_coco(
        tmp_path / "b.json",
        info={},
        images=[dict(im, id=im["id"] + 100) for im in reversed(images)],
        annotations=[
            dict(a, id=k, image_id=a["image_id"] + 100, maskprop_round=1)
            for k, a in enumerate(reversed(anns), start=1)
        ],
        categories=cats,
    )
    category_of = {str(c["name"]): int(c["id"]) for c in cats}
    a_images, a_anns = load_accepted([forward], images_root, category_of)
    b_images, b_anns = load_accepted([tmp_path / "b.json"], images_root, category_of)
    assert a_images == b_images and len(a_anns) == len(anns) > 1

    def strip(xs: list[dict]) -> list[tuple]:
        return [(x["image_id"], x["category_id"], x["segmentation"]["counts"]) for x in xs]

    assert strip(a_anns) == strip(b_anns)
