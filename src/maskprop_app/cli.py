"""The ``maskprop`` command: the science commands of :mod:`maskprop.cli` plus the service
commands (``serve``, ``run``, ``export``, ``demo``, ``detector``), which need the plumbing
this package holds."""

from __future__ import annotations

from maskprop.cli import main as _science_main

# Service commands register themselves on the same Typer app.
from maskprop_runtime import cli_detector as _cli_detector  # noqa: F401
from maskprop_runtime import commands as _commands  # noqa: F401


def main() -> None:
    _science_main()
