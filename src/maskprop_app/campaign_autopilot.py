"""``maskprop campaign autopilot``: a campaign's rounds one after another without an operator
(issue #16 item 5).

Round r+1 starts by itself when round r is over.  The autopilot watches the registry's Redis
(:func:`~maskprop_runtime.ingest.round_progress`: published, detected, trees in search, masks
decided) and the sink's dataset (the round's labels written); when every mask of round r is
decided and its label is in the dataset it

1. exports the accepted masks of rounds 1..r (``campaign export``: de-duplicated across rounds)
   to ``<models>/<campaign>/accepted-r<r>.json``,
2. retrains the detector (``campaign retrain``) from round r's weights (round 1: the spec's) on
   the labelled set plus those masks into ``<models>/<campaign>/round<r+1>.pt``,
3. with a labelled held-out set, learns K_pr/K_pa anew with those weights (``campaign
   learn-priors``, paper Sec. 4.2, what ``maskprop demo`` does every round) and revises the
   spec to them, so round r+1's sessions open with them (``priors-r<r+1>.json`` records it; a
   held-out set the new detector finds too few masks on keeps the thresholds, said in the
   report),
4. publishes round r+1 with those weights (``campaign next-round``),

and watches round r+1.  It stops when the last round (``[budget] rounds``) is decided, when the
budget is spent (no question is left to ask in another round), or when the campaign is paused
or stopped.  Every step is resumable: a rerun finds the weights it wrote (retraining never
overwrites them) and the batches it published, so the autopilot runs as a Kubernetes Job with
restarts (deploy/k8s/base/campaign-autopilot.yaml).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maskprop.errors import MaskpropError
from maskprop.progress import Progress, no_progress
from maskprop_runtime.bus import Producer
from maskprop_runtime.campaigns import CampaignRegistry, leased_key, round_campaign
from maskprop_runtime.ingest import read_plan, round_progress


def _sink_holds(dataset: Path, travels_as: str, decided: int) -> bool:
    from maskprop_sink.dataset import DatasetReader

    try:
        return DatasetReader(dataset).ledger_stats(travels_as)["unique_masks"] >= decided
    except (FileNotFoundError, ValueError):
        return decided == 0


def current_round(registry: CampaignRegistry, name: str) -> int:
    """The latest round of ``name`` whose batches are (being) published; 0: none yet."""
    rounds = registry.spec(name).budget.rounds
    latest = 0
    for r in range(1, rounds + 1):
        plan = read_plan(registry.redis, name, r)
        if plan is None or plan.published == 0:
            break
        latest = r
    return latest


def run_autopilot(
    registry: CampaignRegistry,
    name: str,
    *,
    dataset: Path,
    models_root: Path,
    labelled: Path,
    labelled_images: Path,
    producer: Callable[[], Producer],
    batches_per_s: float,
    retrain_options: dict[str, Any] | None = None,
    heldout: tuple[Path, Path] | None = None,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    progress: Progress = no_progress,
    log: Callable[[str], None] = lambda _msg: None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Drive campaign ``name``'s rounds (module docstring); returns what each round did and
    why it stopped (``stopped``: ``last round``, ``budget spent``, ``paused``, ``stopped``).
    ``producer`` opens a bus producer for a round's batches; ``retrain_options`` go to
    :func:`maskprop_app.campaign_retrain.retrain` (steps, batch_size, lr, device, seed);
    ``heldout``: (COCO, images folder) of a labelled held-out set to learn K_pr/K_pa on every
    round; ``timeout_s``: give up (``MaskpropError``) when a round has not ended by then."""
    from maskprop_controller.rounds import publish_next_round
    from maskprop_sink.campaign_export import export_campaign

    from maskprop_app.campaign_priors import learn_priors
    from maskprop_app.campaign_retrain import retrain

    spec = registry.spec(name)
    if not Path(labelled).is_file():
        raise MaskpropError(f"labelled set {labelled} does not exist")
    if heldout is not None and not Path(heldout[0]).is_file():
        raise MaskpropError(f"held-out set {heldout[0]} does not exist")
    folder = Path(models_root) / name
    r = current_round(registry, name)
    if r == 0:
        raise MaskpropError(f"campaign {name!r} has no images published yet (add-images first)")
    report: dict[str, Any] = {"campaign": name, "rounds": []}
    started = time.monotonic()
    while True:
        state = registry.state(name)
        if state in ("paused", "stopped"):
            report["stopped"] = state
            return report
        got = round_progress(registry, name, r)
        travels_as = round_campaign(name, r)
        # every round's questions count against the one budget
        spent = int(registry.redis.get(leased_key(name)) or 0) >= spec.question_cap()
        over = got.stage == "decided" or (spent and got.stage == "annotating")
        progress(f"round {r}: {got.stage}", got.decided, max(got.masks, 1))
        if not (over and _sink_holds(dataset, travels_as, got.decided)):
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise MaskpropError(
                    f"round {r} of {name!r} did not end within {timeout_s:.0f} s "
                    f"(stage {got.stage}: {got.decided} of {got.masks} masks decided)"
                )
            sleep(poll_s)
            continue
        report["rounds"].append(dataclasses.asdict(got))
        if spent:
            report["stopped"] = "budget spent"
            return report
        if r >= spec.budget.rounds:
            report["stopped"] = "last round"
            return report
        nxt = r + 1
        weights = folder / f"round{nxt}.pt"
        if not weights.exists():
            accepted = folder / f"accepted-r{r}.json"
            summary = export_campaign(dataset, name, accepted)
            log(f"round {r} ended: {summary['annotations']} accepted masks exported; retraining")
            base = folder / f"round{r}.pt" if r > 1 else spec.detector_weights
            trained = retrain(
                spec, labelled=labelled, labelled_images=labelled_images, accepted=[accepted],
                out=weights, round_=nxt, base=base, progress=progress,
                **(retrain_options or {}),
            )  # fmt: skip
            report["rounds"][-1]["retrain"] = trained
        learned = folder / f"priors-r{nxt}.json"
        if heldout is not None and not learned.exists():
            device = (retrain_options or {}).get("device", "cpu")
            spec = registry.spec(name)  # an operator may have revised it meanwhile
            try:
                got_priors = learn_priors(
                    spec, heldout[0], heldout[1], weights=weights, device=device,
                    progress=progress,
                )  # fmt: skip
                revised = got_priors.pop("revised_spec")  # the next version, learned K_pr/K_pa
                got_priors["version"] = registry.revise(revised).spec.version
                spec = revised
            except MaskpropError as exc:  # too few held-out masks: keep the thresholds
                got_priors = {"kept": str(exc)}
            learned.write_text(json.dumps(got_priors))
            log(f"round {nxt} priors: {got_priors}")
            report["rounds"][-1]["priors"] = got_priors
        relative = str(weights.relative_to(models_root))
        sender = producer()
        try:
            plan = publish_next_round(
                registry, name, nxt, relative, sender, batches_per_s=batches_per_s,
                progress=progress,
            )  # fmt: skip
        finally:
            sender.close()
        if not plan.done:
            continue  # paused or stopped while publishing: the loop's state check says which
        log(f"round {nxt} published with {relative}")
        r = nxt
        started = time.monotonic()
