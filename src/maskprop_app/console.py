"""Console helpers shared by every command group: progress bars on stderr and the one-line
``error: ...`` exit (status 2) that every user mistake ends in; no tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from tqdm import tqdm

from maskprop.errors import MaskpropError


class Bars:
    """One tqdm bar per stage, created on first report and closed when it completes.

    An instance is the ``progress(label, done, total)`` callback the library and the runners
    take, so they report progress without knowing about tqdm."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, tqdm[Any]] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(label)
        if bar is None:
            bar = tqdm(
                total=total, desc=f"{label:>14}", leave=True, file=sys.stderr, mininterval=0.5
            )
            self.bars[label] = bar
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)  # update() throttles redraws (mininterval)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def fail(message: str) -> NoReturn:
    """End the command with ``error: <message>`` on stderr and exit status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@contextmanager
def user_errors(bars: Bars | None = None) -> Iterator[None]:
    """Bad input, settings or connections, or a missing optional package, end a command in
    one ``error:`` line (exit 2), never a traceback; progress bars are closed first."""
    try:
        yield
    except (MaskpropError, ConnectionError) as exc:
        fail(str(exc))
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"bad setting {'.'.join(str(x) for x in first['loc'])}: {first['msg']}")
    except ModuleNotFoundError as exc:
        fail(f"{exc.name} is not installed: pip install -e '.[detector]'")
    finally:
        if bars is not None:
            bars.close()
