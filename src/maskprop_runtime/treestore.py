"""Where the clusterer keeps incoming masks and the trees it builds, and where the search
service reads them: a directory (a mounted volume on Kubernetes).  Files are npz written
atomically (temp file + rename) and read with ``allow_pickle=False``; each holds a
:class:`~maskprop.data.masks.MaskTable` (its ``masks_format`` names the one format read, any
other is refused with :class:`StoreFormatError`), a tree file also the tree and class name."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

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


def check_name(kind: str, value: str) -> str:
    """Campaign names and event ids become path parts: allow a safe alphabet only
    (:data:`NAME_PATTERN`)."""
    if not _SAFE.match(value) or value in (".", ".."):
        raise ValueError(
            f"{kind} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . - (not . or ..)"
        )
    return value


def _atomic_savez(path: Path, arrays: dict[str, NDArray[np.generic]]) -> str:
    with atomic_file(path) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TreeStore:
    """``root/<campaign>/<class_id>/batches/<event_id>.npz`` and ``.../tree.npz``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _class_dir(self, campaign: str, class_id: int) -> Path:
        return self.root / check_name("campaign", campaign) / str(int(class_id))

    def put_batch(self, campaign: str, class_id: int, event_id: str, table: MaskTable) -> None:
        path = (
            self._class_dir(campaign, class_id) / "batches" / f"{check_name('event', event_id)}.npz"
        )
        _atomic_savez(path, table.to_arrays())

    def read_batches(self, campaign: str, class_id: int) -> MaskTable | None:
        folder = self._class_dir(campaign, class_id) / "batches"
        files = sorted(folder.glob("*.npz")) if folder.exists() else []
        if not files:
            return None
        return MaskTable.concat([_read_table(f)[0] for f in files]).by_mask_id()

    def tree_path(self, campaign: str, class_id: int) -> Path:
        return self._class_dir(campaign, class_id) / "tree.npz"

    def put_tree(
        self, campaign: str, class_id: int, class_name: str, tree: Tree, table: MaskTable
    ) -> tuple[Path, str]:
        """Store the tree with its mask table; returns (path, sha256)."""
        path = self.tree_path(campaign, class_id)
        arrays: dict[str, NDArray[np.generic]] = {
            **{f"tree_{k}": v for k, v in tree.to_arrays().items()},
            **table.to_arrays(),
            "class_name": np.array(class_name),
        }
        return path, _atomic_savez(path, arrays)

    @staticmethod
    def load_tree(path: Path) -> tuple[Tree, MaskTable, str]:
        """``(tree, masks in leaf order, class name)`` of a tree file; :class:`StoreFormatError`
        for a file of another format."""
        table, a = _read_table(path)
        tree = Tree.from_arrays({"linkage": a["tree_linkage"], "scores": a["tree_scores"]})
        return tree, table, str(a["class_name"])


class StoreFormatError(InvalidEvent, MaskpropError):
    """A store file of another format (an older release wrote it): rebuild the campaign's
    trees; nothing reads previous formats.  An :class:`InvalidEvent`, so an event handler that
    meets one (the clusterer closing a class, search opening a tree) parks its event with this
    reason."""


def _read_table(path: Path) -> tuple[MaskTable, dict[str, NDArray[np.generic]]]:
    with np.load(path, allow_pickle=False) as z:
        a = dict(z)
    try:
        return MaskTable.from_arrays(a), a
    except (MaskpropError, KeyError) as exc:
        raise StoreFormatError(f"{path}: not a tree store file of this release ({exc})") from None
