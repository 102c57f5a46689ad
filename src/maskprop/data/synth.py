"""Synthetic scenes with exact instance masks, written as COCO instances (issue #4, item 2).

The whole loop (train a detector on a small labelled set, predict on an unlabelled pool,
cluster, verify, propagate, retrain) has to run and be scored with no downloads, so this module
renders its own dataset: textured backgrounds with several object classes, one shape per class
(disc, square, triangle, star, ring, cross, ...), a class-typical hue with jitter, a random
texture (stripes, noise, gradient, flat), size, aspect, rotation and occlusion.  Objects are
painted in order, so later ones hide earlier ones; the stored masks are the *visible* pixels.
An object whose visible part is too small to recognise is dropped before painting, so every
object pixel in an image belongs to exactly one annotation.

Layout of ``synth_scenes(n, out)``::

    out/images/<split>/<image id:06d>.png
    out/annotations/<split>.json      COCO instances, RLE segmentation (ASCII counts)

Image ids are global (1..n, split blocks in the order of ``split``), so scene ``i`` is
``render_scene(seed, image_id - 1, ...)`` whatever ``n`` is: tests and the demo's simulated
annotator can re-render any scene's ground truth.

This module renders only: COCO encoding, reading and writing are :mod:`maskprop.data.coco`'s.
"""

from __future__ import annotations

import colorsys
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from maskprop.data.coco import encode_masks, instance, write_coco
from maskprop.errors import MaskpropError
from maskprop.progress import Progress

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_SPLIT",
    "SHAPES",
    "Scene",
    "min_visible_area",
    "render_scene",
    "synth_scenes",
]

DEFAULT_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "star", "ring", "cross")
# The paper trains on a small labelled set, predicts on the unlabelled pool and reports mask AP
# on held-out images (Sec. 5.1).
DEFAULT_SPLIT: Mapping[str, float] = {"train": 0.1, "pool": 0.8, "val": 0.1}

MIN_SIZE = 32
MAX_SIZE = 4096
MAX_OBJECTS = 64
# An object survives occlusion if at least this much of it shows: a sliver of a disc is not
# recognisably a disc, and labels nobody could give only teach the detector noise.
MIN_VISIBLE_FRACTION = 0.2
# Object radius as a fraction of the image side (before the aspect jitter).
_RADIUS_RANGE = (0.09, 0.2)
# Chance that an object is placed against an earlier one, so that occlusion is common.
_P_OVERLAP = 0.5
_TEXTURES = ("flat", "stripes", "noise", "gradient")
_CIRCLE_VERTICES = 48
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _regular(n: int, radius: float, phase: float = 0.0) -> NDArray[np.float64]:
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int, outer: float, inner: float) -> NDArray[np.float64]:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(arm: float, half_width: float) -> NDArray[np.float64]:
    a, w = arm, half_width
    return np.array(
        [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
         (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)],
        dtype=np.float64,
    )  # fmt: skip


# Each shape is (filled polygons, hole polygons) in units of the object radius, centred on 0.
# Sizes are chosen so that the shapes cover similar areas at the same radius.
_Shape = tuple[tuple[NDArray[np.float64], ...], tuple[NDArray[np.float64], ...]]
SHAPES: dict[str, _Shape] = {
    "disc": ((_regular(_CIRCLE_VERTICES, 1.0),), ()),
    "square": ((_regular(4, 1.2, np.pi / 4),), ()),
    "triangle": ((_regular(3, 1.35, -np.pi / 2),), ()),
    "star": ((_star(5, 1.4, 0.6),), ()),
    "ring": ((_regular(_CIRCLE_VERTICES, 1.15),), (_regular(_CIRCLE_VERTICES, 0.6),)),
    "cross": ((_cross(1.2, 0.4),), ()),
    "hexagon": ((_regular(6, 1.05),), ()),
    "crescent": (
        (_regular(_CIRCLE_VERTICES, 1.15),),
        (_regular(_CIRCLE_VERTICES, 0.95) + np.array([0.55, 0.0]),),
    ),
}


@dataclass(frozen=True)
class Scene:
    """One rendered scene.

    Attributes
    ----------
    image : uint8[h, w, 3], RGB.
    background : uint8[h, w, 3], the image before any object was painted.
    class_ids : int64[n], index into the ``classes`` the scene was rendered with, in painting
        order (later objects occlude earlier ones).
    visible : bool[n, h, w], the pixels where each object shows: the ground truth. Disjoint;
        ``image == background`` outside their union.
    amodal : bool[n, h, w], each object's whole shape inside the frame, hidden parts included.
    """

    image: NDArray[np.uint8]
    background: NDArray[np.uint8]
    class_ids: NDArray[np.int64]
    visible: NDArray[np.bool_]
    amodal: NDArray[np.bool_]


def min_visible_area(size: int) -> int:
    """Smallest visible area in pixels an object may keep (0.25% of the image, at least 12)."""
    return max(12, round(0.0025 * size * size))


@cache
def _grid(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> NDArray[np.float32]:
    """float32[size, size] in [0, 1]: a random ``cells x cells`` grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    u = np.linspace(0.0, cells, size, dtype=np.float32)
    i0 = np.minimum(u.astype(np.int64), cells - 1)
    f = u - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _hsv(h: float, s: float, v: float) -> NDArray[np.float32]:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _background(rng: np.random.Generator, size: int) -> NDArray[np.float32]:
    yy, xx = _grid(size)
    hue = rng.random()
    # Muted colours under saturated objects: like real clutter, the background is textured but
    # carries no class.
    lo = _hsv(hue, rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.5))
    hi = _hsv(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.3), rng.uniform(0.55, 0.9))
    t = _smooth_noise(rng, size, int(rng.integers(3, 8)))
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        period = size * rng.uniform(0.05, 0.15)
        stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        t = 0.75 * t + 0.125 * (1 + stripes)
    return lo + (hi - lo) * t[..., None]


def _texture(
    rng: np.random.Generator, size: int, cx: float, cy: float, radius: float
) -> NDArray[np.float32]:
    """float32[size, size] in [0, 1], the object's shading pattern."""
    yy, xx = _grid(size)
    kind = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    angle = rng.uniform(0, 2 * np.pi)
    along = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    if kind == "stripes":
        period = max(3.0, radius * rng.uniform(0.35, 0.8))
        wave = np.sin(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi))
        return (0.5 + 0.5 * wave).astype(np.float32, copy=False)
    if kind == "noise":
        cells = max(2, round(size / max(radius * 0.5, 2.0)))
        return _smooth_noise(rng, size, cells)
    if kind == "gradient":
        return np.clip(0.5 + along / (2.4 * radius), 0.0, 1.0)
    return np.full((size, size), 0.5, dtype=np.float32)


def _rasterise(
    shape: _Shape, size: int, cx: float, cy: float, radius: float, aspect: float, angle: float
) -> NDArray[np.bool_]:
    c, s = math.cos(angle), math.sin(angle)
    transform = np.array([[c, s], [-s, c]]) * np.array([[aspect], [1 / aspect]]) * radius
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    fills, holes = shape
    for polygons, value in ((fills, 255), (holes, 0)):
        for poly in polygons:
            xy = poly @ transform + np.array([cx, cy])
            draw.polygon([tuple(p) for p in xy.tolist()], fill=value)
    return np.asarray(canvas) > 0


def render_scene(
    seed: int,
    index: int,
    *,
    size: int = 128,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    max_objects: int = 6,
) -> Scene:
    """Render scene ``index`` of the dataset with this ``seed`` (no files written).

    The scene depends on ``(seed, index, size, classes, max_objects)`` only, not on how many
    scenes the dataset holds.  Class of each object: uniform over ``classes``; shape: the class's
    entry of ``SHAPES``; hue: evenly spaced per class, jittered; radius 9-20% of ``size``;
    half of the objects are placed against an earlier one so that occlusion is common.

    Examples
    --------
    >>> scene = render_scene(0, 0, size=64)
    >>> scene.image.shape, scene.visible.shape[1:]
    ((64, 64, 3), (64, 64))
    >>> bool((scene.visible.sum(axis=0) <= 1).all())
    True
    """
    _check_scene_args(size, classes, max_objects)
    rng = np.random.default_rng([seed, index])
    background = _background(rng, size)
    image = background.copy()
    n = int(rng.integers(min(2, max_objects), max_objects + 1))
    class_ids = rng.integers(len(classes), size=n)
    amodal = np.zeros((n, size, size), dtype=bool)
    # Per object: dark and bright colour (float32[3]) and the texture mixing them (float32[h, w]).
    paints: list[tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]] = []
    centres: list[tuple[float, float, float]] = []
    for k in range(n):
        cls = int(class_ids[k])
        radius = size * rng.uniform(*_RADIUS_RANGE)
        if centres and rng.random() < _P_OVERLAP:
            ox, oy, oradius = centres[int(rng.integers(len(centres)))]
            dist = rng.uniform(0.5, 1.2) * (radius + oradius)
            theta = rng.uniform(0, 2 * np.pi)
            cx = float(np.clip(ox + dist * math.cos(theta), 0, size - 1))
            cy = float(np.clip(oy + dist * math.sin(theta), 0, size - 1))
        else:
            cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2).tolist()
        centres.append((cx, cy, radius))
        aspect = rng.uniform(0.85, 1.15)
        angle = rng.uniform(0, 2 * np.pi)
        amodal[k] = _rasterise(SHAPES[classes[cls]], size, cx, cy, radius, aspect, angle)
        hue = cls / len(classes) + rng.uniform(-0.03, 0.03)
        base = _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.7, 1.0))
        dark = base * rng.uniform(0.3, 0.6)
        paints.append((dark, base, _texture(rng, size, cx, cy, radius)))
    grain = 4.0 * rng.standard_normal(size=(size, size, 3), dtype=np.float32)

    visible = _visible(amodal)
    area, full = visible.sum(axis=(1, 2)), amodal.sum(axis=(1, 2))
    keep = (area >= min_visible_area(size)) & (area >= MIN_VISIBLE_FRACTION * full)
    # Dropping an object only uncovers what lies beneath it, so survivors keep at least the
    # area they were judged on: one pass is enough.
    amodal = amodal[keep]
    visible = _visible(amodal)
    for mask, kept in zip(amodal, np.flatnonzero(keep).tolist(), strict=True):
        dark, bright, t = paints[kept]
        image[mask] = dark + (bright - dark) * t[mask][:, None]
    return Scene(
        image=np.clip(image + grain, 0, 255).astype(np.uint8),
        background=np.clip(background + grain, 0, 255).astype(np.uint8),
        class_ids=class_ids[keep].astype(np.int64),
        visible=visible,
        amodal=amodal,
    )


def _visible(amodal: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Visible parts when objects are painted in order: each pixel goes to its last owner."""
    n = amodal.shape[0]
    if n == 0:
        return amodal.copy()
    owner = np.where(amodal.any(axis=0), n - 1 - np.argmax(amodal[::-1], axis=0), -1)
    return owner[None] == np.arange(n)[:, None, None]


def _check_scene_args(size: int, classes: tuple[str, ...], max_objects: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MaskpropError(f"image size must be {MIN_SIZE}-{MAX_SIZE} pixels, got {size}")
    if len(classes) == 0:
        raise MaskpropError("classes must name at least one shape")
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise MaskpropError(
            f"unknown shape class {unknown[0]!r}; known: {', '.join(sorted(SHAPES))}"
        )
    if len(set(classes)) != len(classes):
        raise MaskpropError(f"classes must be distinct, got {', '.join(classes)}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise MaskpropError(f"max_objects must be 1-{MAX_OBJECTS}, got {max_objects}")


def _split_counts(n_images: int, split: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding; every split with a positive share gets an image if it can."""
    if not split:
        raise MaskpropError("split must name at least one part")
    for name, share in split.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise MaskpropError(f"split name {name!r} is not a plain file name")
        if not (isinstance(share, int | float) and math.isfinite(share) and share >= 0):
            raise MaskpropError(f"split share of {name!r} must be a number >= 0, got {share!r}")
    if abs(sum(split.values()) - 1.0) > 1e-6:
        raise MaskpropError(f"split shares must sum to 1, got {sum(split.values()):g}")
    raw = {name: n_images * share for name, share in split.items()}
    counts = {name: math.floor(r) for name, r in raw.items()}
    by_remainder = sorted(raw, key=lambda name: counts[name] - raw[name])
    for name in by_remainder[: n_images - sum(counts.values())]:
        counts[name] += 1
    for name, share in split.items():
        largest = max(counts, key=lambda k: counts[k])
        if share > 0 and counts[name] == 0 and counts[largest] > 1:
            counts[largest] -= 1
            counts[name] += 1
    return counts


def _prepare(out: Path, splits: list[str]) -> None:
    try:
        for name in splits:
            (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        probe = out / "annotations" / ".maskprop-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise MaskpropError(f"cannot write to output directory {out}: {exc.strerror}") from None


def _annotations(scene: Scene, image_id: int, first_id: int) -> list[dict[str, Any]]:
    size = scene.visible.shape[1:]
    return [
        instance(
            first_id + k,
            image_id,
            int(scene.class_ids[k]) + 1,
            {"size": list(size), "counts": counts},
        )
        for k, counts in enumerate(encode_masks(scene.visible))
    ]


def synth_scenes(
    n_images: int,
    out: Path,
    *,
    seed: int = 0,
    size: int = 128,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    max_objects: int = 6,
    split: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Render ``n_images`` synthetic scenes under ``out`` as PNGs plus one COCO file per split.

    Parameters
    ----------
    n_images : number of images, >= 1.
    out : output directory (created); writes ``images/<split>/<id:06d>.png`` and
        ``annotations/<split>.json``.  Files of an earlier run with the same names are replaced.
    seed : the dataset; image ``i`` (id ``i + 1``) is ``render_scene(seed, i, ...)``.
    size : image side in pixels, 32-4096 (images are square).
    classes : shape names from ``SHAPES``, one object class each; COCO category id = index + 1.
    max_objects : objects placed per image before occlusion drops some (at least 2 are placed
        when ``max_objects >= 2``).
    split : share of images per split, summing to 1; default ``DEFAULT_SPLIT``.  Splits take
        consecutive image ids in the mapping's order.
    progress : called as ``progress("images", done, n_images)``.

    Returns
    -------
    dict: ``out``, ``seed``, ``size``, ``classes``, ``images``, ``instances``, ``per_class``
    (instances per class name) and ``splits``: per split ``images``, ``instances``,
    ``per_class``, ``annotations`` (the JSON path) and ``image_dir``.

    Raises
    ------
    MaskpropError : bad arguments or an output directory that cannot be written.

    Examples
    --------
    >>> summary = synth_scenes(20, tmp_path / "synth", size=64)  # doctest: +SKIP
    >>> COCO(summary["splits"]["val"]["annotations"]).getAnnIds()  # doctest: +SKIP
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise MaskpropError(f"number of images must be a positive integer, got {n_images!r}")
    if not isinstance(seed, int) or seed < 0:
        raise MaskpropError(f"seed must be an integer >= 0, got {seed!r}")
    classes = tuple(classes)
    _check_scene_args(size, classes, max_objects)
    counts = _split_counts(n_images, DEFAULT_SPLIT if split is None else split)
    out = Path(out)
    _prepare(out, list(counts))

    categories = [
        {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)
    ]
    summary: dict[str, Any] = {
        "out": str(out),
        "seed": seed,
        "size": size,
        "classes": list(classes),
        "images": n_images,
        "instances": 0,
        "per_class": dict.fromkeys(classes, 0),
        "splits": {},
    }
    image_id = ann_id = 1
    for name, count in counts.items():
        image_dir = out / "images" / name
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        per_class = dict.fromkeys(classes, 0)
        for _ in range(count):
            scene = render_scene(
                seed, image_id - 1, size=size, classes=classes, max_objects=max_objects
            )
            file_name = f"{image_id:06d}.png"
            try:
                Image.fromarray(scene.image).save(image_dir / file_name, compress_level=1)
            except OSError as exc:
                raise MaskpropError(f"cannot write {image_dir / file_name}: {exc}") from None
            images.append({"id": image_id, "width": size, "height": size, "file_name": file_name})
            anns = _annotations(scene, image_id, ann_id)
            annotations.extend(anns)
            ann_id += len(anns)
            for cls in scene.class_ids.tolist():
                per_class[classes[cls]] += 1
            if progress is not None:
                progress("images", image_id, n_images)
            image_id += 1
        ann_path = out / "annotations" / f"{name}.json"
        write_coco(
            ann_path,
            info={
                "description": f"maskprop synthetic scenes, split {name}",
                "version": "1.0",
                "maskprop": {"seed": seed, "size": size, "max_objects": max_objects},
            },
            images=images,
            annotations=annotations,
            categories=categories,
        )
        summary["splits"][name] = {
            "images": count,
            "instances": len(annotations),
            "per_class": per_class,
            "annotations": str(ann_path),
            "image_dir": str(image_dir),
        }
        summary["instances"] += len(annotations)
        for cls_name, c in per_class.items():
            summary["per_class"][cls_name] += c
    return summary
