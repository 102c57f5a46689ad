"""``maskprop data ...``: datasets for the detector (issue #4); added to the root by
:mod:`maskprop_app.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from maskprop.errors import MaskpropError
from maskprop_app.console import Bars, fail

data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make and check datasets for the detector.",
)


@data_app.callback()
def _data() -> None:
    """Make and check datasets for the detector."""


@data_app.command()
def synth(
    images: Annotated[int, typer.Option(help="Number of images to render.")],
    out: Annotated[Path, typer.Option(help="Directory for images/ and annotations/.")],
    seed: Annotated[int, typer.Option(help="Seed of the dataset (same seed, same files).")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels (square images).")] = 128,
    max_objects: Annotated[int, typer.Option(help="Objects placed per image.")] = 6,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Render synthetic scenes with exact instance masks as COCO train/pool/val splits."""
    from maskprop.data.synth import synth_scenes

    bars = Bars(progress)
    try:
        summary = synth_scenes(
            images, out, seed=seed, size=size, max_objects=max_objects, progress=bars
        )
    except MaskpropError as exc:
        bars.close()
        fail(str(exc))
    bars.close()
    typer.echo(f"{'split':<8}{'images':>8}{'instances':>11}  annotations")
    for name, part in summary["splits"].items():
        typer.echo(f"{name:<8}{part['images']:>8,}{part['instances']:>11,}  {part['annotations']}")
    per_class = ", ".join(f"{k} {v:,}" for k, v in summary["per_class"].items())
    typer.echo(f"instances per class: {per_class}")
