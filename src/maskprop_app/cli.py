"""The ``maskprop`` command: one Typer root that adds every command group explicitly.

Every user mistake ends as one ``error: ...`` line on stderr and exit status 2; no tracebacks.
``maskprop`` (the console script) and ``python -m maskprop`` both run :func:`main`.
"""

from __future__ import annotations

import os
import sys

import typer

from maskprop import __version__
from maskprop.errors import MaskpropError
from maskprop_app.cmd_campaign import campaign_app
from maskprop_app.cmd_data import data_app
from maskprop_app.cmd_detector import demo, detector_app
from maskprop_app.cmd_gateway import gold_app, vendor_app
from maskprop_app.cmd_services import export_app, feed_simulated, run, serve
from maskprop_app.cmd_simulate import simulate


def version() -> None:
    """Print the maskprop version."""
    typer.echo(__version__)


def build_app() -> typer.Typer:
    """The root command with every group added, in the order ``--help`` lists them."""
    root = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        # the commands' docstrings are their help: ``code`` in them renders as code
        rich_markup_mode="markdown",
        help="Label instance masks at scale by clustering, verifying a few and propagating.",
    )
    root.command()(simulate)
    root.command()(version)
    root.add_typer(data_app, name="data")
    root.command()(demo)
    root.add_typer(detector_app, name="detector")
    root.command()(serve)
    root.command()(run)
    root.add_typer(export_app, name="export")
    root.command("feed-simulated")(feed_simulated)
    root.add_typer(vendor_app, name="vendor")
    root.add_typer(gold_app, name="gold")
    root.add_typer(campaign_app, name="campaign")
    return root


app = build_app()


def main() -> None:
    """Entry point: user errors and unexpected failures end as one line, not a traceback."""
    try:
        app(standalone_mode=True)
    except MaskpropError as exc:  # a library error that escaped a command
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        typer.echo("error: out of memory; try fewer masks per class", err=True)
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("MASKPROP_DEBUG"):
            raise
        typer.echo(
            f"error: internal error ({type(exc).__name__}: {exc}); "
            "set MASKPROP_DEBUG=1 for the traceback and report it",
            err=True,
        )
        sys.exit(1)
