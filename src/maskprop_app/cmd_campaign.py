"""``maskprop campaign``: create a campaign from a spec file, list, status, pause, resume, stop,
revise, add its images (issue #16 items 1-3), run it embedded, retrain and export it, and run
its rounds without an operator (``autopilot``).

``create``, ``revise``, ``list``, ``status``, ``pause``, ``resume`` and ``stop`` go to the
campaign controller (``MASKPROP_CONTROLLER_ADDR``, with ``MASKPROP_CONTROLLER_ADMIN_TOKEN``)
when it is set, else straight to the campaign registry in Redis (``MASKPROP_REDIS_URL``).
``add-images`` reads the images where it runs, so it always uses Redis and the broker
(``MASKPROP_KAFKA_BOOTSTRAP``).  Without any of them there is nothing durable to talk to, so the
commands refuse to run rather than create a campaign in a throw-away in-process store.
``export`` streams the campaign from the sink's gRPC ``Dataset`` service (``MASKPROP_SINK_ADDR``,
with ``MASKPROP_SINK_ADMIN_TOKEN``) when it is set, else reads the sink's dataset folder
(``--dataset`` or ``MASKPROP_DATASET_DIR``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from maskprop.errors import MaskpropError
from maskprop_app.console import Bars, fail, user_errors

campaign_app = typer.Typer(
    help="Campaigns: a team's images, classes, detector, parameters and budget.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(help="Campaign name.")]


class CampaignCliSettings(BaseSettings):
    """Where the campaign commands find the controller (``MASKPROP_CONTROLLER_*``) and the
    sink's export (``MASKPROP_SINK_*``)."""

    model_config = SettingsConfigDict(env_prefix="MASKPROP_", extra="ignore")

    controller_addr: str | None = None  # host:port of the campaign controller's gRPC
    controller_admin_token: SecretStr | None = None
    sink_addr: str | None = None  # host:port of the sink's gRPC (campaign export)
    sink_admin_token: SecretStr | None = None


def open_redis(settings: Any) -> Any:
    """The registry's Redis; refused without ``MASKPROP_REDIS_URL`` (nothing would last)."""
    from maskprop_runtime.store import make_redis

    if settings.redis_url is None:
        raise MaskpropError("campaign commands need MASKPROP_REDIS_URL (the campaign registry)")
    return make_redis(
        settings.redis_url.get_secret_value(), connect_timeout_s=settings.connect_timeout_s
    )


def open_bus(settings: Any) -> Any:
    """The broker ``add-images`` publishes to; refused without ``MASKPROP_KAFKA_BOOTSTRAP``."""
    from maskprop_runtime.bus import make_bus

    if not settings.distributed:
        raise MaskpropError("add-images needs MASKPROP_KAFKA_BOOTSTRAP (a real broker)")
    return make_bus(settings.kafka_bootstrap, **settings.bus_options())


class DirectRegistry:
    """The controller's interface over the registry in Redis (no controller deployed)."""

    def __init__(self, redis: Any) -> None:
        from maskprop_runtime.campaigns import CampaignRegistry

        self.registry = CampaignRegistry(redis)
        self.create = self.registry.create
        self.revise = self.registry.revise
        self.list = self.registry.list
        self.set_state = self.registry.set_state

    def status(self, name: str) -> Any:
        from maskprop_runtime.ingest import campaign_status

        return campaign_status(self.registry, name)


def _registry() -> Any:
    """The controller's client when ``MASKPROP_CONTROLLER_ADDR`` is set, else the registry."""
    from maskprop_runtime.ingest import IngestSettings

    settings = CampaignCliSettings()
    if settings.controller_addr:
        from maskprop_controller.client import ControllerClient

        token = settings.controller_admin_token
        return ControllerClient(
            settings.controller_addr, admin_token=token.get_secret_value() if token else None
        )
    return DirectRegistry(open_redis(IngestSettings()))


def _summary(campaign: Any) -> dict[str, Any]:
    from maskprop_runtime.campaigns import STATE_NAME

    spec = campaign.spec
    a, b = spec.annotation, spec.budget
    return {
        "name": spec.name,
        "version": spec.version,
        "state": STATE_NAME[campaign.state],
        "classes": list(spec.classes),
        "images": spec.images_root,
        "annotation": {
            "N_s": a.samples_per_cluster,
            "K_a": a.accept_threshold,
            "K_iou": a.iou_threshold,
            "K_pa": a.prior_accept_threshold,
            "K_pr": a.prior_reject_threshold,
            "redundancy": a.redundancy,
            "strategy": a.strategy,
            "seed": a.seed,
        },
        "budget": {
            "questions": b.questions,
            "hours": b.hours,
            "dollars": b.dollars,
            "wage": b.hourly_wage,
            "rounds": b.rounds,
        },
    }


@campaign_app.command("create")
def create(
    spec: Annotated[Path, typer.Option(help="Campaign spec (TOML).")],
) -> None:
    """Store a new campaign from its spec (a taken name is refused)."""
    from maskprop.campaign_spec import load_spec

    with user_errors():
        parsed = load_spec(spec)
        made = _registry().create(parsed)
    typer.echo(json.dumps(_summary(made), indent=2))


@campaign_app.command("revise")
def revise(
    spec: Annotated[Path, typer.Option(help="The campaign's spec with version = current + 1.")],
) -> None:
    """Change a campaign's parameters explicitly: the spec must carry the next version."""
    from maskprop.campaign_spec import load_spec

    with user_errors():
        parsed = load_spec(spec)
        revised = _registry().revise(parsed)
    typer.echo(json.dumps(_summary(revised), indent=2))


@campaign_app.command("list")
def list_campaigns() -> None:
    """Every campaign: name, version, state, classes."""
    from maskprop_runtime.campaigns import STATE_NAME

    with user_errors():
        campaigns = _registry().list()
    if not campaigns:
        typer.echo("no campaigns")
    for c in campaigns:
        typer.echo(
            f"{c.spec.name}\tv{c.spec.version}\t{STATE_NAME[c.state]}\t{','.join(c.spec.classes)}"
        )


@campaign_app.command("status")
def status(name: NameArg) -> None:
    """The campaign's spec, state, each stage's progress, and its budget spent with the masks
    expected at the budget (JSON)."""
    with user_errors():
        st = _registry().status(name)
    out = _summary(st.campaign)
    out["stages"] = {s.stage: {"done": s.done, "total": s.total} for s in st.stages}
    out["refused"] = dict(st.refused)
    b = st.budget
    out["spent"] = {
        "questions": b.questions_leased,
        "of_questions": b.question_cap,
        "hours": round(b.hours_spent, 4),
        "dollars": round(b.dollars_spent, 2),
        "masks_accepted": b.masks_accepted,
        "masks_decided": b.masks_decided,
        "masks": b.masks,
        "forecast_masks_at_budget": round(b.forecast_masks_at_budget, 1),
    }
    typer.echo(json.dumps(out, indent=2))


def _set_state(name: str, state: str) -> None:
    from maskprop_runtime.campaigns import STATE_NAME

    with user_errors():
        c = _registry().set_state(name, state)
    typer.echo(f"{name}: {STATE_NAME[c.state]}")


@campaign_app.command("pause")
def pause(name: NameArg) -> None:
    """Pause a campaign (add-images stops publishing; resume continues)."""
    _set_state(name, "paused")


@campaign_app.command("resume")
def resume(name: NameArg) -> None:
    """Resume a paused campaign."""
    _set_state(name, "running")


@campaign_app.command("stop")
def stop(name: NameArg) -> None:
    """Stop a campaign for good."""
    _set_state(name, "stopped")


@campaign_app.command("add-images")
def add_images(
    name: NameArg,
    manifest: Annotated[
        Path | None,
        typer.Option(help="File of image paths (one a line) under the campaign's folder."),
    ] = None,
    all_or_nothing: Annotated[
        bool, typer.Option(help="Refuse every image when any one is refused.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Check the campaign's images (readable, size and pixel limits, de-duplicated by content,
    under its folder), record them and publish them to the detector at a bounded rate
    (MASKPROP_INGEST_BATCH_SIZE, MASKPROP_INGEST_BATCHES_PER_S).  Run it again after an
    interruption: it resumes where publishing stopped."""
    from maskprop_runtime.campaigns import CampaignRegistry
    from maskprop_runtime.ingest import (
        IngestSettings,
        check_images,
        publish_plan,
        read_plan,
        record_plan,
    )

    bars = Bars(progress)
    with user_errors(bars):
        settings = IngestSettings()
        registry = CampaignRegistry(open_redis(settings))
        spec = registry.spec(name)
        state = registry.state(name)
        if state in ("paused", "stopped"):
            raise MaskpropError(f"campaign {name!r} is {state}: resume it before adding images")
        plan = read_plan(registry.redis, name)
        if plan is not None and plan.done:
            raise MaskpropError(
                f"campaign {name!r} already published its {plan.images} images "
                f"({plan.batch_count} batches)"
            )
        bus = open_bus(settings)  # before any check: no plan without a broker to send it
        report = None
        if plan is None:
            report = check_images(spec, registry.redis, settings, manifest=manifest, progress=bars)
            refused = sum(report.refused.values())
            for reason, count in sorted(report.refused.items()):
                shown = ", ".join(report.examples[reason])
                typer.echo(f"refused {count} ({reason}): {shown}", err=True)
            if all_or_nothing and refused:
                raise MaskpropError(
                    f"{refused} image(s) refused and --all-or-nothing: nothing was added"
                )
            if not report.accepted:
                raise MaskpropError(f"no image was accepted ({refused} refused): nothing added")
            plan = record_plan(registry, name, report, settings.ingest_batch_size)
        producer = bus.producer()
        try:
            plan = publish_plan(
                registry,
                name,
                producer,
                batches_per_s=settings.ingest_batches_per_s,
                progress=bars,
            )
        finally:
            producer.close()
    result = {
        "campaign": name,
        "accepted": len(report.accepted) if report else 0,
        "refused": dict(report.refused) if report else {},
        "images": plan.images,
        "batches": plan.batch_count,
        "published": plan.published,
    }
    typer.echo(json.dumps(result))
    if not plan.done:
        fail(f"campaign {name!r} was paused or stopped after {plan.published} batches")


@campaign_app.command("run")
def run(
    spec: Annotated[Path, typer.Option(help="Campaign spec (TOML).")],
    out: Annotated[Path, typer.Option(help="Output folder (report.json, annotations.json).")],
    simulated_crowd: Annotated[
        Path | None,
        typer.Option(help="Ground truth (COCO) a simulated crowd answers from."),
    ] = None,
    crowd_error: Annotated[
        float, typer.Option(help="Share of the simulated crowd's answers flipped (0-0.5).")
    ] = 0.0,
    device: Annotated[str, typer.Option(help="Detector device: cpu, cuda, auto.")] = "cpu",
    retrain_steps: Annotated[
        int, typer.Option(help="Optimiser steps of each retraining between rounds.")
    ] = 200,
    batch_size: Annotated[int, typer.Option(help="Images a retraining step.")] = 8,
    heldout: Annotated[
        Path | None,
        typer.Option(
            help="A labelled held-out set (COCO): each round's mask AP there, K_pr/K_pa "
            "learned on it, and the plots."
        ),
    ] = None,
    heldout_images: Annotated[
        Path | None, typer.Option(help="Folder of the held-out set's images.")
    ] = None,
    control: Annotated[
        bool,
        typer.Option(
            help="Also retrain on the labelled set alone each round and report its held-out AP."
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Run a campaign embedded, in one process with no servers (in-memory bus and Redis): its
    images through the detector, clusterer, search and sink, with the spec's parameters and
    budget, a simulated crowd answering (``maskprop_app.campaign_run``; ``maskprop demo`` is
    this path on synthetic data).  Prints the report."""
    from maskprop.campaign_spec import load_spec

    bars = Bars(progress)
    with user_errors(bars):
        if simulated_crowd is None:
            raise MaskpropError(
                "campaign run needs --simulated-crowd GT_COCO.json: in one process nobody else "
                "can answer (a real crowd answers a distributed campaign through the gateway)"
            )
        if (heldout is None) != (heldout_images is None):
            raise MaskpropError("--heldout and --heldout-images go together")
        parsed = load_spec(spec)
        from maskprop_app.campaign_run import run_spec

        report = run_spec(
            parsed, out, simulated_crowd, crowd_error=crowd_error, device=device,
            retrain_steps=retrain_steps, batch_size=batch_size,
            heldout=(heldout, heldout_images) if heldout and heldout_images else None,
            control=control, progress=bars,
        )  # fmt: skip
    typer.echo(json.dumps(report, indent=2))


@campaign_app.command("retrain")
def retrain(
    name: Annotated[
        str | None, typer.Argument(help="Campaign name (its spec from the registry).")
    ] = None,
    spec: Annotated[
        Path | None, typer.Option(help="The campaign's spec file instead of the registry.")
    ] = None,
    labelled: Annotated[Path, typer.Option(help="The human-labelled set (COCO).")] = Path(
        "labelled.json"
    ),
    labelled_images: Annotated[
        Path, typer.Option(help="Folder of the labelled set's images.")
    ] = Path("images"),
    accepted: Annotated[
        list[Path] | None,
        typer.Option(help="Accepted masks (COCO) of a round; repeat, earliest round first."),
    ] = None,
    out: Annotated[Path, typer.Option(help="New weights (never overwritten).")] = Path(
        "detector.pt"
    ),
    round_: Annotated[int, typer.Option("--round", help="The round these weights serve.")] = 2,
    base: Annotated[
        Path | None, typer.Option(help="Weights to start from (default: the spec's).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Images a step.")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 5e-4,
    device: Annotated[str, typer.Option(help="cpu, cuda, auto.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Retrain the campaign's detector between rounds on the labelled set plus the accepted
    masks of every round, de-duplicated across rounds (``maskprop_app.campaign_retrain``);
    writes new weights with the round as provenance.  Prints what it trained on (JSON)."""
    from maskprop.campaign_spec import load_spec

    bars = Bars(progress)
    with user_errors(bars):
        if (name is None) == (spec is None):
            raise MaskpropError("give the campaign's NAME (registry) or --spec FILE, not both")
        if spec is not None:
            parsed = load_spec(spec)
        else:
            from maskprop_runtime.campaigns import CampaignRegistry
            from maskprop_runtime.ingest import IngestSettings

            assert name is not None
            parsed = CampaignRegistry(open_redis(IngestSettings())).spec(name)
        if not accepted:
            raise MaskpropError("give the accepted masks of at least one round (--accepted)")
        from maskprop_app.campaign_retrain import retrain as run_retrain

        result = run_retrain(
            parsed, labelled=labelled, labelled_images=labelled_images, accepted=accepted,
            out=out, round_=round_, base=base, steps=steps, batch_size=batch_size, lr=lr,
            device=device, progress=bars,
        )  # fmt: skip
    typer.echo(json.dumps(result, indent=2))


@campaign_app.command("learn-priors")
def learn_priors(
    heldout: Annotated[Path, typer.Option(help="Labelled held-out set (COCO instances).")],
    heldout_images: Annotated[Path, typer.Option(help="Folder of the held-out set's images.")],
    name: Annotated[
        str | None,
        typer.Argument(help="Campaign name: its spec is revised with the learned K_pr/K_pa."),
    ] = None,
    spec: Annotated[
        Path | None,
        typer.Option(help="The campaign's spec file instead: prints them, stores nothing."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Detector weights (default: the spec's).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, auto.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Learn K_pr/K_pa (paper Sec. 4.2) from a labelled held-out set with the campaign's
    detector; with NAME the campaign's spec is revised to them (the next version: sessions
    opened from then on use them).  Prints the thresholds (JSON)."""
    from maskprop.campaign_spec import load_spec
    from maskprop_runtime.campaigns import spec_from_proto

    bars = Bars(progress)
    with user_errors(bars):
        if (name is None) == (spec is None):
            raise MaskpropError("give the campaign's NAME (registry) or --spec FILE, not both")
        registry = None
        if spec is not None:
            parsed = load_spec(spec)
        else:
            assert name is not None
            registry = _registry()
            parsed = spec_from_proto(registry.status(name).campaign.spec)
        from maskprop_app.campaign_priors import learn_priors as run_learn

        result = run_learn(
            parsed, heldout, heldout_images, weights=weights, device=device, progress=bars
        )
        revised = result.pop("revised_spec")
        if registry is not None:
            result["version"] = registry.revise(revised).spec.version
    typer.echo(json.dumps(result, indent=2))


@campaign_app.command("export")
def export(
    name: NameArg,
    out: Annotated[Path, typer.Option(help="COCO instances JSON to write.")],
    dataset: Annotated[
        Path | None,
        typer.Option(
            help="The sink's dataset folder, read here (default: the sink's gRPC at "
            "MASKPROP_SINK_ADDR when set, else MASKPROP_DATASET_DIR)."
        ),
    ] = None,
    deduplicate: Annotated[
        bool, typer.Option(help="Drop a mask that repeats an earlier round's (IoU > 0.5).")
    ] = True,
) -> None:
    """Export the campaign's accepted masks of every round as one COCO file, each annotation's
    round in ``maskprop_round`` (``maskprop_sink.campaign_export``): from the dataset folder, or
    streamed from the sink's gRPC ``Dataset`` service (``MASKPROP_SINK_ADDR`` with
    ``MASKPROP_SINK_ADMIN_TOKEN``) when no ``--dataset`` is given.  Prints counts (JSON)."""
    with user_errors():
        settings = CampaignCliSettings()
        if dataset is None and settings.sink_addr:
            from maskprop_sink.client import export_over_grpc

            token = settings.sink_admin_token
            summary = export_over_grpc(
                settings.sink_addr, name, out,
                admin_token=token.get_secret_value() if token else None,
                keep_duplicates=not deduplicate,
            )  # fmt: skip
        else:
            from maskprop_sink.campaign_export import export_campaign

            if dataset is None:
                from maskprop_sink.service import SinkSettings

                dataset = SinkSettings().dataset_dir
            summary = export_campaign(dataset, name, out, deduplicate_rounds=deduplicate)
    typer.echo(json.dumps(summary))


@campaign_app.command("next-round")
def next_round(
    name: NameArg,
    weights: Annotated[
        str,
        typer.Option(
            help="The retrained weights (campaign retrain's --out), as the detector finds them: "
            "a path under its models root (MASKPROP_MODELS_ROOT)."
        ),
    ],
    round_: Annotated[int, typer.Option("--round", help="The round to publish (2, 3, ...).")] = 2,
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Publish the campaign's images again as round ROUND, detected with the retrained
    WEIGHTS: the detector re-detects them under the campaign ``<name>.r<round>``, whose classes
    the clusterer and search open as new trees with the campaign's parameters, budget (shared
    by every round) and folder; the sink keeps the round as provenance (``campaign export``
    merges every round).  Needs round ROUND - 1 published whole; a rerun resumes."""
    from maskprop_runtime.campaigns import round_campaign

    bars = Bars(progress)
    with user_errors(bars):
        settings = CampaignCliSettings()
        if settings.controller_addr:  # the controller publishes (no broker or Redis here)
            client = _registry()
            try:
                sent = client.next_round(name, round_, weights)
            finally:
                client.close()
            batches, published, done = sent.batches, sent.published, sent.done
        else:
            from maskprop_controller.rounds import check_next_round, publish_next_round

            from maskprop_runtime.campaigns import CampaignRegistry
            from maskprop_runtime.ingest import IngestSettings

            ingest = IngestSettings()
            registry = CampaignRegistry(open_redis(ingest))
            check_next_round(registry, name, round_, weights)  # before asking for a broker
            producer = open_bus(ingest).producer()
            try:
                plan = publish_next_round(
                    registry, name, round_, weights, producer,
                    batches_per_s=ingest.ingest_batches_per_s, progress=bars,
                )  # fmt: skip
            finally:
                producer.close()
            batches, published, done = plan.batch_count, plan.published, plan.done
    typer.echo(
        json.dumps(
            {
                "campaign": name,
                "round": round_,
                "travels_as": round_campaign(name, round_),
                "weights": weights,
                "batches": batches,
                "published": published,
            }
        )
    )
    if not done:
        fail(f"campaign {name!r} was paused or stopped after {published} batches")


@campaign_app.command("autopilot")
def autopilot(
    name: NameArg,
    labelled: Annotated[Path, typer.Option(help="The human-labelled set (COCO).")],
    labelled_images: Annotated[Path, typer.Option(help="Folder of the labelled set's images.")],
    models_root: Annotated[
        Path,
        typer.Option(
            help="The detector's models root (MASKPROP_MODELS_ROOT): round weights go to "
            "<root>/<campaign>/round<R>.pt."
        ),
    ],
    dataset: Annotated[
        Path | None,
        typer.Option(help="The sink's dataset folder (default: MASKPROP_DATASET_DIR)."),
    ] = None,
    heldout: Annotated[
        Path | None,
        typer.Option(help="A labelled held-out set (COCO): K_pr/K_pa learned on it every round."),
    ] = None,
    heldout_images: Annotated[
        Path | None, typer.Option(help="Folder of the held-out set's images.")
    ] = None,
    poll_s: Annotated[float, typer.Option(help="Seconds between looks at the round.")] = 10.0,
    timeout_s: Annotated[
        float, typer.Option(help="Give up when a round has not ended in this many s (0: never).")
    ] = 0.0,
    steps: Annotated[int, typer.Option(help="Retraining: optimiser steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Retraining: images a step.")] = 8,
    lr: Annotated[float, typer.Option(help="Retraining: learning rate.")] = 5e-4,
    device: Annotated[str, typer.Option(help="Retraining: cpu, cuda, auto.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Run the campaign's rounds without an operator: when round R is decided and its labels
    are in the sink's dataset, export the accepted masks, retrain into
    ``<models-root>/<campaign>/round<R+1>.pt``, learn K_pr/K_pa anew on --heldout (revising the
    spec) and publish round R+1; stop at the last round, a
    spent budget, a pause or a stop (``maskprop_app.campaign_autopilot``).  Resumable.  Prints
    what each round did (JSON)."""
    from maskprop_app.campaign_autopilot import run_autopilot

    bars = Bars(progress)
    with user_errors(bars):
        if steps < 1 or batch_size < 1 or lr <= 0 or poll_s <= 0 or timeout_s < 0:
            raise MaskpropError("steps, batch size, learning rate and poll must be positive")
        if (heldout is None) != (heldout_images is None):
            raise MaskpropError("give --heldout and --heldout-images together")
        from maskprop_runtime.campaigns import CampaignRegistry
        from maskprop_runtime.ingest import IngestSettings

        if dataset is None:
            from maskprop_sink.service import SinkSettings

            dataset = SinkSettings().dataset_dir
        ingest = IngestSettings()
        registry = CampaignRegistry(open_redis(ingest))
        report = run_autopilot(
            registry, name, dataset=dataset, models_root=models_root, labelled=labelled,
            labelled_images=labelled_images, producer=lambda: open_bus(ingest).producer(),
            batches_per_s=ingest.ingest_batches_per_s,
            retrain_options={"steps": steps, "batch_size": batch_size, "lr": lr,
                             "device": device},
            heldout=(heldout, heldout_images) if heldout and heldout_images else None,
            poll_s=poll_s, timeout_s=timeout_s or None, progress=bars,
            log=lambda msg: typer.echo(msg, err=True),
        )  # fmt: skip
    typer.echo(json.dumps(report))
