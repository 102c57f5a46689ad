"""``maskprop campaign learn-priors``: K_pr/K_pa learned from a labelled held-out set (paper
Sec. 4.2; issue #16's ``prior_accept_threshold = ... or learn K_pr/K_pa from a labelled
held-out set``).

The campaign's detector finds masks on the held-out images, each mask's true IoU against the
held-out ground truth says whether it is correct (IoU >= K_iou), the class trees are built and
P_h/P_l fitted on their clusters (:func:`maskprop.simulate.runner.learn_selection`, what
``maskprop demo`` does on its val split every round), and the thresholds derived from them are
the campaign's next spec version: a parameter change is explicit (``revise``), so sessions
opened later use the learned numbers and sessions already open keep theirs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskprop.campaign_spec import CampaignSpec
from maskprop.data.coco import load_coco_instances
from maskprop.data.instances import detections_pool, mask_ap
from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.progress import Progress, no_progress
from maskprop.simulate.pool import MaskPool
from maskprop_runtime.files import resolve_under


@dataclass(frozen=True)
class Heldout:
    """A labelled held-out set checked against a campaign's classes: image paths under
    ``root`` by image id, the ground truth with class indexes (:func:`detections_pool`'s
    input), the COCO document (mask AP's) and each class's category id there."""

    root: Path
    paths: dict[int, str]
    gt: list[dict[str, Any]]
    doc: dict[str, Any]
    category_ids: list[int]


def load_heldout(classes: Sequence[str], heldout: Path, heldout_images: Path) -> Heldout:
    """Read and check the held-out set: refuses a missing or unreadable file, one without a
    campaign class, and images outside ``heldout_images``."""
    if not Path(heldout).is_file():
        raise MaskpropError(f"held-out set {heldout} does not exist")
    try:
        images, anns, cats = load_coco_instances(heldout)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MaskpropError(f"cannot read held-out set {heldout}: {exc}") from None
    by_name = {str(c["name"]): int(c["id"]) for c in cats}
    missing = [c for c in classes if c not in by_name]
    if missing:
        raise MaskpropError(f"held-out set {heldout} has no category {missing[0]!r}")
    class_of = {by_name[c]: k for k, c in enumerate(classes)}
    paths = {}
    for im in images:
        path = resolve_under(Path(heldout_images), str(im["file_name"]))
        if path is None:
            raise MaskpropError(
                f"{heldout}: image {im['file_name']!r} is not under {heldout_images}"
            )
        paths[int(im["id"])] = str(im["file_name"])
    gt = [
        {"image_id": int(a["image_id"]), "class_id": class_of[int(a["category_id"])],
         "segmentation": a["segmentation"]}
        for a in anns
        if int(a["category_id"]) in class_of
    ]  # fmt: skip
    # Scored on the campaign's classes only: a held-out file's other categories would count
    # as classes the detector never finds (AP 0 each).
    doc = {
        "images": images,
        "annotations": [a for a in anns if int(a["category_id"]) in class_of],
        "categories": [c for c in cats if int(c["id"]) in class_of],
    }
    return Heldout(Path(heldout_images), paths, gt, doc, [by_name[c] for c in classes])


def detect_heldout(
    held: Heldout, model: Any, dcfg: Any, *, device: Any = None, progress: Progress = no_progress
) -> tuple[MaskPool, dict[str, float]]:
    """The detector's masks on the held-out images as a pool (true IoUs against its ground
    truth) and its mask AP there (``ap``, ``ap50``, ``ap75``)."""
    from maskprop_detector.data import read_image
    from maskprop_detector.infer import detect

    def pixels() -> Any:
        for gid, rel in held.paths.items():
            yield gid, read_image(held.root, rel)

    dets = detect(
        model, dcfg, pixels(), total=len(held.paths), device=device,
        progress=lambda _l, d, t: progress("detect held-out", d, t),
    )  # fmt: skip
    pool = detections_pool(dets, held.gt, dcfg.classes)
    return pool, mask_ap(held.doc, dets.coco_results(held.category_ids))


def learned_params(
    params: AnnotationParams, pool: MaskPool
) -> tuple[AnnotationParams, dict[str, float]]:
    """``params`` with K_pr/K_pa learned on ``pool`` (Sec. 4.2) and the Fig. 4 correlations;
    MaskpropError when the pool is too small or too uniform to fit the likelihoods."""
    from maskprop.simulate.runner import learn_selection

    unset = dataclasses.replace(params, prior_reject_threshold=None, prior_accept_threshold=None)
    try:
        selection, _, fig4 = learn_selection(pool, unset)
    except (ValueError, MaskpropError) as exc:
        raise MaskpropError(
            f"cannot learn K_pr/K_pa from {len(pool)} held-out masks: {exc}"
        ) from None
    learned = dataclasses.replace(
        params,
        prior_reject_threshold=float(selection.prior_reject_threshold),
        prior_accept_threshold=float(selection.prior_accept_threshold),
    )
    return learned, {k: v for k, v in fig4.items() if isinstance(v, int | float)}


def learn_priors(
    spec: CampaignSpec,
    heldout: Path,
    heldout_images: Path,
    *,
    weights: Path | None = None,
    device: str = "cpu",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Learn (K_pr, K_pa) for ``spec`` on the held-out set ``heldout`` (COCO instances whose
    ``file_name`` are paths under ``heldout_images``) with ``weights`` (default: the spec's
    detector).  Returns the thresholds, the held-out masks they were learned on, the
    detector's mask AP there and the revised spec (``version + 1``, the learned thresholds in
    its parameters).  Refuses a held-out set without the campaign's classes, images outside
    its folder, and one on which the detector finds too few masks to fit the likelihoods."""
    from maskprop_detector.train import load_model, pick_device

    held = load_heldout(spec.classes, heldout, heldout_images)
    torch_device = pick_device(device)
    model, dcfg = load_model(weights or spec.detector_weights, torch_device)
    if tuple(dcfg.classes) != spec.classes:
        raise MaskpropError(
            f"the detector names classes {list(dcfg.classes)}, the campaign {list(spec.classes)}"
        )
    pool, ap = detect_heldout(held, model, dcfg, device=torch_device, progress=progress)
    params, fig4 = learned_params(spec.params, pool)
    revised = dataclasses.replace(spec, params=params, version=spec.version + 1)
    return {
        "campaign": spec.name,
        "prior_reject_threshold": params.prior_reject_threshold,
        "prior_accept_threshold": params.prior_accept_threshold,
        "heldout_images": len(held.paths),
        "heldout_masks": len(pool),
        "heldout_correct_share": float((pool.ious >= spec.params.iou_threshold).mean())
        if len(pool)
        else 0.0,
        "heldout_mask_ap": ap["ap"],
        "fig4": fig4,
        "revised_spec": revised,
    }
