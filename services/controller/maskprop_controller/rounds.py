"""A campaign's next round (issue #16 item 5), written once for the CLI without a controller
and the controller's ``NextRound``: the checks, then the round's batches published."""

from __future__ import annotations

from maskprop.errors import MaskpropError
from maskprop.progress import Progress
from maskprop_runtime.bus import Producer
from maskprop_runtime.campaigns import CampaignConflict, CampaignRegistry
from maskprop_runtime.ingest import Plan, publish_plan, read_plan


def check_next_round(registry: CampaignRegistry, name: str, round_: int, weights: str) -> None:
    """Refuse a round that cannot be published: an unknown campaign (``CampaignNotFound``), a
    round outside ``2..[budget] rounds`` or empty weights (``MaskpropError``), round
    ``round_ - 1`` not published whole or a campaign that is not running
    (``CampaignConflict``)."""
    spec = registry.spec(name)
    if not 2 <= round_ <= spec.budget.rounds:
        raise MaskpropError(
            f"campaign {name!r} has rounds 1..{spec.budget.rounds} ([budget] rounds): "
            f"round {round_} cannot be published"
        )
    if not weights.strip():
        raise MaskpropError("--weights must name the retrained weights")
    before = read_plan(registry.redis, name, round_ - 1)
    if before is None or not before.done:
        raise CampaignConflict(
            f"round {round_ - 1} of campaign {name!r} is not published whole yet "
            f"({'add-images' if round_ == 2 else 'next-round'} first)"
        )
    state = registry.state(name)
    if state != "running":
        raise CampaignConflict(f"campaign {name!r} is {state}: only a running one gets a round")


def publish_next_round(
    registry: CampaignRegistry,
    name: str,
    round_: int,
    weights: str,
    producer: Producer,
    *,
    batches_per_s: float,
    progress: Progress | None = None,
) -> Plan:
    """Publish campaign ``name``'s images again as round ``round_`` (campaign
    ``<name>.r<round_>``) with ``weights`` (a path under the detector's models root); returns
    the plan as published (``done`` false when a pause or stop cut it short).  Refused before
    anything is published as :func:`check_next_round` says; a rerun resumes where the last one
    stopped."""
    check_next_round(registry, name, round_, weights)
    return publish_plan(
        registry, name, producer, batches_per_s=batches_per_s, progress=progress,
        round_=round_, weights=weights,
    )  # fmt: skip
