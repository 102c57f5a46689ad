"""The campaign spec (issue #16 item 1): paper defaults, and one clear error for every bad
field, naming its table and key."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from maskprop.campaign_spec import CampaignSpec, load_spec, parse_spec
from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams

GOOD = """
[campaign]
name = "shapes"
classes = ["circle", "square"]
images = "pool/images"
[detector]
weights = "models/detector.pt"
[annotation]
samples_per_cluster = 15
accept_threshold = 0.85
iou_threshold = 0.75
prior_accept_threshold = 0.7
redundancy = 1
[budget]
questions = 2000
rounds = 2
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "pool" / "images").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "detector.pt").write_bytes(b"weights")
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "spec.toml"
    path.write_text(text)
    return path


def _error(folder: Path, text: str) -> str:
    with pytest.raises(MaskpropError) as info:
        load_spec(_write(folder, text))
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


def test_good_spec_reads_with_paper_defaults(folder: Path) -> None:
    spec = load_spec(_write(folder, GOOD))
    assert isinstance(spec, CampaignSpec)
    assert spec.name == "shapes" and spec.classes == ("circle", "square")
    assert spec.images_root == (folder / "pool" / "images").resolve()
    assert spec.detector_weights == (folder / "models" / "detector.pt").resolve()
    assert spec.params == AnnotationParams()  # every value given equals the paper's
    assert (spec.redundancy, spec.strategy, spec.seed, spec.version) == (1, "heuristic", 0, 1)
    assert spec.budget.questions == 2000 and spec.budget.rounds == 2


def test_omitted_annotation_table_gives_the_paper_defaults(folder: Path) -> None:
    text = GOOD.split("[annotation]")[0] + "[budget]\nhours = 1.5\nwage = 20\n"
    spec = load_spec(_write(folder, text))
    assert spec.params == AnnotationParams(hourly_wage=20.0)
    assert spec.budget.hours == 1.5 and spec.budget.questions == 0


def test_classes_from_a_coco_categories_file(folder: Path) -> None:
    cats = {"categories": [{"id": 2, "name": "square"}, {"id": 1, "name": "circle"}]}
    (folder / "cats.json").write_text(json.dumps(cats))
    text = GOOD.replace('classes = ["circle", "square"]', 'categories = "cats.json"')
    assert load_spec(_write(folder, text)).classes == ("circle", "square")


def test_manifest_is_read_under_the_spec_folder(folder: Path) -> None:
    (folder / "list.txt").write_text("a.png\n")
    text = GOOD.replace('images = "pool/images"', 'images = "pool/images"\nmanifest = "list.txt"')
    assert load_spec(_write(folder, text)).manifest == (folder / "list.txt").resolve()


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # an unknown class (not in the categories file)
        (
            'classes = ["circle", "square"]',
            'classes = ["circle", "hexagon"]\ncategories = "cats.json"',
            "[campaign] unknown class 'hexagon': not in the categories file",
        ),
        # a missing folder
        ('images = "pool/images"', 'images = "pool/nowhere"', "[campaign] images folder"),
        ('weights = "models/detector.pt"', 'weights = "models/x.pt"', "[detector] weights file"),
        (
            'images = "pool/images"',
            'images = "pool/images"\nmanifest = "missing.txt"',
            "[campaign] manifest",
        ),
        # K_a outside (0.5, 1]
        (
            "accept_threshold = 0.85",
            "accept_threshold = 0.5",
            "[annotation] accept_threshold (K_a)",
        ),
        ("accept_threshold = 0.85", "accept_threshold = 1.01", "must be in (0.5, 1]"),
        # a zero budget
        ("questions = 2000", "questions = 0", "[budget] is zero"),
        ("questions = 2000", "questions = -5", "[budget] questions, hours and dollars"),
        ("rounds = 2", "rounds = 0", "[budget] rounds must be at least 1"),
        # a spec field of the wrong type
        ("samples_per_cluster = 15", 'samples_per_cluster = "15"', "must be an integer"),
        ("samples_per_cluster = 15", "samples_per_cluster = 15.0", "must be an integer"),
        ("accept_threshold = 0.85", "accept_threshold = true", "must be a number, got a boolean"),
        ('name = "shapes"', "name = 7", "[campaign] name must be a string"),
        ('classes = ["circle", "square"]', 'classes = "circle"', "classes must be a list"),
        ("questions = 2000", 'questions = "lots"', "[budget] questions must be an integer"),
        # unknown keys and tables
        (
            "redundancy = 1",
            "redundancy = 1\nacept_threshold = 0.9",
            "unknown key 'acept_threshold'",
        ),
        ("rounds = 2", "rounds = 2\n[extra]\nx = 1", "unknown table [extra]"),
        # other ranges
        ("redundancy = 1", "redundancy = 0", "[annotation] redundancy must be at least 1"),
        ("redundancy = 1", 'redundancy = 1\nstrategy = "random"', "strategy 'random'"),
        ("iou_threshold = 0.75", "iou_threshold = 0", "iou_threshold (K_iou)"),
        ('classes = ["circle", "square"]', 'classes = ["a", "a"]', "classes must be unique"),
        ('classes = ["circle", "square"]', "classes = []", "needs classes"),
    ],
)
def test_each_bad_field_is_one_clear_error(folder: Path, old: str, new: str, expected: str) -> None:
    (folder / "cats.json").write_text(
        json.dumps([{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}])
    )
    assert old in GOOD
    assert expected in _error(folder, GOOD.replace(old, new))


def test_missing_tables_and_keys(folder: Path) -> None:
    assert "missing table [budget]" in _error(folder, GOOD.split("[budget]")[0])
    assert "[campaign] images is required" in _error(
        folder, GOOD.replace('images = "pool/images"\n', "")
    )
    assert "needs classes" in _error(folder, GOOD.replace('classes = ["circle", "square"]\n', ""))


def test_file_errors_are_one_line(folder: Path) -> None:
    with pytest.raises(MaskpropError, match="does not exist"):
        load_spec(folder / "nope.toml")
    assert "not valid TOML" in _error(folder, "[campaign\nname=")
    (folder / "cats.json").write_text("{not json")
    text = GOOD.replace('classes = ["circle", "square"]', 'categories = "cats.json"')
    assert "cannot read categories file" in _error(folder, text)


def test_version_and_same_method(folder: Path) -> None:
    base = load_spec(_write(folder, GOOD))
    data = tomllib.loads(GOOD.replace("accept_threshold = 0.85", "accept_threshold = 0.9"))
    data["campaign"]["version"] = 2
    changed = parse_spec(data, folder)
    assert changed.version == 2 and not base.same_method(changed)
    data = tomllib.loads(GOOD.replace("questions = 2000", "questions = 3000"))
    assert base.same_method(parse_spec(data, folder))  # a budget is not a parameter
