"""Where the clusterer keeps incoming masks and the trees it builds, and where the search
service reads them: a directory (a mounted volume on Kubernetes).

Layout under ``root/<campaign>/<class_id>/``:

* ``batches/<event_id>.npz``: one incoming batch (a :class:`~maskprop.data.masks.MaskTable`
  with features, format ``maskprop-masks-1``), written atomically, read with
  ``allow_pickle=False``; removed once the class's tree is stored (:meth:`TreeStore.drop_batches`).
* ``tree/``: the class file search reads (format :data:`CLASS_FORMAT`), one ``.npy`` per array
  so every column can be memory-mapped (``np.load(mmap_mode="r")``; an npz cannot be) and the
  RLE counts as one raw ``rle_blob.bin`` mapped with :mod:`mmap`, plus ``manifest.json`` naming
  the format, class, mask count and every file's size and sha256.  No features: they are
  needed only to build the tree.  The directory is written under a temporary name and renamed
  into place when complete, so a reader sees no tree or a whole one; the manifest's sha256 is
  the checksum ``TreeBuilt`` carries (it pins every file's sha256).

Files of any other format are refused with :class:`StoreFormatError`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from maskprop.data.masks import MaskTable
from maskprop.errors import MaskpropError
from maskprop.files import atomic_file
from maskprop.tree import Tree
from maskprop_runtime.loop import InvalidEvent

#: The one rule for campaign names and event ids (they become path parts): 1-64 characters
#: of A-Z a-z 0-9 _ . - and not "." or "..".  A plain regular expression (no look-ahead) so
#: the gateway's OpenAPI document can state it and its request models check it unchanged.
NAME_PATTERN = (
    r"^(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}"
    r"|\.[A-Za-z0-9_-][A-Za-z0-9_.-]{0,62}"
    r"|\.\.[A-Za-z0-9_.-]{1,62})$"
)
_SAFE = re.compile(NAME_PATTERN)

#: The class file's format (``manifest.json`` key ``format``); any other is refused.
CLASS_FORMAT = "maskprop-class-1"
MANIFEST = "manifest.json"
#: A manifest is a few hundred bytes; anything far larger is not one of ours.
_MANIFEST_MAX_BYTES = 64 * 1024

#: The class file's arrays: name -> (dtype kind(s) accepted, number of dimensions).  ``U``
#: columns are fixed-width unicode, memory-mappable (object arrays are not, and need pickle).
_ARRAYS: dict[str, tuple[str, int]] = {
    "mask_ids": ("U", 1),
    "image_ids": ("Ui", 1),
    "scores": ("f", 1),
    "rle_h": ("u", 1),
    "rle_w": ("u", 1),
    "rle_offsets": ("i", 1),
    "linkage": ("f", 2),
    "img_ids": ("Ui", 1),
    "img_w": ("u", 1),
    "img_h": ("u", 1),
    "img_files": ("U", 1),
}
_BLOB = "rle_blob.bin"


def check_name(kind: str, value: str) -> str:
    """Campaign names and event ids become path parts: allow a safe alphabet only
    (:data:`NAME_PATTERN`)."""
    if not _SAFE.match(value) or value in (".", ".."):
        raise ValueError(
            f"{kind} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . - (not . or ..)"
        )
    return value


class StoreFormatError(InvalidEvent, MaskpropError):
    """A store file of another format (an older release wrote it): rebuild the campaign's
    trees; nothing reads previous formats.  An :class:`InvalidEvent`, so an event handler that
    meets one (the clusterer closing a class, search opening a tree) parks its event with this
    reason."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_file(path: Path, data: NDArray[Any] | bytes) -> dict[str, Any]:
    """Write one file of a class file (fsynced); its manifest entry."""
    with atomic_file(path) as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            np.save(f, np.ascontiguousarray(data), allow_pickle=False)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256_file(path)}


class TreeStore:
    """``root/<campaign>/<class_id>/batches/<event_id>.npz`` and ``.../tree/`` (module
    docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _class_dir(self, campaign: str, class_id: int) -> Path:
        if int(class_id) < 0:
            raise ValueError(f"class_id must not be negative, got {class_id}")
        return self.root / check_name("campaign", campaign) / str(int(class_id))

    # ------------------------------------------------------------------ batches
    def put_batch(self, campaign: str, class_id: int, event_id: str, table: MaskTable) -> None:
        path = (
            self._class_dir(campaign, class_id) / "batches" / f"{check_name('event', event_id)}.npz"
        )
        with atomic_file(path) as f:
            np.savez(f, **table.to_arrays())  # type: ignore[arg-type]

    def read_batches(self, campaign: str, class_id: int) -> MaskTable | None:
        """Every stored batch of the class merged in mask-id order (repeats dropped), or
        ``None`` when there is none."""
        folder = self._class_dir(campaign, class_id) / "batches"
        files = sorted(folder.glob("*.npz")) if folder.exists() else []
        if not files:
            return None
        return MaskTable.concat([_read_batch(f) for f in files]).by_mask_id()

    def drop_batches(self, campaign: str, class_id: int) -> None:
        """Remove the class's batch files (call once its tree is stored: each mask was kept
        twice until then).  Idempotent."""
        shutil.rmtree(self._class_dir(campaign, class_id) / "batches", ignore_errors=True)

    # ------------------------------------------------------------------ trees
    def tree_path(self, campaign: str, class_id: int) -> Path:
        """The class file's manifest (what ``TreeBuilt.tree_uri`` names)."""
        return self._class_dir(campaign, class_id) / "tree" / MANIFEST

    def stored_tree(self, campaign: str, class_id: int) -> tuple[Path, str, int] | None:
        """``(manifest path, sha256, n masks)`` of the class's stored tree, or ``None``."""
        path = self.tree_path(campaign, class_id)
        if not path.is_file():
            return None
        manifest = _read_manifest(path)
        return path, _sha256_file(path), int(manifest["n_masks"])

    def put_tree(
        self, campaign: str, class_id: int, class_name: str, tree: Tree, table: MaskTable
    ) -> tuple[Path, str]:
        """Store the tree with its masks (leaf order, no features) as the class file; returns
        (manifest path, sha256 of the manifest).  A class whose tree is already stored keeps
        it (a concurrent or repeated build of the same batches gives the same tree)."""
        if tree.n_leaves != len(table):
            raise ValueError(f"tree has {tree.n_leaves} leaves, table {len(table)} masks")
        final = self.tree_path(campaign, class_id).parent
        for stale in final.parent.glob(".tree.*.tmp"):  # a build killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".tree.{uuid.uuid4().hex}.tmp"
        tmp.mkdir(parents=True)
        try:
            columns: dict[str, NDArray[Any]] = {
                "mask_ids": table.mask_ids,
                "image_ids": table.image_ids,
                "scores": table.scores,
                "rle_h": table.rle_h,
                "rle_w": table.rle_w,
                "rle_offsets": table.rle_offsets,
                "linkage": tree.to_linkage(),
                "img_ids": table.img_ids,
                "img_w": table.img_w,
                "img_h": table.img_h,
                "img_files": table.img_files,
            }
            files = {name: _write_file(tmp / f"{name}.npy", a) for name, a in columns.items()}
            files["rle_blob"] = _write_file(tmp / _BLOB, bytes(table.rle_blob))
            manifest = {
                "format": CLASS_FORMAT,
                "campaign": campaign,
                "class_id": int(class_id),
                "class_name": class_name,
                "n_masks": len(table),
                "files": files,
            }
            with atomic_file(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, sort_keys=True, indent=1)
            dir_fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            try:
                os.rename(tmp, final)  # atomic; fails if another build got there first
            except OSError:
                if not (final / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        path = final / MANIFEST
        return path, _sha256_file(path)

    @staticmethod
    def load_tree(path: Path, *, verify: bool = False) -> tuple[Tree, MaskTable, str]:
        """``(tree, masks in leaf order, class name)`` of a class file (its manifest path).

        Columns are memory-mapped, read-only (``rle_blob`` an :class:`mmap.mmap`, which slices
        to ``bytes``); the table has no features (``float32[n, 0]``) and NaN ``boxes`` and
        ``mask_ious`` (not kept).  ``verify``: also check every file's sha256 (reads them all).
        :class:`StoreFormatError` for a file of another format or a damaged one."""
        tree, table, name = TreeStore._load(Path(path), verify=verify, with_tree=True)
        assert tree is not None
        return tree, table, name

    @staticmethod
    def load_masks(path: Path) -> tuple[MaskTable, str]:
        """:meth:`load_tree` without the tree: ``(masks in leaf order, class name)``, for a
        reader that never walks the tree (the label relay), which then neither maps the
        linkage nor derives the tree's arrays (~a third of a small class's load)."""
        _, table, name = TreeStore._load(Path(path), verify=False, with_tree=False)
        return table, name

    @staticmethod
    def _load(path: Path, *, verify: bool, with_tree: bool) -> tuple[Tree | None, MaskTable, str]:
        manifest = _read_manifest(path)
        folder = path.parent
        arrays: dict[str, NDArray[Any]] = {}
        try:
            n = int(manifest["n_masks"])
            files = manifest["files"]
            for name, (kinds, ndim) in _ARRAYS.items():
                if name == "linkage" and not with_tree:
                    continue
                entry = files[name]
                f = folder / _plain(entry["file"])
                if verify:
                    _verify(f, entry)
                a = np.load(f, mmap_mode="r", allow_pickle=False)
                if a.dtype.kind not in kinds or a.ndim != ndim:
                    raise StoreFormatError(f"{f}: {a.dtype}[{a.ndim}d] is not a valid {name}")
                arrays[name] = a
            entry = files["rle_blob"]
            blob_path = folder / _plain(entry["file"])
            if verify:
                _verify(blob_path, entry)
            blob = _map(blob_path)
            nan = np.float32(np.nan)
            table = MaskTable(
                mask_ids=arrays["mask_ids"],
                image_ids=arrays["image_ids"],
                class_ids=np.broadcast_to(np.int32(manifest["class_id"]), (n,)),
                scores=arrays["scores"],
                features=np.zeros((n, 0), np.float32),
                boxes=np.broadcast_to(nan, (n, 4)),
                mask_ious=np.broadcast_to(nan, (n,)),
                rle_h=arrays["rle_h"],
                rle_w=arrays["rle_w"],
                rle_blob=blob,
                rle_offsets=arrays["rle_offsets"],
                img_ids=arrays["img_ids"],
                img_w=arrays["img_w"],
                img_h=arrays["img_h"],
                img_files=arrays["img_files"],
            )
            tree = None
            if with_tree:
                linkage = arrays["linkage"]
                if linkage.shape != (max(n - 1, 0), 4):
                    raise StoreFormatError(
                        f"{path}: linkage of shape {linkage.shape} for {n} masks"
                    )
                tree = Tree.from_arrays({"linkage": linkage, "scores": table.scores})
        except (KeyError, TypeError, ValueError, MaskpropError) as exc:
            if isinstance(exc, StoreFormatError):
                raise
            raise StoreFormatError(f"{path}: not a valid class file ({exc})") from None
        return tree, table, str(manifest["class_name"])


def _plain(name: object) -> str:
    """A manifest's file name, confined to its directory (no separators, no dot files)."""
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
        raise StoreFormatError(f"manifest names a file outside its directory: {name!r}")
    return name


def _verify(path: Path, entry: dict[str, Any]) -> None:
    if path.stat().st_size != entry["bytes"] or _sha256_file(path) != entry["sha256"]:
        raise StoreFormatError(f"{path}: size or sha256 differs from the manifest")


def _map(path: Path) -> mmap.mmap | bytes:
    """A read-only mapping of ``path`` (``b""`` for an empty file: mmap refuses length 0)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _read_manifest(path: Path) -> dict[str, Any]:
    if path.name != MANIFEST or not path.is_file():
        raise StoreFormatError(f"{path}: not a class file manifest ({MANIFEST}) of this release")
    with open(path, "rb") as f:
        raw = f.read(_MANIFEST_MAX_BYTES + 1)
    try:
        manifest = json.loads(raw) if len(raw) <= _MANIFEST_MAX_BYTES else None
    except ValueError:
        manifest = None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != CLASS_FORMAT:
        raise StoreFormatError(
            f"{path}: class file format {found!r}, expected {CLASS_FORMAT!r}: "
            "not a tree store file of this release"
        )
    assert isinstance(manifest, dict)
    return manifest


def _read_batch(path: Path) -> MaskTable:
    try:
        with np.load(path, allow_pickle=False) as z:
            a = dict(z)
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StoreFormatError(f"{path}: not a readable batch file ({exc})") from None
    try:
        return MaskTable.from_arrays(a)
    except (MaskpropError, KeyError) as exc:
        raise StoreFormatError(f"{path}: not a tree store file of this release ({exc})") from None
