"""``maskprop campaign retrain``: a campaign's retraining step between rounds (issue #16 item 5;
paper Sec. 5.1, Fig. 7), the demo's rule as a command and a Kubernetes Job.

The campaign's detector (the spec's weights, or the previous round's) is fine-tuned on the
human-labelled set plus every round's accepted masks.  The accepted masks are merged in round
order and de-duplicated across rounds (:func:`maskprop.data.instances.deduplicate`: within an
image and class a later mask with IoU > 0.5 against an earlier one is dropped, earlier rounds
win), and teach the box and class heads only (the demo measured a lower AP when the mask head
also learned from its own accepted masks).  About half of every batch comes from the labelled
set.  The new weights carry their provenance (campaign, round, masks used) in the
checkpoint's ``extra``; the next round's detection uses them.

Accepted masks come as COCO instance files (``maskprop campaign run``'s ``annotations.json``,
or the sink's export), images named by paths under the campaign's folder; an annotation's
round is its ``maskprop_round``, else the file's position (1, 2, ...).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maskprop.campaign_spec import CampaignSpec
from maskprop.data.coco import load_coco_instances
from maskprop.data.instances import canonical_key, deduplicate
from maskprop.errors import MaskpropError
from maskprop.progress import Progress, no_progress
from maskprop_runtime.files import resolve_under


def load_accepted(
    files: Sequence[Path], images_root: Path, category_of: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(images, annotations) of every accepted file, image ids renumbered by file name (the
    same image in two rounds is one image), in a canonical order (below)."""
    images: dict[str, dict[str, Any]] = {}
    anns: list[dict[str, Any]] = []
    for position, path in enumerate(files, start=1):
        if not Path(path).is_file():
            raise MaskpropError(f"accepted masks file {path} does not exist")
        ims, items, cats = load_coco_instances(path)
        names = {int(c["id"]): str(c["name"]) for c in cats}
        by_id = {}
        for im in ims:
            name = str(im["file_name"])
            if resolve_under(images_root, name) is None:
                raise MaskpropError(
                    f"{path}: image {name!r} is not under the campaign's folder {images_root}"
                )
            kept = images.setdefault(name, dict(im, id=len(images) + 1))
            by_id[int(im["id"])] = kept["id"]
        for a in items:
            cname = names.get(int(a["category_id"]))
            if cname not in category_of:
                raise MaskpropError(f"{path}: category {cname!r} is not one of the campaign's")
            anns.append(
                dict(
                    a,
                    image_id=by_id[int(a["image_id"])],
                    category_id=category_of[cname],
                    maskprop_round=int(a.get("maskprop_round", position)),
                )
            )
    # One canonical order, whatever the files' (canonical_key): images by file name, masks by
    # round, image, class and RLE, so the same accepted masks give the same weights.
    image_names = sorted(images)
    renumber = {images[n]["id"]: k for k, n in enumerate(image_names, start=1)}
    ordered = [dict(images[n], id=renumber[images[n]["id"]]) for n in image_names]
    for a in anns:
        a["image_id"] = renumber[a["image_id"]]
    anns.sort(key=lambda a: canonical_key(a, image_names[a["image_id"] - 1]))
    return ordered, anns


def retrain(
    spec: CampaignSpec,
    *,
    labelled: Path,
    labelled_images: Path,
    accepted: Sequence[Path],
    out: Path,
    round_: int,
    base: Path | None = None,
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 5e-4,
    device: str = "cpu",
    seed: int = 0,
    propagated_masks: bool = False,
    resume: bool = False,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Fine-tune ``base`` (default: the spec's weights) into ``out`` for round ``round_``
    (module docstring); returns what it trained on.  Refuses, before training, an ``out``
    that exists, a labelled set without the campaign's classes, accepted masks naming images
    outside the campaign's folder, and a detector naming other classes.  ``resume`` is for a
    runner that owns ``out``'s folder (``campaign run``, the demo): an ``out`` that an earlier
    run finished from the very same inputs (files and settings, by sha256) is kept and its
    record returned (``reused``: True); one from other inputs is trained anew."""
    import torch
    from maskprop_detector.data import LabelledSet, mixed_training_set, propagated_set
    from maskprop_detector.train import (
        TrainConfig,
        load_model,
        pick_device,
        save_checkpoint,
        train,
    )

    out = Path(out)
    if round_ < 2:
        raise MaskpropError("retraining makes the weights of round 2 or later: --round >= 2")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise MaskpropError("steps, batch size and learning rate must be positive")
    if out.exists() and not resume:
        raise MaskpropError(f"{out} exists: retraining never overwrites weights")
    if not Path(labelled).is_file():
        raise MaskpropError(f"labelled set {labelled} does not exist")
    train_set = LabelledSet.from_coco(labelled, labelled_images)
    category_of = {str(c["name"]): int(c["id"]) for c in train_set.categories}
    missing = [c for c in spec.classes if c not in category_of]
    if missing:
        raise MaskpropError(f"labelled set {labelled} has no category {missing[0]!r}")
    images, anns = load_accepted(accepted, spec.images_root, category_of)
    inputs = _inputs_digest(
        [labelled, *accepted, base or spec.detector_weights],
        [spec.name, list(spec.classes), round_, steps, batch_size, lr, seed, propagated_masks],
    )
    if out.exists():  # resume
        done = _finished(out, inputs)
        if done is not None:
            return {**done, "weights": str(out), "reused": True}
        out.unlink()  # from other inputs: this run's owner trains it anew
    keep = deduplicate(anns)
    kept = [anns[i] for i in keep]
    torch_device = pick_device(device)
    model, dcfg = load_model(base or spec.detector_weights, torch_device)
    if tuple(dcfg.classes) != spec.classes:
        raise MaskpropError(
            f"the detector names classes {list(dcfg.classes)}, the campaign {list(spec.classes)}"
        )
    torch.manual_seed(seed)
    extra = propagated_set(
        images, spec.images_root, train_set.categories, kept, masks=propagated_masks
    )
    data = mixed_training_set(train_set, extra, spec.classes)
    used = {int(a["image_id"]) for a in kept}
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed + round_)
    partial = out.with_name(out.name + ".partial")
    losses = train(
        model, dcfg, data, tcfg, checkpoint=partial, device=torch_device, progress=progress
    )
    provenance = {
        "campaign": spec.name,
        "round": round_,
        "inputs_sha256": inputs,
        "accepted_masks": len(kept),
        "duplicates_dropped": len(anns) - len(kept),
        "accepted_images": len(used),
        "labelled_images": len(train_set.images),
        "steps": steps,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance["final_losses"] = {k: float(v) for k, v in losses.items()}
    save_checkpoint(out, model, dcfg, step=steps, extra={"maskprop_campaign": provenance})
    partial.unlink(missing_ok=True)
    return {**provenance, "weights": str(out)}


def _inputs_digest(files: Sequence[Path], settings: list[Any]) -> str:
    """sha256 over the files' bytes and the settings: what a retraining's weights depend on."""
    h = hashlib.sha256(json.dumps(settings).encode())
    for f in files:
        try:
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
        except OSError as exc:
            raise MaskpropError(f"cannot read {f}: {exc.strerror or exc}") from None
    return h.hexdigest()


def _finished(out: Path, inputs: str) -> dict[str, Any] | None:
    """The record of weights ``out`` if an earlier run trained them from ``inputs``."""
    from maskprop_detector.train import read_checkpoint

    try:
        saved = read_checkpoint(out).get("extra", {}).get("maskprop_campaign", {})
    except MaskpropError:
        return None
    return dict(saved) if saved.get("inputs_sha256") == inputs else None
