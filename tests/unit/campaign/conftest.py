"""A small synthetic image folder with every kind of bad file ``add-images`` must refuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskprop.data.synth import synth_scenes

GOOD_IMAGES = 6


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """``tmp_path/pool/images``: 6 good synthetic PNGs (``maskprop data synth``) in split
    folders, plus: a duplicate of one, a garbage ``.png``, a truncated PNG, a 1500x1500 PNG
    (too many pixels under the tests' 1M limit), a large noise PNG (over the tests' byte
    limit), a symlink to a file outside the folder, and a text file (not an image suffix:
    never a candidate)."""
    synth_scenes(GOOD_IMAGES, tmp_path / "synth", seed=3, size=48, split={"pool": 1.0})
    root = tmp_path / "pool" / "images"
    shutil.copytree(tmp_path / "synth" / "images", root)
    first = sorted(root.rglob("*.png"))[0]
    (root / "z_dups").mkdir()
    shutil.copy(first, root / "z_dups" / "copy_of_first.png")
    (root / "garbage.png").write_bytes(b"this is not an image")
    data = first.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1500, 1500), (9, 9, 9)).save(root / "huge.png")
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "heavy.png")  # ~480 KB of incompressible pixels
    outside = tmp_path / "secret.png"
    shutil.copy(first, outside)
    (root / "escape.png").symlink_to(outside)
    (root / "notes.txt").write_text("not an image")
    return root
