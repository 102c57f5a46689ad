"""The COCO module: the RLE codec against pycocotools, the reader's validation (one-line
errors, never a traceback) and the writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskprop.data import coco
from maskprop.data.coco import load_coco_instances
from maskprop.data.synth import synth_scenes
from maskprop.errors import MaskpropError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth")
    return out, synth_scenes(12, out, seed=5, size=48)


# --- load_coco_instances -------------------------------------------------------------------


def _doc() -> dict[str, Any]:
    square = np.zeros((4, 5, 1), dtype=np.uint8, order="F")
    square[1:3, 1:4] = 1
    counts = mask_utils.encode(square)[0]["counts"].decode("ascii")
    return {
        "images": [{"id": 7, "width": 5, "height": 4, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "disc"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1,
             "segmentation": {"size": [4, 5], "counts": counts}},
            {"id": 2, "image_id": 7, "category_id": 1,
             "segmentation": [[0.0, 0.0, 3.0, 0.0, 3.0, 2.0, 0.0, 2.0]], "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [4, 5], "counts": [5, 6, 9]}},
        ],
    }  # fmt: skip


def _write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_load_coco_instances_normalises_to_rle_with_area_and_bbox(tmp_path, dataset):
    images, anns, cats = load_coco_instances(_write(tmp_path, _doc()))
    assert [i["id"] for i in images] == [7] and cats == [{"id": 1, "name": "disc"}]
    assert [a["area"] for a in anns] == [6.0, mask_utils.area(_rle(anns[1])), 6.0]
    assert anns[0]["bbox"] == [1.0, 1.0, 3.0, 2.0]
    assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)
    assert anns[2]["iscrowd"] == 1 and anns[0]["iscrowd"] == 0
    out, summary = dataset
    _, anns, _ = load_coco_instances(out / "annotations" / "pool.json")
    assert len(anns) == summary["splits"]["pool"]["instances"]


def _rle(ann: dict[str, Any]) -> dict[str, Any]:
    return {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}


def _broken(mutate: Any) -> dict[str, Any]:
    doc = _doc()
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("{not json", "not valid JSON"),
        ([], "JSON object"),
        (_broken(lambda d: d.pop("categories")), "missing key 'categories'"),
        (_broken(lambda d: d["images"][0].pop("width")), "'width'"),
        (_broken(lambda d: d["images"].append(dict(d["images"][0]))), "duplicate image id 7"),
        (_broken(lambda d: d["annotations"][0].update(image_id=8)), "image_id 8 is not in"),
        (_broken(lambda d: d["annotations"][0].update(category_id=2)), "category_id 2"),
        (_broken(lambda d: d["annotations"][1].update(id=1)), "duplicate annotation id"),
        (_broken(lambda d: d["annotations"][0].pop("segmentation")), "missing 'segmentation'"),
        (
            _broken(lambda d: d["annotations"][0]["segmentation"].update(counts="0")),
            "do not decode to 4x5",
        ),
        (
            _broken(lambda d: d["annotations"][0]["segmentation"].update(counts="5~~")),
            "do not decode",
        ),
        (
            _broken(lambda d: d["annotations"][0]["segmentation"].update(size=[5, 4])),
            "does not match its image",
        ),
        (
            _broken(lambda d: d["annotations"][2]["segmentation"].update(counts=[5, 6])),
            "sum to 11",
        ),
        (_broken(lambda d: d["annotations"][1].update(segmentation=[[1, 2, 3]])), "polygon"),
        (_broken(lambda d: d["annotations"][1].update(segmentation=[])), "empty"),
        (_broken(lambda d: d["annotations"][1].update(segmentation="x")), "segmentation must"),
        (_broken(lambda d: d["annotations"][1].update(bbox=[0, 0, -1, 2])), "'bbox'"),
        (_broken(lambda d: d["annotations"][1].update(iscrowd=2)), "'iscrowd'"),
    ],
)
def test_load_coco_instances_rejects_broken_files(tmp_path, doc, needle):
    path = _write(tmp_path, doc)
    with pytest.raises(MaskpropError, match=needle) as info:
        load_coco_instances(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_coco_instances_missing_file(tmp_path):
    with pytest.raises(MaskpropError, match="not found"):
        load_coco_instances(tmp_path / "nope.json")


# --- the RLE codec against pycocotools ------------------------------------------------------


def _pycoco_counts(mask: np.ndarray) -> bytes:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda hw: arrays(np.bool_, hw, elements=st.booleans())
)


@settings(max_examples=300, deadline=None)
@given(masks)
def test_codec_round_trips_and_matches_pycocotools_on_random_masks(mask):
    h, w = mask.shape
    counts = _pycoco_counts(mask)
    runs = coco.mask_to_runs(mask)
    assert coco.runs_to_counts(runs) == counts
    assert np.array_equal(coco.counts_to_runs(counts), runs)
    assert np.array_equal(coco.counts_to_runs(counts.decode("ascii")), runs)
    assert np.array_equal(coco.runs_to_mask(runs, h, w), mask)
    assert np.array_equal(coco.decode_rle(h, w, counts), mask)
    assert coco.encode_masks(mask[None]) == [counts]
    assert coco.rle_problem(h, w, counts) is None


def test_codec_handles_long_runs_and_many_masks():
    mask = np.zeros((1500, 2100), dtype=bool)
    mask[7:1490, 3:2099] = True
    mask[0, 0] = True
    counts = _pycoco_counts(mask)
    assert coco.runs_to_counts(coco.mask_to_runs(mask)) == counts
    assert np.array_equal(coco.decode_rle(1500, 2100, counts), mask)
    rng = np.random.default_rng(0)
    many = rng.random((9, 13, 7)) < 0.4
    assert coco.encode_masks(many) == [_pycoco_counts(m) for m in many]
    assert coco.encode_masks(np.zeros((0, 4, 4), bool)) == []


def test_boxes_are_the_masks_extent_in_x1_y1_x2_y2():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    counts = coco.encode_masks(np.stack([mask, np.zeros_like(mask)]))
    boxes = coco.boxes_xyxy([10, 10], [12, 12], counts)
    assert boxes.dtype == np.float32
    assert boxes.tolist() == [[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("counts", "needle"),
    [
        (b"52~", "alphabet"),
        ("5é", "alphabet"),
        (b"52`", "end inside a run"),
        (b"0" + b"o" * 9 + b"0", "too long"),
        (b"0@", "negative run"),
    ],
)
def test_malformed_counts_are_named_not_decoded(counts, needle):
    with pytest.raises(MaskpropError, match=needle):
        coco.counts_to_runs(counts)
    assert needle in coco.rle_problem(4, 5, counts)


def test_runs_that_miss_the_image_size_are_refused():
    counts = _pycoco_counts(np.ones((4, 5), bool))
    assert "cover 20 pixels, size 4x6 has 24" in coco.rle_problem(4, 6, counts)
    assert "is empty" in coco.rle_problem(0, 5, counts)
    with pytest.raises(MaskpropError, match="cover 20 pixels"):
        coco.decode_rle(4, 6, counts)


# --- writing --------------------------------------------------------------------------------


def test_written_files_load_in_pycocotools_and_pass_the_reader(tmp_path):
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:7] = True
    seg = {"size": [6, 8], "counts": coco.encode_masks(mask[None])[0]}

    def annotations():  # a generator: the writer streams
        yield coco.instance(1, 3, 1, seg, score=0.5)

    path = tmp_path / "out.json"
    summary = coco.write_coco(
        path,
        info={"description": "t"},
        images=iter([{"id": 3, "width": 8, "height": 6, "file_name": "a.png"}]),
        annotations=annotations(),
        categories=[{"id": 1, "name": "disc"}],
    )
    assert summary == {"images": 1, "annotations": 1, "categories": 1}
    gt = COCO(str(path))
    ann = gt.loadAnns(gt.getAnnIds())[0]
    assert ann["area"] == 15.0 and ann["bbox"] == [2.0, 1.0, 5.0, 3.0] and ann["score"] == 0.5
    assert np.array_equal(gt.annToMask(ann).astype(bool), mask)
    _, anns, _ = load_coco_instances(path)
    assert anns[0]["segmentation"] == {"size": [6, 8], "counts": seg["counts"].decode()}
    results = tmp_path / "results.json"
    assert coco.write_coco_results(results, [{**ann, "id": None}]) == 1
    assert json.loads(results.read_text())[0]["score"] == 0.5


def test_an_unwritable_coco_file_is_a_clear_error_and_leaves_nothing(tmp_path):
    (tmp_path / "plain").write_text("a file, not a folder")
    with pytest.raises(MaskpropError, match="cannot write"):
        coco.write_coco(tmp_path / "plain" / "x.json", images=[], annotations=[], categories=[])

    def failing():
        yield {"id": 1}
        raise OSError(28, "No space left on device")

    with pytest.raises(MaskpropError, match="No space left"):
        coco.write_coco(tmp_path / "x.json", images=failing(), annotations=[], categories=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def _corrupt(counts: bytes, edit: tuple[int, int, int]) -> bytes:
    kind, where, byte = edit
    if kind == 0 or not counts:
        return counts + bytes([byte])
    i = where % len(counts)
    if kind == 1:
        return counts[:i] + bytes([byte]) + counts[i + 1 :]
    return counts[:i]


# (append, replace or cut, where, which byte): the ways a string breaks in transit.
edits = (st.integers(0, 2), st.integers(0, 99), st.integers(40, 130))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(masks, st.none() | st.tuples(*edits), st.integers(-1, 1)),
        min_size=1,
        max_size=12,
    )
)
def test_well_formed_checks_a_batch_exactly_as_rle_problem_checks_each(items):
    heights, widths, counts = [], [], []
    for mask, edit, dh in items:
        c = _pycoco_counts(mask)
        heights.append(mask.shape[0] + dh)
        widths.append(mask.shape[1])
        counts.append(c if edit is None else _corrupt(c, edit))
    expected = [
        coco.rle_problem(h, w, c) is None for h, w, c in zip(heights, widths, counts, strict=True)
    ]
    assert coco.well_formed(heights, widths, counts).tolist() == expected
    assert coco.well_formed([], [], []).tolist() == []


def test_an_rle_larger_than_any_image_is_refused_before_decoding():
    """One run of 10^10 pixels is a few bytes of counts: refused, never allocated."""
    counts = coco.runs_to_counts(np.array([100_000 * 100_000], dtype=np.int64))
    assert "exceeds" in coco.rle_problem(100_000, 100_000, counts)
    assert not coco.well_formed([100_000], [100_000], [counts])[0]
    with pytest.raises(MaskpropError, match="exceeds"):
        coco.decode_rle(100_000, 100_000, counts)
