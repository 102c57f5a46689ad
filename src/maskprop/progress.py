"""Progress reporting: the library and the runners take a callback, so none of them knows how
(or whether) progress is shown; the application passes its progress bars.

``progress(label, done, total)``: stage ``label`` has finished ``done`` of ``total`` units;
called with non-decreasing ``done`` per label, the last call has ``done == total``.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def no_progress(label: str, done: int, total: int) -> None:
    """The default callback: report nothing."""


def prefixed(progress: Progress, prefix: str) -> Progress:
    """``progress`` with every label prefixed (a round's stages: ``"r2: train"``)."""

    def report(label: str, done: int, total: int) -> None:
        progress(prefix + label, done, total)

    return report
