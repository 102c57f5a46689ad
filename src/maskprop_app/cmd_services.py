"""Service commands of the ``maskprop`` CLI: ``serve`` one service, ``run`` the whole pipeline
in one process, ``export coco`` a campaign and ``feed-simulated`` a real broker."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from maskprop.errors import MaskpropError
from maskprop_app.console import Bars, fail, user_errors

if TYPE_CHECKING:
    from maskprop.simulate.pool import MaskPool

export_app = typer.Typer(help="Export a propagated-label dataset.", no_args_is_help=True)


class Service(StrEnum):
    detector = "detector"
    clusterer = "clusterer"
    search = "search"
    label_relay = "label-relay"  # search's labels, with search's MASKPROP_LABEL_RELAY=process
    sink = "sink"
    controller = "controller"


def service_main(name: Service) -> Callable[[], None]:
    """The process entry point of one service.  Imported on demand: the detector pulls in
    torch, and a command that serves one service needs no other's imports."""
    if name is Service.detector:
        from maskprop_detector.service import main as detector_main

        return detector_main
    if name is Service.clusterer:
        from maskprop_clusterer.service import main as clusterer_main

        return clusterer_main
    if name is Service.search:
        from maskprop_search.service import main as search_main

        return search_main
    if name is Service.label_relay:
        from maskprop_search.relay import main as relay_main

        return relay_main
    if name is Service.controller:
        from maskprop_controller.service import main as controller_main

        return controller_main
    from maskprop_sink.service import main as sink_main

    return sink_main


def serve(name: Annotated[Service, typer.Argument(help="Which service to run.")]) -> None:
    """Run one service as its own process (settings from MASKPROP_* environment variables)."""
    with user_errors():
        service_main(name)()


def run(
    config: Annotated[
        Path, typer.Option(help="TOML file: [campaign] [pool] [annotator] [search].")
    ],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/run"),
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Run the whole pipeline in one process (embedded unless MASKPROP_KAFKA_BOOTSTRAP and
    MASKPROP_REDIS_URL point at real servers) and check it against the library."""
    from maskprop_app.embedded import RunConfig, run_pipeline
    from maskprop_runtime.settings import RuntimeSettings

    bars = Bars(progress)
    with user_errors(bars):
        report = run_pipeline(RunConfig.load(config), out, RuntimeSettings(), progress=bars)
    typer.echo(json.dumps(report, indent=2))
    if report["matches_in_process_library"] is False or report["duplicate_labels"]:
        typer.echo("error: the pipeline's labels differ from the library's", err=True)
        sys.exit(1)


@export_app.command("coco")
def export_coco_cmd(
    dataset: Annotated[Path, typer.Option(help="The sink's dataset directory.")],
    campaign: Annotated[str, typer.Option(help="Campaign name.")],
    out: Annotated[Path, typer.Option(help="COCO instances JSON to write.")],
    include_rejected: Annotated[bool, typer.Option(help="Also export rejected masks.")] = False,
) -> None:
    """Stream a campaign's accepted labels into one COCO instances file (RLE masks)."""
    from maskprop_sink.coco import export_coco

    try:
        summary = export_coco(dataset, campaign, out, accepted_only=not include_rejected)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(summary))


def feed_simulated(
    campaign: Annotated[str, typer.Option(help="Campaign name.")],
    masks: Annotated[int, typer.Option(help="Masks in the simulated pool.")] = 20_000,
    classes: Annotated[int, typer.Option(help="Object classes.")] = 10,
    seed: Annotated[int, typer.Option(help="Pool seed.")] = 0,
    dim: Annotated[int, typer.Option(help="Feature dimension.")] = 32,
    big_class: Annotated[
        int,
        typer.Option(
            help="Class 0 holds this many of the masks (one ADE-like class, no size cap); "
            "the other classes share the rest with ADE20K's long-tailed sizes."
        ),
    ] = 0,
) -> None:
    """Publish a simulated detector's masks to the real broker (MASKPROP_KAFKA_BOOTSTRAP)."""
    from maskprop_detector.simulated import pool_events

    from maskprop_runtime import topics
    from maskprop_runtime.bus import make_bus
    from maskprop_runtime.settings import RuntimeSettings
    from maskprop_runtime.treestore import check_name

    try:
        check_name("campaign", campaign)
        settings = RuntimeSettings()
        if not settings.distributed:
            raise MaskpropError("feed-simulated needs MASKPROP_KAFKA_BOOTSTRAP (a real broker)")
        pool = simulated_pool(masks, classes, seed=seed, dim=dim, big_class=big_class)
        bus = make_bus(settings.kafka_bootstrap, **settings.bus_options())
        producer = bus.producer()
        n = 0
        for key, ev in pool_events(pool, campaign):
            producer.send(topics.MASKS, key, ev.SerializeToString())
            n += 1
        producer.close()
    except (MaskpropError, ValueError, ConnectionError) as exc:
        fail(str(exc))
    typer.echo(json.dumps({"campaign": campaign, "masks": len(pool), "events": n}))


def simulated_pool(
    masks: int, classes: int, *, seed: int, dim: int, big_class: int = 0
) -> MaskPool:
    """The pool ``feed-simulated`` publishes: ``ade_like_pool`` (at most 30k masks a class),
    or with ``big_class`` one ADE-like class 0 of that many masks and the other
    ``classes - 1`` classes sharing ``masks - big_class`` with ADE20K's long-tailed sizes
    (the shape of issue #15's scale campaign: a 1M-mask class among a long tail)."""
    import numpy as np

    from maskprop.simulate.generator import ade_class_sizes, ade_like_class, ade_like_pool
    from maskprop.simulate.pool import MaskPool

    if not big_class:
        return ade_like_pool(masks, classes, seed=seed, dim=dim)
    if classes < 2 or not 0 < big_class < masks:
        raise MaskpropError("--big-class needs at least 2 classes and 0 < big-class < masks")
    sizes = [big_class, *(int(n) for n in ade_class_sizes(masks - big_class, classes - 1))]
    parts = [ade_like_class(c, n, seed, dim)[:3] for c, n in enumerate(sizes)]
    return MaskPool(
        features=np.concatenate([p[0] for p in parts]),
        scores=np.concatenate([p[1] for p in parts]),
        ious=np.concatenate([p[2] for p in parts]),
        class_ids=np.repeat(np.arange(classes, dtype=np.int32), sizes),
        class_names=tuple(f"class_{k:03d}" for k in range(classes)),
    )
