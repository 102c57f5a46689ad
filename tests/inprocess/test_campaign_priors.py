"""``maskprop campaign learn-priors``: K_pr/K_pa learned from a labelled held-out set with the
campaign's detector (paper Sec. 4.2), stored as the campaign's next spec version, and bad
input refused with nothing stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fakeredis
import pytest

torch = pytest.importorskip("torch", reason="the detector needs torch")

from typer.testing import CliRunner  # noqa: E402

from maskprop.errors import MaskpropError  # noqa: E402
from maskprop_app import cmd_campaign  # noqa: E402
from maskprop_app.campaign_priors import learn_priors  # noqa: E402
from maskprop_app.cli import app  # noqa: E402
from maskprop_runtime.campaigns import CampaignRegistry  # noqa: E402
from tests.inprocess.test_campaign_run import _spec, make_pool  # noqa: E402


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_pool(tmp_path_factory)


def test_learned_thresholds_become_the_next_version(pool, monkeypatch) -> None:
    _, images, gt = pool
    redis = fakeredis.FakeRedis()
    monkeypatch.setattr(cmd_campaign, "open_redis", lambda settings: redis)
    monkeypatch.delenv("MASKPROP_CONTROLLER_ADDR", raising=False)
    registry = CampaignRegistry(redis)
    registry.create(_spec(pool))
    res = CliRunner().invoke(
        app,
        ["campaign", "learn-priors", "shapes", "--heldout", str(gt), "--heldout-images",
         str(images), "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 2 and out["heldout_masks"] > 0
    stored = registry.spec("shapes")
    assert stored.version == 2
    assert stored.params.prior_reject_threshold == out["prior_reject_threshold"]
    assert stored.params.prior_accept_threshold == out["prior_accept_threshold"]
    assert 0.0 <= out["prior_reject_threshold"] <= out["prior_accept_threshold"] <= 1.0
    assert registry.spec("shapes", 1).params.prior_accept_threshold == 0.0  # v1 kept


def test_bad_input_is_refused_and_nothing_stored(pool, tmp_path) -> None:
    _, images, gt = pool
    spec = _spec(pool)
    with pytest.raises(MaskpropError, match="does not exist"):
        learn_priors(spec, tmp_path / "none.json", images)
    doc: dict[str, Any] = json.loads(gt.read_text())
    doc["categories"] = [c for c in doc["categories"] if c["name"] != "square"]
    doc["annotations"] = [
        a for a in doc["annotations"] if a["category_id"] in {c["id"] for c in doc["categories"]}
    ]
    (tmp_path / "no_square.json").write_text(json.dumps(doc))
    with pytest.raises(MaskpropError, match="no category 'square'"):
        learn_priors(spec, tmp_path / "no_square.json", images)
    doc = json.loads(gt.read_text())
    doc["images"][0]["file_name"] = "../../escape.png"
    (tmp_path / "escape.json").write_text(json.dumps(doc))
    with pytest.raises(MaskpropError, match="is not under"):
        learn_priors(spec, tmp_path / "escape.json", images)


def test_the_heldout_ap_counts_the_campaigns_classes_only(pool, tmp_path) -> None:
    from maskprop.data.instances import mask_ap
    from maskprop_app.campaign_priors import load_heldout

    _, images, gt = pool
    doc: dict[str, Any] = json.loads(gt.read_text())
    # A held-out file with a category the campaign does not have, holding objects too.
    doc["categories"].append({"id": 99, "name": "tree"})
    doc["annotations"] += [
        dict(a, id=10_000 + k, category_id=99) for k, a in enumerate(doc["annotations"])
    ]
    (tmp_path / "more.json").write_text(json.dumps(doc))
    held = load_heldout(("disc", "square"), tmp_path / "more.json", images)
    assert {c["name"] for c in held.doc["categories"]} == {"disc", "square"}
    assert all(a["category_id"] != 99 for a in held.doc["annotations"])
    # The ground truth itself as detections: a perfect detector of the campaign's classes.
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"],
         "segmentation": a["segmentation"], "score": 1.0}
        for a in held.doc["annotations"]
    ]  # fmt: skip
    assert mask_ap(held.doc, perfect)["ap"] == pytest.approx(1.0)
