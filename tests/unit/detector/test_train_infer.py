"""Training, checkpoints (weights_only, resumable, clear errors) and inference filters."""

import json

import numpy as np
import pytest
import torch
from maskprop_detector.data import InstanceDataset, LabelledSet, read_image
from maskprop_detector.infer import detect
from maskprop_detector.model import DetectorConfig, build_model
from maskprop_detector.train import (
    TrainConfig,
    load_model,
    read_checkpoint,
    save_checkpoint,
    train,
)
from pycocotools import mask as mask_utils

from maskprop.data.synth import synth_scenes
from maskprop.errors import MaskpropError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth_scenes(12, out, size=64, classes=("disc", "square"), max_objects=3)
    return out


def _set(synth, split="train"):
    return LabelledSet.from_coco(synth / f"annotations/{split}.json", synth / f"images/{split}")


def test_dataset_targets_match_the_coco_file(synth, tiny_cfg):
    data = _set(synth, "pool")
    ds = InstanceDataset(data, tiny_cfg.classes)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    anns = data.annotations_of(int(data.images[0]["id"]))
    assert target["masks"].shape[0] == len(anns) == target["boxes"].shape[0]
    for m, a in zip(target["masks"], anns, strict=True):
        seg = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        assert np.array_equal(m.numpy(), mask_utils.decode(seg))


def test_image_paths_cannot_leave_the_image_folder(synth):
    with pytest.raises(MaskpropError, match="leaves the image folder"):
        read_image(synth / "images/train", "../../annotations/train.json")
    with pytest.raises(MaskpropError, match="image not found"):
        read_image(synth / "images/train", "nope.png")


def test_unknown_category_is_a_clear_error(synth):
    with pytest.raises(MaskpropError, match="not one of the detector's classes"):
        InstanceDataset(_set(synth), ("disc", "star"))


class _Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_and_a_finished_one_is_not_repeated(synth, tiny_cfg, tmp_path):
    ds = InstanceDataset(_set(synth, "pool"), tiny_cfg.classes)
    ckpt = tmp_path / "m.pt"
    tcfg = TrainConfig(steps=3, batch_size=2, checkpoint_every=1)

    def stop_at_2(_label, done, _total):
        if done == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train(build_model(tiny_cfg), tiny_cfg, ds, tcfg, checkpoint=ckpt, progress=stop_at_2)
    # killed during step 2, before its checkpoint: step 1's state is on disk
    assert read_checkpoint(ckpt)["step"] == 1 and "optimizer" in read_checkpoint(ckpt)
    seen = []
    model = build_model(tiny_cfg)
    train(model, tiny_cfg, ds, tcfg, checkpoint=ckpt, progress=lambda _l, d, _t: seen.append(d))
    assert seen == [1, 2, 3]  # continued after step 1, did not start over
    finished = read_checkpoint(ckpt)
    assert finished["step"] == 3 and "optimizer" not in finished  # weights only when done
    again = build_model(tiny_cfg)
    assert train(again, tiny_cfg, ds, tcfg, checkpoint=ckpt) == {}
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_round_trip_and_errors(tiny_cfg, tmp_path):
    model = build_model(tiny_cfg)
    save_checkpoint(tmp_path / "w.pt", model, tiny_cfg)
    loaded, cfg = load_model(tmp_path / "w.pt")
    assert cfg == tiny_cfg
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(MaskpropError, match="detector weights not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MaskpropError, match="not a maskprop detector checkpoint"):
        load_model(tmp_path / "junk.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoints_never_unpickle_code(tmp_path, capsys):
    torch.save({"format": "maskprop-detector-1", "model": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MaskpropError):
        read_checkpoint(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out


def test_detect_filters_and_encodes_rle(synth):
    cfg = DetectorConfig(
        classes=("disc", "square"), image_size=64, fpn_channels=16, feature_dim=8,
        score_threshold=0.0, min_box_area=0.0,
    )  # fmt: skip
    model = build_model(cfg)
    data = _set(synth, "pool")
    items = [(int(im["id"]), read_image(data.image_root, im["file_name"])) for im in data.images]
    dets = detect(model, cfg, items, batch_size=3)
    assert len(dets) > 0
    assert set(dets.image_ids.tolist()) <= {i for i, _ in items}
    assert dets.features.shape == (len(dets), 8)
    assert ((dets.scores > 0) & (dets.scores <= 1)).all()
    for rle in dets.rles()[:20]:
        m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert m.shape == (64, 64) and m.any()
        json.dumps(rle)  # ASCII counts: JSON-ready
    strict = DetectorConfig(**{**cfg.to_dict(), "classes": cfg.classes, "score_threshold": 0.99})
    assert len(detect(model, strict, items)) < len(dets)
