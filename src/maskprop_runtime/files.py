"""Paths that messages and requests name, checked once for every service that reads files.
Atomic writes live in :mod:`maskprop.files` (the science library writes files too)."""

from __future__ import annotations

from pathlib import Path


def resolve_under(root: Path, relative: str) -> Path | None:
    """``root / relative`` resolved, or ``None`` when it leaves ``root`` (``..``, an absolute
    path, a symlink out): the one containment check for every path a message or a request
    names."""
    base = Path(root).resolve()
    candidate = (base / relative).resolve()
    return candidate if candidate.is_relative_to(base) else None
