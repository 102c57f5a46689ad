"""Service commands of the ``maskprop`` CLI (registered on :data:`maskprop.cli.app`)."""

from __future__ import annotations

from maskprop.cli import app  # noqa: F401  (commands are added below as they are built)
