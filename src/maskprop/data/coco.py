"""COCO instances, the one home for the format: the RLE codec, reading and validating COCO
files, and writing them (streamed, atomically).

RLE codec
---------
A COCO mask is stored run-length encoded in column-major (Fortran) pixel order, zeros first:
``runs`` int64[k] alternate background and object run lengths and sum to ``h * w``.  The
compressed ``counts`` string (pycocotools ``rleToString``/``rleFrString``, maskApi.c) writes
each run as 5-bit groups offset by 48, with 0x20 the continuation bit and the last group
sign-extended, and runs after the third as differences to the run two before.  All three
forms convert here, vectorised with numpy:

    counts (bytes | str)  <-- counts_to_runs / runs_to_counts -->  runs int64[k]
    runs                  <-- mask_to_runs   / runs_to_mask   -->  mask bool[h, w]

pycocotools trusts ``counts`` (a malformed string decodes to garbage, and runs that add up to
more than ``h * w`` make its decoder write past its buffer), so every string that comes from
outside is checked with :func:`rle_problem` before pycocotools sees it.  pycocotools stays the
engine where it is fast and safe on checked input: encoding many masks, area, box, IoU.

In JSON a segmentation is ``{"size": [h, w], "counts": str}`` (ASCII counts); on the wire and
in the mask table the counts are bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray
from pycocotools import mask as mask_utils

from maskprop.errors import MaskpropError
from maskprop.files import atomic_file

__all__ = [
    "boxes_xyxy",
    "counts_to_runs",
    "decode_rle",
    "encode_masks",
    "instance",
    "load_coco_instances",
    "mask_to_runs",
    "read_coco",
    "rle_problem",
    "runs_to_counts",
    "runs_to_mask",
    "to_pycoco",
    "validate_instances",
    "well_formed",
    "write_coco",
    "write_coco_results",
]

# 8 groups of 5 bits hold runs up to 2**39, far beyond any image's pixel count; a longer one is
# garbage, and 13 would overflow int64.
_MAX_GROUPS = 8
# Groups needed by any int64 delta when encoding (64 bits / 5).
_ENCODE_GROUPS = 13


# --------------------------------------------------------------------------- RLE codec
def counts_to_runs(counts: bytes | str) -> NDArray[np.int64]:
    """Compressed COCO ``counts`` -> run lengths int64[k] (zeros first, alternating).

    A vectorised port of pycocotools' ``rleFrString``.  Raises :class:`MaskpropError` naming
    what is malformed: a byte outside the alphabet, a string that ends inside a run, a run too
    long for any image, or a negative run.  Whether the runs cover ``h * w`` pixels is the
    caller's check (:func:`rle_problem`).

    Examples
    --------
    >>> counts_to_runs(b"522N1").tolist()
    [5, 2, 2, 0, 3]
    """
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise MaskpropError("RLE counts hold a byte outside the COCO alphabet") from None
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ((c < 0) | (c > 63)).any():
        raise MaskpropError("RLE counts hold a byte outside the COCO alphabet")
    more = (c & 0x20) != 0
    if more[-1]:
        raise MaskpropError("RLE counts end inside a run")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_GROUPS:
        raise MaskpropError("RLE counts hold a run too long for any image")
    k = np.arange(c.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    negative = (c[ends] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * lengths)), x)
    runs = x.copy()
    # From the fourth run on, each is stored as the difference to the run two before.
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    if (runs < 0).any():
        raise MaskpropError("RLE counts decode to a negative run")
    return runs


def runs_to_counts(runs: NDArray[np.integer] | Sequence[int]) -> bytes:
    """Run lengths (int[k], >= 0) -> compressed COCO ``counts``; the inverse of
    :func:`counts_to_runs` and byte-identical to pycocotools' ``rleToString``.

    Examples
    --------
    >>> runs_to_counts([5, 2, 2, 0, 3])
    b'522N1'
    """
    r = np.asarray(runs, dtype=np.int64)
    if r.size == 0:
        return b""
    x = r.copy()
    x[3:] -= r[1:-2]
    shifts = 5 * np.arange(_ENCODE_GROUPS, dtype=np.int64)
    groups = (x[:, None] >> shifts) & 0x1F  # int64[k, 13]: 5-bit groups, lowest first
    rest = x[:, None] >> (shifts + 5)
    # rleToString stops after the group whose sign bit already says what the rest is.
    more = np.where((groups & 0x10) != 0, rest != -1, rest != 0)
    n = np.argmin(more, axis=1) + 1  # groups written per run
    used = np.arange(_ENCODE_GROUPS) < n[:, None]
    chars = groups + 48 + np.where(np.arange(_ENCODE_GROUPS) < (n - 1)[:, None], 0x20, 0)
    return chars[used].astype(np.uint8).tobytes()


def mask_to_runs(mask: NDArray[np.bool_]) -> NDArray[np.int64]:
    """bool[h, w] -> run lengths int64[k] in column-major order, zeros first (a leading 0 run
    when the first pixel is set)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).astype(np.int64)
    return np.concatenate(([0], runs)) if flat[0] else runs


def runs_to_mask(runs: NDArray[np.integer], height: int, width: int) -> NDArray[np.bool_]:
    """Run lengths summing to ``height * width`` -> bool[height, width]."""
    r = np.asarray(runs, dtype=np.int64)
    if int(r.sum()) != height * width:
        raise MaskpropError(f"RLE runs cover {int(r.sum())} pixels, not {height}x{width}")
    values = (np.arange(r.size) % 2).astype(bool)
    return np.repeat(values, r).reshape(width, height).T


#: The largest mask an RLE may describe (16k x 16k): a few bytes of counts could otherwise
#: make a decoder allocate gigabytes.
MAX_MASK_PIXELS = 1 << 28


def rle_problem(height: int, width: int, counts: bytes | str) -> str | None:
    """Why ``(height, width, counts)`` is not a well-formed compressed COCO RLE, or ``None``.

    The check every RLE from outside passes before pycocotools decodes it.
    """
    if height <= 0 or width <= 0:
        return f"RLE size {height}x{width} is empty"
    if height * width > MAX_MASK_PIXELS:
        return f"RLE size {height}x{width} exceeds {MAX_MASK_PIXELS} pixels"
    try:
        runs = counts_to_runs(counts)
    except MaskpropError as exc:
        return str(exc)
    total, pixels = int(runs.sum()), height * width
    if total != pixels:
        return f"RLE runs cover {total} pixels, size {height}x{width} has {pixels}"
    return None


def well_formed(
    heights: Sequence[int] | NDArray[np.integer],
    widths: Sequence[int] | NDArray[np.integer],
    counts: Sequence[bytes | str],
) -> NDArray[np.bool_]:
    """bool[n]: whether each ``(heights[i], widths[i], counts[i])`` is a well-formed compressed
    RLE covering its ``h * w`` pixels, i.e. ``rle_problem(...) is None``, for all n masks in
    one vectorised pass (a per-mask call costs ~50 us of numpy overhead; this costs ~0.1 us a
    byte for the whole batch).  Name a failing one's problem with :func:`rle_problem`.
    """
    n = len(counts)
    h = np.asarray(heights, dtype=np.int64).reshape(n)
    w = np.asarray(widths, dtype=np.int64).reshape(n)
    ok = (h > 0) & (w > 0) & (h * w <= MAX_MASK_PIXELS)
    raw: list[bytes] = []
    for i, item in enumerate(counts):
        if isinstance(item, str):
            try:
                item = item.encode("ascii")
            except UnicodeEncodeError:
                ok[i], item = False, b""
        raw.append(bytes(item))
    lengths = np.fromiter(map(len, raw), dtype=np.int64, count=n)
    c = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return ok & (h * w == 0)

    def flag(owners: NDArray[np.int64]) -> None:
        ok[np.unique(owners)] = False

    owner = np.repeat(np.arange(n), lengths)  # the mask each byte belongs to
    outside = (c < 0) | (c > 63)
    flag(owner[outside])
    c = np.where(outside, 0, c)
    more = (c & 0x20) != 0
    nonempty = lengths > 0
    last_byte = (np.cumsum(lengths) - 1)[nonempty]
    flag(np.flatnonzero(nonempty)[more[last_byte]])  # ends inside a run
    # Every mask's last byte ends a run, so no run spans two masks.
    ends_run = ~more
    ends_run[last_byte] = True
    ends = np.flatnonzero(ends_run)
    starts = np.concatenate(([0], ends[:-1] + 1))
    groups = ends - starts + 1
    run_owner = owner[ends]
    flag(run_owner[groups > _MAX_GROUPS])
    groups = np.minimum(groups, _MAX_GROUPS)  # bounded shifts; those masks are flagged already
    k = np.minimum(np.arange(c.size) - np.repeat(starts, ends - starts + 1), _MAX_GROUPS - 1)
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    x = np.where((c[ends] & 0x10) != 0, x - (np.int64(1) << (5 * groups)), x)
    # Run j of a mask, j >= 3, is stored as the difference to run j - 2: two chains per mask
    # (odd j from 1, even j from 2), each a segmented cumulative sum.
    runs_per_mask = np.bincount(run_owner, minlength=n)
    first_run = np.cumsum(runs_per_mask) - runs_per_mask
    j = np.arange(x.size) - np.repeat(first_run, runs_per_mask)
    odd, even = (j % 2) == 1, ((j % 2) == 0) & (j >= 2)
    runs = x.copy()
    for chain in (odd, even):
        cum = np.cumsum(np.where(chain, x, 0))
        before = np.concatenate(([0], cum))[first_run]  # the chain's sum before each mask
        runs = np.where(chain, cum - np.repeat(before, runs_per_mask), runs)
    flag(run_owner[runs < 0])
    cum = np.concatenate(([0], np.cumsum(runs)))
    total = cum[first_run + runs_per_mask] - cum[first_run]
    return ok & (total == h * w)


def decode_rle(height: int, width: int, counts: bytes | str) -> NDArray[np.bool_]:
    """Compressed RLE -> bool[height, width]; raises :class:`MaskpropError` when malformed."""
    if height <= 0 or width <= 0:
        raise MaskpropError(f"RLE size {height}x{width} is empty")
    if height * width > MAX_MASK_PIXELS:
        raise MaskpropError(f"RLE size {height}x{width} exceeds {MAX_MASK_PIXELS} pixels")
    return runs_to_mask(counts_to_runs(counts), height, width)


def encode_masks(masks: NDArray[np.bool_]) -> list[bytes]:
    """bool[n, h, w] -> the compressed counts of each mask (pycocotools, batched in C)."""
    m = np.asarray(masks)
    if m.shape[0] == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    return [r["counts"] for r in encoded]


def _coded(height: int, width: int, counts: bytes | str) -> dict[str, Any]:
    return {
        "size": [int(height), int(width)],
        "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts),
    }


def to_pycoco(rle: Mapping[str, Any]) -> dict[str, Any]:
    """A COCO segmentation ``{"size", "counts"}`` (counts str or bytes) in the form pycocotools'
    ``area``/``toBbox``/``iou`` take (counts bytes)."""
    return _coded(rle["size"][0], rle["size"][1], rle["counts"])


def boxes_xyxy(
    heights: Sequence[int], widths: Sequence[int], counts: Sequence[bytes]
) -> NDArray[np.float32]:
    """float32[n, 4]: each mask's bounding box ``x1, y1, x2, y2`` in pixels (x2, y2
    exclusive; zeros for an empty mask).  ``counts`` must have passed :func:`rle_problem`."""
    if not counts:
        return np.zeros((0, 4), dtype=np.float32)
    coded = [_coded(h, w, c) for h, w, c in zip(heights, widths, counts, strict=True)]
    xywh = np.asarray(mask_utils.toBbox(coded), dtype=np.float32).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def instance(
    ann_id: int,
    image_id: int,
    category_id: int,
    segmentation: Mapping[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """One COCO annotation of a compressed RLE ``segmentation`` (``{"size", "counts"}``, counts
    ASCII str or bytes), with ``area`` and ``bbox`` (x, y, w, h) computed from the mask,
    ``iscrowd`` 0 and the ``extra`` keys after them."""
    h, w = (int(v) for v in segmentation["size"])
    coded = _coded(h, w, segmentation["counts"])
    return {
        "id": int(ann_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": {"size": [h, w], "counts": coded["counts"].decode("ascii")},
        "area": float(mask_utils.area(coded)),
        "bbox": [float(v) for v in mask_utils.toBbox(coded)],
        "iscrowd": 0,
        **extra,
    }


# --------------------------------------------------------------------------- reading
def read_coco(path: Path) -> dict[str, Any]:
    """The JSON object of a COCO file; :class:`MaskpropError` (one line naming the file) when
    it is missing, unreadable or not a JSON object."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise MaskpropError(f"COCO file not found: {path}") from None
    except OSError as exc:
        raise MaskpropError(f"cannot read COCO file {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MaskpropError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MaskpropError(f"{path}: a COCO file is a JSON object")
    return doc


def _segmentation_rle(seg: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """Validate a COCO segmentation and return it as compressed RLE with ASCII counts."""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        ):
            raise MaskpropError(f"{where}: RLE 'size' must be [height, width]")
        if size != [height, width]:
            raise MaskpropError(
                f"{where}: RLE size {size} does not match its image ({height}x{width})"
            )
        if isinstance(counts, str):
            if rle_problem(height, width, counts) is not None:
                raise MaskpropError(f"{where}: RLE counts do not decode to {height}x{width} pixels")
            return {"size": size, "counts": counts}
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                raise MaskpropError(f"{where}: uncompressed RLE counts must be integers >= 0")
            if sum(counts) != height * width:
                raise MaskpropError(
                    f"{where}: RLE counts sum to {sum(counts)}, not {height}x{width}"
                )
            return {"size": size, "counts": runs_to_counts(counts).decode("ascii")}
        raise MaskpropError(f"{where}: RLE 'counts' must be a string or a list of integers")
    if isinstance(seg, list):
        if not seg:
            raise MaskpropError(f"{where}: polygon segmentation is empty")
        for poly in seg:
            if (
                not isinstance(poly, list)
                or len(poly) < 6
                or len(poly) % 2
                or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    for v in poly
                )
            ):
                raise MaskpropError(
                    f"{where}: each polygon must be a list of x, y numbers (at least 3 points)"
                )
        merged = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        return {"size": [height, width], "counts": merged["counts"].decode("ascii")}
    raise MaskpropError(f"{where}: segmentation must be an RLE object or a list of polygons")


def _int_id(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MaskpropError(f"{where}: '{key}' must be an integer")
    return value


def _entries(
    doc: Mapping[str, Any], key: str, source: str
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(where, id, entry)`` of each object of ``doc[key]``; :class:`MaskpropError` for an
    entry that is not an object, lacks an integer ``id`` or repeats one.  ``where`` names the
    entry for error messages."""
    noun = {"images": "image", "categories": "category", "annotations": "annotation"}[key]
    seen: set[int] = set()
    for i, entry in enumerate(doc[key]):
        where = f"{source}: {key}[{i}]"
        if not isinstance(entry, dict):
            raise MaskpropError(f"{where}: must be an object")
        entry_id = _int_id(entry, "id", where)
        if entry_id in seen:
            raise MaskpropError(f"{where}: duplicate {noun} id {entry_id}")
        seen.add(entry_id)
        yield where, entry_id, entry


def validate_instances(
    doc: Mapping[str, Any], source: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Validate a COCO instances document; return ``(images, annotations, categories)``.

    Checks: the document has ``images``, ``annotations`` and ``categories`` lists; image ids
    are unique integers with positive ``width``/``height`` and a ``file_name``; category ids
    are unique integers with a ``name``; every annotation has a unique id, points to a known
    image and category, and has a well-formed segmentation (compressed or uncompressed RLE of
    the image's size, or polygons of at least 3 points).

    Annotations come back normalised: ``segmentation`` as compressed RLE with ASCII counts,
    ``area`` and ``bbox`` filled in from the mask where missing, ``iscrowd`` defaulting to 0.
    Images and categories come back as given.

    Raises
    ------
    MaskpropError : one line naming ``source``, the offending entry and what is wrong.
    """
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise MaskpropError(f"{source}: missing key '{key}'")
        if not isinstance(doc[key], list):
            raise MaskpropError(f"{source}: '{key}' must be a list")

    images: dict[int, dict[str, Any]] = {}
    for where, image_id, img in _entries(doc, "images", source):
        for key in ("width", "height"):
            v = img.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MaskpropError(f"{where}: '{key}' must be a positive integer")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise MaskpropError(f"{where}: 'file_name' must be a non-empty string")
        images[image_id] = img

    category_ids: set[int] = set()
    for where, cat_id, cat in _entries(doc, "categories", source):
        if not isinstance(cat.get("name"), str):
            raise MaskpropError(f"{where}: 'name' must be a string")
        category_ids.add(cat_id)

    annotations: list[dict[str, Any]] = []
    for where, ann_id, ann in _entries(doc, "annotations", source):
        where = f"{where} (annotation {ann_id})"
        image_id = _int_id(ann, "image_id", where)
        if image_id not in images:
            raise MaskpropError(f"{where}: image_id {image_id} is not in 'images'")
        category_id = _int_id(ann, "category_id", where)
        if category_id not in category_ids:
            raise MaskpropError(f"{where}: category_id {category_id} is not in 'categories'")
        if "segmentation" not in ann:
            raise MaskpropError(f"{where}: missing 'segmentation'")
        img = images[image_id]
        rle = _segmentation_rle(ann["segmentation"], img["height"], img["width"], where)
        iscrowd = ann.get("iscrowd", 0)
        if isinstance(iscrowd, bool) or iscrowd not in (0, 1):
            raise MaskpropError(f"{where}: 'iscrowd' must be 0 or 1")
        bbox = ann.get("bbox")
        if bbox is not None and (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
            or bbox[2] < 0
            or bbox[3] < 0
        ):
            raise MaskpropError(f"{where}: 'bbox' must be [x, y, width, height]")
        coded = _coded(img["height"], img["width"], rle["counts"])
        normalised = dict(ann)
        normalised["segmentation"] = rle
        normalised["iscrowd"] = int(iscrowd)
        if "area" not in ann:
            normalised["area"] = float(mask_utils.area(coded))
        if bbox is None:
            normalised["bbox"] = [float(v) for v in mask_utils.toBbox(coded)]
        annotations.append(normalised)
    return list(images.values()), annotations, list(doc["categories"])


def load_coco_instances(
    path: Path,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Read and validate a COCO instances file (the way users bring their own labelled sets):
    :func:`read_coco` then :func:`validate_instances`; returns ``(images, annotations,
    categories)``, annotations normalised to compressed RLE with area and bbox.

    Raises
    ------
    MaskpropError : one line naming the file, the offending entry and what is wrong.
    """
    return validate_instances(read_coco(path), str(Path(path)))


# --------------------------------------------------------------------------- writing
def _dumps(obj: Any) -> str:
    # allow_nan=False: the files stay strict JSON that any reader accepts.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _write_array(f: IO[str], items: Iterable[Any]) -> int:
    f.write("[")
    n = 0
    for item in items:
        f.write(("," if n else "") + _dumps(item))
        n += 1
    f.write("]")
    return n


def write_coco(
    path: Path,
    *,
    images: Iterable[Mapping[str, Any]],
    annotations: Iterable[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Write a COCO instances document to ``path``, streamed and atomically.

    ``images`` and ``annotations`` are consumed one item at a time, images first, so a
    document of millions of masks never exists in memory as one object (an annotation
    generator may rely on the image generator having run).  The file appears complete or not
    at all (:func:`maskprop.files.atomic_file`).  Build annotations with :func:`instance`.

    Returns
    -------
    dict with ``images``, ``annotations`` and ``categories``: the counts written.

    Raises
    ------
    MaskpropError : the file cannot be written.
    """
    path = Path(path)
    try:
        with atomic_file(path, "w") as f:
            f.write(f'{{"info":{_dumps(dict(info or {}))},"licenses":[]')
            f.write(',"categories":')
            n_categories = _write_array(f, categories)
            f.write(',"images":')
            n_images = _write_array(f, images)
            f.write(',"annotations":')
            n_annotations = _write_array(f, annotations)
            f.write("}\n")
    except OSError as exc:
        raise MaskpropError(f"cannot write {path}: {exc.strerror or exc}") from None
    return {"images": n_images, "annotations": n_annotations, "categories": n_categories}


def write_coco_results(path: Path, results: Iterable[Mapping[str, Any]]) -> int:
    """Write COCO detection results (a JSON list of ``{"image_id", "category_id",
    "segmentation", "score", ...}``, what ``COCO.loadRes`` reads) to ``path``, streamed and
    atomically; returns how many were written.  Raises :class:`MaskpropError` when the file
    cannot be written."""
    path = Path(path)
    try:
        with atomic_file(path, "w") as f:
            n = _write_array(f, results)
            f.write("\n")
    except OSError as exc:
        raise MaskpropError(f"cannot write {path}: {exc.strerror or exc}") from None
    return n
