"""Crash-safe file writing, written once for every service that keeps files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def resolve_under(root: Path, relative: str) -> Path | None:
    """``root / relative`` resolved, or ``None`` when it leaves ``root`` (``..``, an absolute
    path, a symlink out): the one containment check for every path a message or a request
    names."""
    base = Path(root).resolve()
    candidate = (base / relative).resolve()
    return candidate if candidate.is_relative_to(base) else None


@contextmanager
def atomic_file(
    path: Path, mode: str = "wb", *, permissions: int | None = None
) -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file in the same directory, fsync it and rename it
    into place: readers see the old file or the whole new one, never a torn one.  On error the
    temporary file is removed and ``path`` is untouched.  ``permissions``: the file's mode bits
    (the temporary file starts as 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if permissions is not None:
                os.fchmod(f.fileno(), permissions)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
