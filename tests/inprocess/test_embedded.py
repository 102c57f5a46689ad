"""`maskprop run`: the whole pipeline in one process with the in-memory bus and store."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskprop.errors import MaskpropError
from maskprop_app.embedded import RunConfig, run_pipeline
from maskprop_runtime.settings import RuntimeSettings


def test_embedded_pipeline_matches_the_library_and_exports_coco(tmp_path):
    cfg = RunConfig(campaign="emb", masks=1500, classes=4, seed=2, dim=8, annotator_batch=25)
    report = run_pipeline(cfg, tmp_path, RuntimeSettings())
    assert report["mode"] == "embedded"
    assert report["matches_in_process_library"] is True
    assert report["labels_in_sink"] == 1500
    assert report["duplicate_labels"] == 0 and report["missing_labels"] == 0
    assert json.loads((tmp_path / "run_report.json").read_text()) == report
    coco = COCO(str(tmp_path / "annotations.json"))
    assert len(coco.getAnnIds()) == report["accepted"] > 0
    ann = coco.loadAnns(coco.getAnnIds()[:1])[0]
    mask = coco.annToMask(ann)
    assert mask.shape == (64, 64) and mask.sum() == pytest.approx(ann["area"])
    assert np.isclose(report["sq"], report["sq"])  # a number, not None


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[pool\nmasks = 3", "not valid TOML"),
        ("[surprise]\nx = 1", "unknown sections"),
        ('[campaign]\nname = "../etc"', "campaign name"),
        ("[pool]\nmasks = -1", "must be positive"),
        ("[search]\nsamples_per_cluster = 0", "samples_per_cluster"),
        ('[search]\nstrategy = "best-first"', "strategy"),
        ("[annotator]\nerror_rate = 0.9", "error_rate"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path, text, needle):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(MaskpropError, match=needle):
        RunConfig.load(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(MaskpropError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.toml")


def test_a_second_run_into_the_same_output_is_refused(tmp_path):
    cfg = RunConfig(campaign="again", masks=300, classes=2, seed=1, dim=4)
    run_pipeline(cfg, tmp_path, RuntimeSettings())
    with pytest.raises(MaskpropError, match="already holds a dataset"):
        run_pipeline(cfg, tmp_path, RuntimeSettings())
