"""Crash-safe file writing, written once for every layer that keeps files (the science
library's datasets and COCO files, the runtime's tree store, the services' outputs)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file"]


@contextmanager
def atomic_file(
    path: Path, mode: str = "wb", *, permissions: int | None = None
) -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file in the same directory, fsync it and rename it
    into place: readers see the old file or the whole new one, never a torn one.  On error the
    temporary file is removed and ``path`` is untouched.  ``mode``: ``"wb"`` or ``"w"`` (text
    is UTF-8).  ``permissions``: the file's mode bits (the temporary file starts as 0600).

    Examples
    --------
    >>> with atomic_file(tmp_path / "report.json", "w") as f:  # doctest: +SKIP
    ...     f.write("{}")
    """
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
