"""Pools of (f, s, IoU) triplets for the large-scale simulation of the paper's Sec. 5.2.

Two sources:

* ``ade_like_pool``: a built-in generator shaped after what the paper reports of PointRend
  predictions on ADE20K: long-tailed class sizes, masks that come in groups of similar
  appearance and similar quality (clusters that can be pure or impure), and a mask score s
  that tracks quality weakly per mask but strongly per cluster (Fig. 4a vs 4b).
* ``fitted_pool``: the paper's own recipe, a class-specific Gaussian mixture fitted to a table
  of real predictions (``load_prediction_table``) and sampled at a larger scale.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn.mixture import GaussianMixture

from maskprop.errors import MaskpropError
from maskprop.simulate.pool import MaskPool

__all__ = [
    "ADE_THING_CLASSES",
    "ADE_TRAIN_IMAGES",
    "ade_class_sizes",
    "ade_like_class",
    "ade_like_pool",
    "ade_like_pool_with_components",
    "fitted_pool",
    "load_prediction_table",
    "save_prediction_table",
    "zipf_class_sizes",
]

# The 100 "thing" classes of the ADE20K instance-segmentation benchmark, the classes the paper
# annotates on Places (Sec. 6).  The order loosely puts common objects first; ``ade_like_pool``
# gives larger classes to earlier names, but its sizes are a synthetic Zipf law, not ADE20K
# counts.
ADE_THING_CLASSES: tuple[str, ...] = (
    "person", "windowpane", "chair", "car", "painting", "lamp", "cabinet", "light", "cushion",
    "table", "door", "box", "book", "flower", "curtain", "bottle", "pot", "signboard", "sconce",
    "streetlight", "pole", "vase", "shelf", "pillow", "armchair", "bed", "sofa", "desk", "seat",
    "mirror", "bench", "plate", "glass", "basket", "fence", "railing", "column", "bag", "towel",
    "sink", "clock", "stool", "bicycle", "truck", "boat", "bus", "van", "tray", "chandelier",
    "coffee table", "wardrobe", "chest of drawers", "counter", "countertop", "bookcase", "toilet",
    "bathtub", "refrigerator", "stove", "oven", "microwave", "dishwasher", "washer", "hood",
    "fireplace", "stairs", "step", "case", "pool table", "screen door", "palm", "kitchen island",
    "computer", "monitor", "screen", "television receiver", "swivel chair", "arcade machine",
    "awning", "booth", "airplane", "apparel", "bannister", "ottoman", "ship", "fountain",
    "plaything", "barrel", "minibike", "ball", "food", "trade name", "animal", "sculpture",
    "traffic light", "ashcan", "fan", "bulletin board", "radiator", "flag",
)  # fmt: skip

_MIN_CLASS_SIZE = 10
# Shape of the class sizes at the paper's scale: the number of ADE20K training images (of
# 20,210) in which each of the 100 thing classes appears, the "Train" column of the SceneParsing
# benchmark's objectInfo150.csv (CSAILVision/sceneparsing; the class names there are WordNet
# synonym lists, matched here to ADE_THING_CLASSES by their first word).  The paper predicts
# masks on Places with a detector trained on ADE20K, so Places' classes keep ADE20K's relative
# frequencies, scaled by the image ratio (~10M Places images / 20k ADE20K images, ~500x):
# ``ade_class_sizes`` scales this shape to the requested pool.  At 100M masks it gives
# 7.0M masks to the largest class and 53k to the smallest (door and barrel); these are image
# counts, so classes with several instances per image (chair, book) are if anything
# under-represented in the head.
ADE_TRAIN_IMAGES: dict[str, int] = {
    "person": 5075, "windowpane": 4688, "chair": 3261, "car": 3164, "painting": 3296,
    "lamp": 3089, "cabinet": 2874, "light": 2510, "cushion": 1453, "table": 4269, "door": 6666,
    "box": 1440, "book": 1112, "flower": 1309, "curtain": 2149, "bottle": 965, "pot": 1193,
    "signboard": 2650, "sconce": 1020, "streetlight": 1989, "pole": 1003, "vase": 1282,
    "shelf": 1516, "pillow": 930, "armchair": 1172, "bed": 1906, "sofa": 1191, "desk": 698,
    "seat": 1292, "mirror": 1847, "bench": 659, "plate": 570, "glass": 504, "basket": 622,
    "fence": 1386, "railing": 804, "column": 800, "bag": 531, "towel": 492, "sink": 1181,
    "clock": 775, "stool": 465, "bicycle": 347, "truck": 440, "boat": 304, "bus": 248,
    "van": 557, "tray": 453, "chandelier": 583, "coffee table": 792, "wardrobe": 380,
    "chest of drawers": 549, "counter": 367, "countertop": 331, "bookcase": 275, "toilet": 395,
    "bathtub": 404, "refrigerator": 402, "stove": 531, "oven": 435, "microwave": 319,
    "dishwasher": 246, "washer": 77, "hood": 268, "fireplace": 468, "stairs": 880, "step": 266,
    "case": 172, "pool table": 198, "screen door": 139, "palm": 369, "kitchen island": 144,
    "computer": 265, "monitor": 217, "screen": 108, "television receiver": 618,
    "swivel chair": 324, "arcade machine": 68, "awning": 533, "booth": 71, "airplane": 135,
    "apparel": 178, "bannister": 452, "ottoman": 307, "ship": 52, "fountain": 99,
    "plaything": 340, "barrel": 50, "minibike": 282, "ball": 136, "food": 116,
    "trade name": 418, "animal": 97, "sculpture": 285, "traffic light": 528, "ashcan": 671,
    "fan": 397, "bulletin board": 206, "radiator": 178, "flag": 421,
}  # fmt: skip
# Zipf exponent of class sizes: ~1 gives ADE20K's "a few thousand down to a few hundred"
# instances per class (Sec. 5.2) over 100 classes.
_ZIPF_EXPONENT = 1.0
# A class of n masks holds about n / 150 appearance groups (mixture components).
_MASKS_PER_COMPONENT = 150
_MIN_COMPONENTS, _MAX_COMPONENTS = 2, 300
# IoU = _IOU_LOW + _IOU_SPAN * Beta draw: the paper keeps predictions with score > 0.2, which
# leaves almost no mask below IoU 0.1, and detectors hardly ever exceed 0.98.
_IOU_LOW, _IOU_SPAN = 0.08, 0.90
# Same idea for s: kept predictions have s > 0.2.
_SCORE_LOW, _SCORE_SPAN = 0.2, 0.8
_LOGIT_EPS = 1e-4
# Rows of features generated at once (float32 blocks of ~4 MB at d = 32).
_FEATURE_BLOCK = 32768


def zipf_class_sizes(
    n_masks: int,
    n_classes: int,
    max_class_size: int,
    min_class_size: int = _MIN_CLASS_SIZE,
    exponent: float = _ZIPF_EXPONENT,
) -> NDArray[np.int64]:
    """Long-tailed class sizes that sum exactly to ``n_masks``.

    Class ``k`` (0-based) gets ``min_class_size`` plus a share of the rest proportional to
    ``(k + 1) ** -exponent``; shares above the cap are clipped and their excess is handed to the
    other classes (water filling), then rounded by largest remainder.

    Parameters
    ----------
    n_masks : total number of masks, at least ``n_classes * min_class_size`` and at most
        ``n_classes * max_class_size``.
    n_classes : number of classes, at least 1.
    max_class_size : cap on any class.
    min_class_size : floor on any class.
    exponent : Zipf exponent, >= 0.

    Returns
    -------
    int64[n_classes], non-increasing, summing to ``n_masks``.

    Examples
    --------
    >>> zipf_class_sizes(100, 3, max_class_size=45).tolist()  # class 0 capped
    [45, 31, 24]
    """
    if n_classes < 1:
        raise MaskpropError(f"n_classes must be at least 1, got {n_classes}")
    if n_masks < 1:
        raise MaskpropError(f"n_masks must be at least 1, got {n_masks}")
    if min_class_size < 1 or max_class_size < min_class_size:
        raise MaskpropError(
            f"class size bounds must satisfy 1 <= min ({min_class_size}) <= max ({max_class_size})"
        )
    if exponent < 0:
        raise MaskpropError(f"Zipf exponent must not be negative, got {exponent}")
    if not n_classes * min_class_size <= n_masks <= n_classes * max_class_size:
        raise MaskpropError(
            f"cannot split {n_masks} masks into {n_classes} classes of "
            f"{min_class_size}..{max_class_size} masks each"
        )
    weights = np.arange(1, n_classes + 1, dtype=np.float64) ** -exponent
    return _sizes_from_weights(n_masks, weights, max_class_size, min_class_size)


def _sizes_from_weights(
    n_masks: int, weights: NDArray[np.float64], max_class_size: int, min_class_size: int
) -> NDArray[np.int64]:
    """``min_class_size`` each plus the rest in proportion to ``weights``, capped at
    ``max_class_size`` (the excess water-filled to the others), largest-remainder rounding."""
    n_classes = weights.size
    room = max_class_size - min_class_size
    remaining = float(n_masks - n_classes * min_class_size)
    share = np.zeros(n_classes)
    free = np.ones(n_classes, dtype=bool)
    while free.any():
        proposal = remaining * np.where(free, weights, 0.0) / weights[free].sum()
        over = free & (proposal > room)
        if not over.any():
            share[free] = proposal[free]
            break
        share[over] = room
        free &= ~over
        remaining -= room * int(over.sum())
    extra = np.floor(share + 1e-9).astype(np.int64)
    deficit = n_masks - n_classes * min_class_size - int(extra.sum())
    fraction = np.where(extra < room, share - extra, -1.0)
    extra[np.argsort(-fraction, kind="stable")[:deficit]] += 1
    return extra + min_class_size


def ade_class_sizes(
    n_masks: int, n_classes: int, min_class_size: int = _MIN_CLASS_SIZE
) -> NDArray[np.int64]:
    """Class sizes shaped like ADE20K's thing classes (``ADE_TRAIN_IMAGES``), summing exactly
    to ``n_masks``.

    Class ``k`` (0-based) gets the share of the k-th most frequent ADE20K class; for another
    number of classes than 100 the sorted log-frequencies are interpolated over rank, so the
    head-to-tail ratio (~130x) stays the same.  Every class gets at least ``min_class_size``;
    rounding is by largest remainder.

    Parameters
    ----------
    n_masks : total masks, at least ``n_classes * min_class_size``.
    n_classes : number of classes, at least 1.
    min_class_size : floor on any class.

    Returns
    -------
    int64[n_classes], non-increasing, summing to ``n_masks``.

    Examples
    --------
    >>> sizes = ade_class_sizes(100_000_000, 100)
    >>> int(sizes.sum()), int(sizes[0]), int(sizes[-1])
    (100000000, 7039828, 52814)
    """
    if n_classes < 1:
        raise MaskpropError(f"n_classes must be at least 1, got {n_classes}")
    if n_masks < n_classes * min_class_size:
        raise MaskpropError(
            f"cannot split {n_masks} masks into {n_classes} classes of at least "
            f"{min_class_size} masks each"
        )
    shape = np.log(np.sort(np.array(list(ADE_TRAIN_IMAGES.values()), dtype=np.float64))[::-1])
    rank = np.linspace(0.0, 1.0, n_classes) if n_classes > 1 else np.zeros(1)
    weights = np.exp(np.interp(rank, np.linspace(0.0, 1.0, shape.size), shape))
    # Any cap at or above n_masks never binds: water filling reduces to proportional shares.
    return _sizes_from_weights(n_masks, weights, n_masks, min_class_size)


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    p = np.clip(p, _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def _class_names(n_classes: int) -> tuple[str, ...]:
    if n_classes <= len(ADE_THING_CLASSES):
        return ADE_THING_CLASSES[:n_classes]
    return tuple(f"class_{k:03d}" for k in range(n_classes))


def _class_rng(seed: int, class_id: int) -> np.random.Generator:
    """The random stream of one class: independent of every other class, of the class count
    and of the worker that generates it."""
    return np.random.default_rng(np.random.SeedSequence([seed, class_id]))


def ade_like_class(
    class_id: int, n_masks: int, seed: int, dim: int = 32
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]:
    """The masks of one class of the ADE-like pool, generated on their own.

    Every class draws from its own stream (``seed`` and ``class_id``), so a class is the same
    whichever other classes exist, in whatever process it is generated, and a pool of any size
    is produced one class at a time without holding the others.  Arrays are float32; float64
    temporaries are of n entries, never n x d.

    Within the class, masks come from latent appearance groups (about one per 150 masks, 2 to
    300) of long-tailed sizes hanging under a few super-groups; each group has a latent quality
    level and mask IoUs are Beta draws around it (pure-good, impure and pure-bad groups); the
    score s follows the group's quality closely but the mask's own IoU only weakly (paper Fig.
    4a/b); features are group centres plus per-mask noise and a weak direction encoding the
    mask's own IoU.  The constants were set against what the paper shows of its detector,
    never against the method's results (see ``ade_like_pool_with_components``).

    Returns
    -------
    features float32[n, dim], scores float32[n], ious float32[n], component int64[n] (the
    latent group, 0-based within the class; for checking the generator only).
    """
    if n_masks < 1:
        raise MaskpropError(f"a class needs at least 1 mask, got {n_masks}")
    if dim < 1:
        raise MaskpropError(f"dim must be at least 1, got {dim}")
    rng = _class_rng(seed, class_id)
    n_comp = int(np.clip(round(n_masks / _MASKS_PER_COMPONENT), _MIN_COMPONENTS, _MAX_COMPONENTS))
    n_super = math.ceil(math.sqrt(n_comp))
    comp_super = np.floor(rng.random(n_comp) * n_super).astype(np.int64)

    # Long-tailed component sizes: lognormal weights, each mask picks a component.
    weight = rng.lognormal(0.0, 1.0, n_comp)
    upper = np.cumsum(weight) / weight.sum()
    upper[-1] = 1.0
    component = np.searchsorted(upper, rng.random(n_masks), side="right")
    np.minimum(component, n_comp - 1, out=component)

    # Quality: class difficulty + super-group + component (the paper's Fig. 4 calibration:
    # at 200k masks / 100 classes ~46% of masks reach IoU 0.75, per-mask corr(s, IoU) ~0.44,
    # per-group corr ~0.9, groups with Q >= 0.85 mostly have mean s > 0.7).
    class_logit = rng.normal(1.0, 0.6)
    super_logit = rng.normal(0.0, 0.7, n_super)
    comp_logit = class_logit + super_logit[comp_super] + rng.normal(0.0, 0.8, n_comp)
    level = _sigmoid(comp_logit)
    concentration = np.exp(rng.normal(math.log(10.0), 0.35, n_comp))
    draw = rng.beta((level * concentration)[component], ((1.0 - level) * concentration)[component])
    ious = _IOU_LOW + _IOU_SPAN * draw

    # Score: s = class confidence x predicted IoU (Sec. 4.1): a per-component term following
    # the component's quality, a per-class bias, a small pull towards the mask's own IoU and
    # large per-mask noise (weak per-mask, strong per-cluster correlation).
    own = _logit(draw) - comp_logit[component]
    del draw
    score_logit = (
        -0.4
        + 0.9 * comp_logit[component]
        + rng.normal(0.0, 0.25)
        + rng.normal(0.0, 0.3, n_comp)[component]
        + 0.15 * own
        + rng.normal(0.0, 1.8, n_masks)
    )
    del own
    scores = (_SCORE_LOW + _SCORE_SPAN * _sigmoid(score_logit)).astype(np.float32)
    del score_logit

    # Features: component centres around super-group centres around a class centre,
    # isotropic per-mask noise of a per-component width, and a weak per-class direction along
    # which the mask's own IoU moves it.  Filled in float32 blocks of rows.
    class_centre = rng.normal(0.0, 3.0, dim)
    super_centre = class_centre + rng.normal(0.0, 1.0, (n_super, dim))
    comp_centre = (super_centre[comp_super] + rng.normal(0.0, 0.7, (n_comp, dim))).astype(
        np.float32
    )
    width = (0.8 * np.exp(rng.normal(0.0, 0.25, n_comp))).astype(np.float32)
    direction = rng.normal(size=dim)
    direction = (direction / np.linalg.norm(direction)).astype(np.float32)
    shift = (0.8 * (ious - ious.mean())).astype(np.float32)
    features = np.empty((n_masks, dim), dtype=np.float32)
    for lo in range(0, n_masks, _FEATURE_BLOCK):
        hi = min(lo + _FEATURE_BLOCK, n_masks)
        comp = component[lo:hi]
        block = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        block *= width[comp, None]
        block += comp_centre[comp]
        block += shift[lo:hi, None] * direction
        features[lo:hi] = block
    return features, scores, ious.astype(np.float32), component.astype(np.int64)


def ade_like_pool_with_components(
    n_masks: int,
    n_classes: int,
    seed: int,
    dim: int = 32,
    max_class_size: int = 30000,
) -> tuple[MaskPool, NDArray[np.int64]]:
    """``ade_like_pool`` together with the latent group of every mask.

    Returns
    -------
    pool : the ``MaskPool`` of ``ade_like_pool`` for the same arguments.
    component_ids : int64[n], the latent mixture component of each mask, unique across classes.
        Only for checking the generator (Fig. 4b, cluster purity); the method never sees it.
    """
    if dim < 1:
        raise MaskpropError(f"dim must be at least 1, got {dim}")
    sizes = zipf_class_sizes(n_masks, n_classes, max_class_size)
    parts = [ade_like_class(c, int(size), seed, dim) for c, size in enumerate(sizes)]
    offsets = np.cumsum([0] + [int(p[3].max()) + 1 for p in parts[:-1]])
    pool = MaskPool(
        features=np.concatenate([p[0] for p in parts]),
        scores=np.concatenate([p[1] for p in parts]),
        ious=np.concatenate([p[2] for p in parts]),
        class_ids=np.repeat(np.arange(n_classes, dtype=np.int32), sizes),
        class_names=_class_names(n_classes),
    )
    components = np.concatenate([p[3] + off for p, off in zip(parts, offsets, strict=True)])
    return pool, components


def ade_like_pool(
    n_masks: int,
    n_classes: int,
    seed: int,
    dim: int = 32,
    max_class_size: int = 30000,
) -> MaskPool:
    """The built-in "ADE-like" pool of the large-scale simulation (paper Sec. 5.2).

    Class sizes follow a Zipf law (``zipf_class_sizes``: at least 10 masks a class, at most
    ``max_class_size``).  Within a class, masks come from latent appearance groups, about one
    per 150 masks (2 to 300), of long-tailed sizes; each group has a latent quality level and
    mask IoUs are Beta draws around it, so groups range from pure-good through impure to
    pure-bad.  The mask score s follows the group's quality closely but the mask's own IoU only
    weakly (paper Fig. 4a/b).  Features are group centres plus per-mask noise and a weak
    direction that encodes the mask's own IoU.  Masks are grouped by class, in random order
    within a class.

    Parameters
    ----------
    n_masks : total masks, ``10 * n_classes <= n_masks <= max_class_size * n_classes``.
    n_classes : classes; named after the 100 ADE20K thing classes when at most 100, else
        ``class_000``, ``class_001``, ...
    seed : seed of ``numpy.random.default_rng``; the same arguments give the same pool.
    dim : feature dimension d.
    max_class_size : cap on the masks of any class.

    Returns
    -------
    MaskPool with features float32[n, dim], scores float32[n] in [0.2, 1], ious float32[n] in
    [0.08, 0.98].

    Examples
    --------
    >>> pool = ade_like_pool(n_masks=2000, n_classes=5, seed=0, dim=8)
    >>> len(pool), pool.features.shape, pool.class_names[0]
    (2000, (2000, 8), 'person')
    """
    return ade_like_pool_with_components(n_masks, n_classes, seed, dim, max_class_size)[0]


def save_prediction_table(pool: MaskPool, path: str | Path) -> None:
    """Write a pool as the CSV that ``load_prediction_table`` reads.

    Columns: ``class`` (the class name), ``s``, ``iou``, ``f0`` ... ``f{d-1}``; one row per
    mask in pool order.  Numbers are written with 9 significant digits, which round-trips
    float32 exactly.

    Parameters
    ----------
    pool : the masks to write; features float32[n, d].
    path : destination file, overwritten.
    """
    dim = pool.features.shape[1]
    header = ["class", "s", "iou", *(f"f{j}" for j in range(dim))]
    # csv quotes names that need it ("chest of drawers" does not, "a,b" does); quoting each
    # distinct name once and formatting numbers with %-formatting keeps 200k rows fast.
    quoted = []
    for name in pool.class_names:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow([name])
        quoted.append(buffer.getvalue())
    numbers = np.column_stack([pool.scores, pool.ious, pool.features]).astype(np.float64)
    row_format = ",".join(["%.9g"] * numbers.shape[1])
    try:
        with open(path, "w", encoding="utf-8", newline="") as out:
            out.write(",".join(header) + "\n")
            for class_id, row in zip(pool.class_ids.tolist(), numbers.tolist(), strict=True):
                out.write(quoted[class_id] + "," + row_format % tuple(row) + "\n")
    except OSError as error:
        raise MaskpropError(f"cannot write prediction table {path}: {error.strerror}") from error


def _table_columns(header: list[str], path: str | Path) -> tuple[int, int, int, list[int]]:
    """Positions of ``class``, ``s``, ``iou`` and ``f0..f{d-1}`` in the header."""
    names = [name.strip() for name in header]
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if name in seen:
            raise MaskpropError(
                f"{path}: line 1: column '{name}' appears twice (columns {seen[name] + 1} "
                f"and {position + 1})"
            )
        seen[name] = position
    missing = [name for name in ("class", "s", "iou", "f0") if name not in seen]
    if missing:
        raise MaskpropError(
            f"{path}: line 1: missing column(s) {', '.join(missing)}; expected class, s, iou, "
            "f0..f{d-1}"
        )
    feature_numbers = []
    for name in names:
        if name in ("class", "s", "iou"):
            continue
        if len(name) < 2 or name[0] != "f" or not name[1:].isdigit():
            raise MaskpropError(
                f"{path}: line 1: unexpected column '{name}'; expected class, s, iou, f0..f{{d-1}}"
            )
        feature_numbers.append(int(name[1:]))
    dim = max(feature_numbers) + 1
    gaps = sorted(set(range(dim)) - set(feature_numbers))
    if gaps:
        raise MaskpropError(
            f"{path}: line 1: feature columns must be contiguous f0..f{dim - 1}, missing f{gaps[0]}"
        )
    features = [seen[f"f{j}"] for j in range(dim)]
    return seen["class"], seen["s"], seen["iou"], features


def load_prediction_table(path: str | Path) -> MaskPool:
    """Read real predictions (one row per mask) into a ``MaskPool``.

    The file is a UTF-8 CSV with a header row naming the columns ``class`` (class name),
    ``s`` (mask score in [0, 1]), ``iou`` (true IoU in [0, 1]) and ``f0`` ... ``f{d-1}``
    (feature, d >= 1, no gaps), in any order.  Blank lines are ignored.  Class ids follow the
    order in which class names first appear.

    Parameters
    ----------
    path : the CSV file.

    Returns
    -------
    MaskPool with features float32[n, d].

    Raises
    ------
    MaskpropError
        With the file, and the line and column where it applies, when the file is missing or
        unreadable, has no rows, lacks or misnames columns, or holds a value that is not a
        finite number, or an s or iou outside [0, 1].
    """
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    try:
        with open(path, encoding="utf-8", newline="") as source:
            reader = csv.reader(source)
            header = next(reader, None)
            while header is not None and not any(cell.strip() for cell in header):
                header = next(reader, None)
            if header is None:
                raise MaskpropError(f"{path}: the file is empty; expected a header row")
            class_col, s_col, iou_col, feature_cols = _table_columns(header, path)
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise MaskpropError(
                        f"{path}: line {reader.line_num}: {len(row)} fields, the header has "
                        f"{len(header)}"
                    )
                rows.append(row)
                line_numbers.append(reader.line_num)
    except FileNotFoundError as error:
        raise MaskpropError(f"{path}: no such file") from error
    except UnicodeDecodeError as error:
        raise MaskpropError(f"{path}: not a UTF-8 text file ({error.reason})") from error
    except csv.Error as error:
        raise MaskpropError(f"{path}: malformed CSV: {error}") from error
    except OSError as error:
        raise MaskpropError(f"{path}: cannot read the file: {error.strerror}") from error
    if not rows:
        raise MaskpropError(f"{path}: the table has a header but no rows")

    header_names = [name.strip() for name in header]
    number_cols = [s_col, iou_col, *feature_cols]
    cells = np.array(rows, dtype=str)[:, number_cols]
    try:
        numbers = np.char.strip(cells).astype(np.float64)
    except ValueError:
        # Locate the first bad cell only on failure: the vectorised parse is the common path.
        for r, row in enumerate(cells.tolist()):
            for c, cell in enumerate(row):
                try:
                    float(cell)
                except ValueError:
                    raise MaskpropError(
                        f"{path}: line {line_numbers[r]}, column '{header_names[number_cols[c]]}'"
                        f": '{cell}' is not a number"
                    ) from None
        raise MaskpropError(f"{path}: a value is not a number") from None
    bad = ~np.isfinite(numbers)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise MaskpropError(
            f"{path}: line {line_numbers[r]}, column '{header_names[number_cols[c]]}': "
            f"{cells[r, c].strip()} is not a finite number"
        )
    out_of_range = (numbers[:, :2] < 0.0) | (numbers[:, :2] > 1.0)
    if out_of_range.any():
        r, c = np.argwhere(out_of_range)[0]
        raise MaskpropError(
            f"{path}: line {line_numbers[r]}, column '{header_names[number_cols[c]]}': "
            f"{cells[r, c].strip()} is outside [0, 1]"
        )
    names = [row[class_col].strip() for row in rows]
    for r, name in enumerate(names):
        if not name:
            raise MaskpropError(f"{path}: line {line_numbers[r]}, column 'class': empty name")
    class_names, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    # np.unique sorts; renumber so ids follow first appearance.
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return MaskPool(
        features=numbers[:, 2:].astype(np.float32),
        scores=numbers[:, 0].astype(np.float32),
        ious=numbers[:, 1].astype(np.float32),
        class_ids=rank[inverse].astype(np.int32),
        class_names=tuple(str(name) for name in class_names[order]),
    )


def _split_by_proportion(n_total: int, counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Integers proportional to ``counts`` summing to ``n_total`` (largest remainder)."""
    share = n_total * counts / counts.sum()
    out = np.floor(share).astype(np.int64)
    out[np.argsort(-(share - out), kind="stable")[: n_total - int(out.sum())]] += 1
    return out


def fitted_pool(table: MaskPool, n_masks: int, seed: int, n_components: int = 8) -> MaskPool:
    """Sample a larger pool from per-class Gaussian mixtures fitted to real predictions.

    The paper's Sec. 5.2 recipe: learn P(f, s, IoU) per class with a Gaussian mixture on a
    table of real predictions, then sample triplets following the table's class proportions.
    The mixture sees ``[f, s, logit(iou)]`` (each column standardised within the class) so its
    Gaussians fit IoU's bounded, skewed distribution; samples are mapped back with s clipped to
    [0, 1] and IoU = sigmoid.

    Parameters
    ----------
    table : real predictions, e.g. from ``load_prediction_table``; every class with masks needs
        at least 2 of them.
    n_masks : masks to sample in total, split over classes in the table's proportions (largest
        remainder, so a class too rare for ``n_masks`` can get none).
    seed : seeds the mixtures and sampling; the same arguments give the same pool.
    n_components : mixture components per class, reduced to ``max(1, n_class // 5)`` for small
        classes so each component has data to fit.

    Returns
    -------
    MaskPool with ``table``'s class names and feature dimension, features float32[n_masks, d],
    grouped by class.
    """
    if n_masks < 1:
        raise MaskpropError(f"n_masks must be at least 1, got {n_masks}")
    if n_components < 1:
        raise MaskpropError(f"n_components must be at least 1, got {n_components}")
    counts = np.bincount(table.class_ids, minlength=len(table.class_names)).astype(np.int64)
    for lonely in np.flatnonzero(counts == 1):
        raise MaskpropError(
            f"class '{table.class_names[lonely]}' has 1 row; fitting its distribution needs "
            "at least 2"
        )
    if counts.sum() == 0:
        raise MaskpropError("the prediction table has no rows to fit")
    wanted = _split_by_proportion(n_masks, counts)
    rng = np.random.default_rng(seed)
    dim = table.features.shape[1]
    parts_f, parts_s, parts_iou, parts_class = [], [], [], []
    for class_id in range(len(table.class_names)):
        state = int(rng.integers(2**31 - 1))  # drawn for every class: adding rows elsewhere
        if wanted[class_id] == 0:  # does not reseed this class
            continue
        index = table.class_indices(class_id)
        data = np.column_stack(
            [
                table.features[index].astype(np.float64),
                table.scores[index].astype(np.float64),
                _logit(table.ious[index].astype(np.float64)),
            ]
        )
        centre = data.mean(axis=0)
        scale = data.std(axis=0)
        scale[scale < 1e-8] = 1.0  # a constant column stays constant instead of dividing by 0
        mixture = GaussianMixture(
            n_components=min(n_components, max(1, index.size // 5)),
            covariance_type="full",
            reg_covar=1e-4,
            random_state=state,
        )
        mixture.fit((data - centre) / scale)
        sample, _ = mixture.sample(int(wanted[class_id]))
        # GaussianMixture.sample returns rows grouped by component; shuffle so pool order
        # carries no information.
        sample = sample[np.random.default_rng(state).permutation(sample.shape[0])]
        sample = sample * scale + centre
        parts_f.append(sample[:, :dim])
        parts_s.append(np.clip(sample[:, dim], 0.0, 1.0))
        parts_iou.append(_sigmoid(sample[:, dim + 1]))
        parts_class.append(np.full(sample.shape[0], class_id))
    return MaskPool(
        features=np.concatenate(parts_f).astype(np.float32),
        scores=np.concatenate(parts_s).astype(np.float32),
        ious=np.concatenate(parts_iou).astype(np.float32),
        class_ids=np.concatenate(parts_class).astype(np.int32),
        class_names=table.class_names,
    )
