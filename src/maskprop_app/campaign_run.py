"""``maskprop campaign run``: a campaign spec embedded, in one process with no servers (issue #16
item 7).

The same services code as the distributed campaign, wired in memory (in-memory bus, fakeredis):
the campaign's images are checked as ``add-images`` checks them (readable, size and pixel
limits, de-duplicated by content, confined under the campaign's folder), the spec's detector
finds masks on them, and :func:`maskprop_app.embedded.run_campaign` (the demo's path) sends the
masks through the clusterer, search and sink.  Search opens every class's session with the
spec's parameters through the campaign registry's ``params_for`` (as a distributed search
replica does), and the crowd is simulated: it answers each question from the ground truth
(``--simulated-crowd``, COCO), thresholding the mask's true IoU at the spec's K_iou, with
``crowd_error`` of the answers flipped.

The spec's budget is the campaign loop's limit: no question is leased beyond
:meth:`~maskprop.campaign_spec.Budget.question_cap` (questions, hours or dollars, whichever is
reached first).  Rounds: this runs round 1 (retraining between rounds is ``campaign retrain``,
issue #16 item 5); ``rounds`` in the report lists each round run.

Writes under ``out``: ``r1/`` (the round's services state, sink dataset and its COCO export),
``annotations.json`` (the accepted masks as COCO instances against the ground truth's image
ids, images named by their paths under the campaign's folder, ``maskprop_round`` as
provenance: what ``campaign retrain`` reads) and ``report.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
from PIL import Image

from maskprop.campaign_spec import CampaignSpec
from maskprop.data.coco import instance, load_coco_instances, write_coco
from maskprop.data.instances import true_ious
from maskprop.errors import MaskpropError
from maskprop.files import atomic_file
from maskprop.metrics import cost_usd
from maskprop.progress import Progress, no_progress
from maskprop.simulate.pool import MaskPool
from maskprop.simulate.scenes import mask_id
from maskprop_app.embedded import campaign_metrics, run_campaign
from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.ingest import IngestSettings, check_images
from maskprop_runtime.settings import RuntimeSettings


def _ground_truth(
    path: Path, classes: tuple[str, ...]
) -> tuple[dict[str, int], list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """(file name -> image id, gt items for :func:`true_ious`, images, category id of each
    class) of a COCO instances file; every spec class must be one of its categories."""
    if not Path(path).is_file():
        raise MaskpropError(f"ground truth file {path} does not exist")
    try:
        images, anns, cats = load_coco_instances(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MaskpropError(f"cannot read ground truth {path}: {exc}") from None
    by_name = {str(c["name"]): int(c["id"]) for c in cats}
    missing = [c for c in classes if c not in by_name]
    if missing:
        raise MaskpropError(
            f"ground truth {path} has no category {missing[0]!r} "
            f"(its categories: {', '.join(sorted(by_name))})"
        )
    category_ids = [by_name[c] for c in classes]
    class_of = {cid: k for k, cid in enumerate(category_ids)}
    files = {str(im["file_name"]): int(im["id"]) for im in images}
    gt = [
        {
            "image_id": int(a["image_id"]),
            "class_id": class_of[int(a["category_id"])],
            "segmentation": a["segmentation"],
        }
        for a in anns
        if int(a["category_id"]) in class_of
    ]
    return files, gt, images, category_ids


def _image_entry(gid: int, rel: str, gt: dict[str, Any] | None, root: Path) -> dict[str, Any]:
    """A COCO image entry named by its path under the campaign's folder (what retraining
    reads), sized from the ground truth or the file."""
    if gt is not None:
        return {"id": gid, "file_name": rel, "width": gt["width"], "height": gt["height"]}
    with Image.open(root / rel) as im:
        return {"id": gid, "file_name": rel, "width": im.width, "height": im.height}


def run_spec(
    spec: CampaignSpec,
    out: Path,
    ground_truth: Path,
    *,
    crowd_error: float = 0.0,
    device: str = "cpu",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Run ``spec`` embedded with a crowd simulated from ``ground_truth`` (COCO instances whose
    images' ``file_name`` are paths under the campaign's folder, or their base names).

    Returns (and writes to ``out/report.json``) per round: masks detected and accepted, SQ
    (mean true IoU of the accepted masks), questions, hours and dollars, and the budget.
    Refuses, before writing anything, a spec whose detector names other classes, a ground
    truth without the spec's classes, a campaign folder with no acceptable image, and an
    ``out`` that holds a finished run."""
    from maskprop_detector.data import read_image
    from maskprop_detector.events import closed_events, masks_events, table_encoder
    from maskprop_detector.infer import detect
    from maskprop_detector.train import load_model, pick_device

    from maskprop_runtime.pb.maskprop.common.v1 import common_pb2

    started = time.perf_counter()
    out = Path(out)
    if not 0.0 <= crowd_error <= 0.5:
        raise MaskpropError("crowd error must be in [0, 0.5]")
    if (out / "report.json").exists():
        raise MaskpropError(f"{out} already holds a finished campaign run; choose another --out")
    files, gt, gt_images, category_ids = _ground_truth(ground_truth, spec.classes)
    torch_device = pick_device(device)
    model, dcfg = load_model(spec.detector_weights, torch_device)
    if tuple(dcfg.classes) != spec.classes:
        raise MaskpropError(
            f"the detector {spec.detector_weights} names classes {list(dcfg.classes)}, "
            f"the spec {list(spec.classes)}: they must be the same, in the same order"
        )
    # The campaign's registry, in memory: the images' de-duplication and the parameters
    # search opens its sessions with (params_for), as in the distributed services.
    registry = CampaignRegistry(fakeredis.FakeRedis())
    registry.create(spec)
    report_in = check_images(spec, registry.redis, IngestSettings(image_root=spec.images_root))
    if not report_in.accepted:
        raise MaskpropError(
            f"no image of {spec.images_root} was accepted ({dict(report_in.refused)})"
        )
    unmatched = 0
    ids: list[int] = []
    by_id = {int(im["id"]): im for im in gt_images}
    basenames = {Path(k).name: v for k, v in files.items()}
    spare = max(by_id, default=0)
    for acc in report_in.accepted:
        gid = files.get(acc.path, basenames.get(Path(acc.path).name))
        if gid is None:  # no ground truth: every mask of it has IoU 0, under a new id
            unmatched += 1
            spare += 1
            gid = spare
        ids.append(gid)
    paths = {gid: acc.path for gid, acc in zip(ids, report_in.accepted, strict=True)}

    def images() -> Any:
        for gid, rel in paths.items():
            yield gid, read_image(spec.images_root, rel)

    dets = detect(
        model, dcfg, images(), total=len(paths), device=torch_device,
        progress=lambda _l, d, t: progress("r1: detect", d, t),
    )  # fmt: skip
    ious = true_ious(dets.image_ids, dets.class_ids, dets.rles(), gt)
    pool = MaskPool(
        features=dets.features.astype(np.float32),
        scores=dets.scores.astype(np.float32),
        ious=ious.astype(np.float32),
        class_ids=dets.class_ids.astype(np.int32),
        class_names=spec.classes,
    )
    n = len(dets)
    infos = {}
    for gid, rel in paths.items():
        row = np.flatnonzero(dets.image_ids == gid) if n else np.zeros(0, np.int64)
        im = by_id.get(gid)
        if row.size and im is not None:
            infos[str(gid)] = common_pb2.ImageInfo(
                image_id=str(gid), width=int(im["width"]), height=int(im["height"]),
                file_name=rel,
            )  # fmt: skip
    campaign = spec.name
    events = masks_events(
        campaign=campaign, class_names=spec.classes, class_ids=dets.class_ids,
        mask_ids=[mask_id(i) for i in range(n)],
        image_ids=[str(int(i)) for i in dets.image_ids], scores=dets.scores,
        features=dets.features, encode=table_encoder(dets), images=infos,
        event_prefix=f"masks.{campaign}",
    )  # fmt: skip
    counts = {c: int((dets.class_ids == c).sum()) for c in range(len(spec.classes))}
    cap = spec.budget.question_cap(spec.params.seconds_per_question)
    result = run_campaign(
        pool,
        [*events, *closed_events(campaign, spec.classes, counts)],
        campaign=campaign,
        out=out / "r1",
        runtime=RuntimeSettings(kafka_bootstrap=None, redis_url=None),
        search={"iou_threshold": spec.params.iou_threshold, "seed": spec.seed},
        annotator_error=crowd_error,
        seed=spec.seed,
        params_for=registry.session_params,
        question_budget=cap,
        progress=lambda label, d, t: progress("r1: " + label, d, t),
    )
    metrics = campaign_metrics(pool, result, spec.params)
    dollars = cost_usd(metrics["hours"], spec.budget.hourly_wage)
    rounds = [
        {
            "round": 1,
            "images": len(paths),
            "images_without_ground_truth": unmatched,
            "detected_masks": n,
            "undecided_masks": result.missing_labels,
            **metrics,
            "dollars": dollars,
        }
    ]
    anns = [
        {
            "image_id": int(dets.image_ids[i]),
            "category_id": category_ids[int(dets.class_ids[i])],
            "segmentation": dets.rle(i),
            "score": float(dets.scores[i]),
        }
        for i in sorted(result.accepted.tolist())
    ]
    write_coco(
        out / "annotations.json",
        info={"description": f"maskprop campaign {campaign}: accepted masks"},
        images=[
            _image_entry(gid, rel, by_id.get(gid), spec.images_root) for gid, rel in paths.items()
        ],
        annotations=(
            instance(
                k, a["image_id"], a["category_id"], a["segmentation"], score=a["score"],
                maskprop_round=1,
            )
            for k, a in enumerate(anns, start=1)
        ),
        categories=[
            {"id": cid, "name": c} for c, cid in zip(spec.classes, category_ids, strict=True)
        ],
    )  # fmt: skip
    report = {
        "campaign": campaign,
        "mode": "embedded",
        "classes": list(spec.classes),
        "images_accepted": len(report_in.accepted),
        "images_refused": dict(report_in.refused),
        "budget": {
            "questions": cap,
            "spent_questions": metrics["questions"],
            "spent_hours": metrics["hours"],
            "spent_dollars": dollars,
        },
        "rounds": rounds,
        "annotations": str(out / "annotations.json"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_file(out / "report.json") as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())
    return report
