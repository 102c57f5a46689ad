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
reached first), over every round together.  Rounds (``[budget] rounds``): before round
``r > 1`` the detector is retrained (:func:`maskprop_app.campaign_retrain.retrain`: the
spec's labelled set plus the accepted masks of rounds ``1..r-1``, de-duplicated, fine-tuning
round ``r-1``'s weights) and the images are detected again; a round starts only while budget
is left.

Writes under ``out``: ``r<r>/`` (each round's services state, sink dataset and its COCO
export, and ``accepted.json``), ``models/round<r>.pt`` (the retrained weights),
``annotations.json`` (every round's accepted masks de-duplicated across rounds, earlier rounds
first, as COCO instances against the ground truth's image ids, images named by their paths
under the campaign's folder, ``maskprop_round`` as provenance) and ``report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import fakeredis
from PIL import Image

from maskprop.campaign_spec import CampaignSpec
from maskprop.data.coco import instance, load_coco_instances, write_coco
from maskprop.data.instances import canonical_key, deduplicate, detections_pool
from maskprop.errors import MaskpropError
from maskprop.files import atomic_file
from maskprop.metrics import cost_usd
from maskprop.progress import Progress, no_progress, prefixed
from maskprop.simulate.runner import build_class_trees, fig4_correlations
from maskprop_app.campaign_priors import detect_heldout, learned_params, load_heldout
from maskprop_app.campaign_retrain import retrain
from maskprop_app.embedded import campaign_metrics, run_campaign
from maskprop_runtime.campaigns import CampaignRegistry, round_campaign
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


def _merge_rounds(files: list[Path]) -> list[dict[str, Any]]:
    """Every round's accepted masks, earlier rounds first, de-duplicated across rounds (the
    retraining rule, :func:`maskprop.data.instances.deduplicate`): one dataset, each mask
    with its ``maskprop_round``."""
    anns: list[dict[str, Any]] = []
    for path in files:
        doc = json.loads(Path(path).read_text())
        names = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
        anns += [dict(a, file_name=names[int(a["image_id"])]) for a in doc["annotations"]]
    # canonical_key: the distributed export's order, so both keep the same repeats
    anns.sort(key=lambda a: canonical_key(a, a["file_name"]))
    return [{k: v for k, v in anns[i].items() if k != "file_name"} for i in deduplicate(anns)]


def run_spec(
    spec: CampaignSpec,
    out: Path,
    ground_truth: Path,
    *,
    crowd_error: float = 0.0,
    device: str = "cpu",
    retrain_steps: int = 200,
    batch_size: int = 8,
    heldout: tuple[Path, Path] | None = None,
    control: bool = False,
    propagated_masks: bool = False,
    runtime: RuntimeSettings | None = None,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Run ``spec`` embedded with a crowd simulated from ``ground_truth`` (COCO instances whose
    images' ``file_name`` are paths under the campaign's folder, or their base names).

    Returns (and writes to ``out/report.json``) per round: masks detected and accepted, SQ
    (mean true IoU of the accepted masks), questions, hours and dollars, and the budget.

    ``heldout`` (COCO, images folder: a labelled held-out set): every round measures the
    detector's mask AP there and learns K_pr/K_pa on it (Sec. 4.2; the spec's thresholds when
    too few masks to fit), revising the campaign's parameters for that round's sessions, and
    writes ``rounds.png`` and ``fig4_scores.png``.  ``control``: rounds after the first also
    fine-tune the previous round's weights on the labelled set alone, the same steps, and
    report its held-out AP (what the propagated labels add over plain extra training).
    ``propagated_masks``: accepted masks also teach the mask head when retraining.
    ``runtime``: the services' bus and store (default in memory; a real broker and Redis run
    the same services distributed).
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
    if spec.budget.rounds > 1 and spec.labelled is None:
        raise MaskpropError(
            f"[budget] rounds = {spec.budget.rounds} needs [detector] labelled (the labelled set "
            "retrained on between rounds)"
        )
    files, gt, gt_images, category_ids = _ground_truth(ground_truth, spec.classes)
    held = load_heldout(spec.classes, *heldout) if heldout is not None else None
    if control and held is None:
        raise MaskpropError("a control model is scored on a held-out set: give heldout too")
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
    # The ids the distributed path gives (ingest's image ids, the detector's "<image id>.<k>"
    # mask ids): the clusterer orders a tree's masks by mask id and search samples a cluster's
    # masks in that order, so the same ids make the same questions as a distributed run.
    wire_image = {gid: acc.image_id for gid, acc in zip(ids, report_in.accepted, strict=True)}

    entries = {
        gid: _image_entry(gid, rel, by_id.get(gid), spec.images_root) for gid, rel in paths.items()
    }
    infos = {
        wire_image[gid]: common_pb2.ImageInfo(
            image_id=wire_image[gid], width=int(e["width"]), height=int(e["height"]),
            file_name=e["file_name"],
        )
        for gid, e in entries.items()
    }  # fmt: skip
    categories = [{"id": cid, "name": c} for c, cid in zip(spec.classes, category_ids, strict=True)]
    cap = spec.question_cap()

    def images() -> Any:
        for gid, rel in paths.items():
            yield gid, read_image(spec.images_root, rel)

    rounds: list[dict[str, Any]] = []
    accepted_files: list[Path] = []
    weights = spec.detector_weights
    spent = 0
    last: tuple[Any, Any] | None = None  # the last round's pool and trees (Fig. 4)
    merged: list[dict[str, Any]] = []  # every round's accepted masks so far, de-duplicated
    for r in range(1, spec.budget.rounds + 1):
        if spent >= cap:
            break  # the budget is spent: no round left to ask in
        rdir = out / f"r{r}"
        campaign = round_campaign(spec.name, r)
        retrained = None
        if r > 1:
            assert spec.labelled is not None and spec.labelled_images is not None
            new_weights = out / "models" / f"round{r}.pt"
            # An earlier, interrupted run that finished these weights from the same inputs
            # keeps them (resume=True); from other inputs they are trained anew.
            retrained = retrain(
                spec, labelled=spec.labelled, labelled_images=spec.labelled_images,
                accepted=accepted_files, out=new_weights, round_=r, base=weights,
                steps=retrain_steps, batch_size=batch_size, device=device, seed=spec.seed,
                propagated_masks=propagated_masks, resume=True,
                progress=prefixed(progress, f"r{r}: "),
            )  # fmt: skip
            previous, weights = weights, new_weights
            model, _ = load_model(weights, torch_device)
            if control:
                assert held is not None
                twin_weights = out / "models" / f"round{r}_control.pt"
                retrain(
                    spec, labelled=spec.labelled, labelled_images=spec.labelled_images,
                    accepted=[], out=twin_weights, round_=r, base=previous,
                    steps=retrain_steps, batch_size=batch_size, device=device, seed=spec.seed,
                    resume=True, progress=prefixed(progress, f"r{r}: control "),
                )  # fmt: skip
                twin, _ = load_model(twin_weights, torch_device)
                control_ap = detect_heldout(held, twin, dcfg, device=torch_device)[1]["ap"]
                del twin
        scored: dict[str, Any] = {}
        if held is not None:
            held_pool, ap = detect_heldout(
                held, model, dcfg, device=torch_device, progress=prefixed(progress, f"r{r}: ")
            )
            try:
                params, _ = learned_params(spec.params, held_pool)
                learned = True
            except MaskpropError:  # too few held-out masks (an untrained detector)
                params, learned = spec.params, False
            current = registry.spec(spec.name)
            registry.revise(
                dataclasses.replace(current, params=params, version=current.version + 1)
            )
            scored = {
                "detector_ap": ap["ap"],
                "detector_ap50": ap["ap50"],
                "detector_ap_control_labelled_only": control_ap if control and r > 1 else None,
                "priors_learned": learned,
                "prior_reject_threshold": params.prior_reject_threshold,
                "prior_accept_threshold": params.prior_accept_threshold,
            }
        if rdir.exists():  # an interrupted earlier attempt of this round: start it again
            shutil.rmtree(rdir)
        dets = detect(
            model, dcfg, images(), total=len(paths), device=torch_device,
            progress=prefixed(progress, f"r{r}: detect "),
        )  # fmt: skip
        pool = detections_pool(dets, gt, spec.classes)
        # Fig. 4 on the real detector, for the held-out mode's report and plot only: the trees
        # are the clusterer's to build, and a campaign of millions of masks should not pay twice.
        trees = build_class_trees(pool) if held is not None else None
        if trees is not None:
            last = (pool, trees)
        n = len(dets)
        wire_masks = [
            f"{wire_image[int(g)]}.{str(m).rsplit('.', 1)[1]}"
            for g, m in zip(dets.image_ids.tolist(), dets.mask_ids.tolist(), strict=True)
        ]
        events = masks_events(
            campaign=campaign, class_names=spec.classes, class_ids=dets.class_ids,
            mask_ids=wire_masks,
            image_ids=[wire_image[int(i)] for i in dets.image_ids], scores=dets.scores,
            features=dets.features, encode=table_encoder(dets), images=infos,
            event_prefix=f"masks.{spec.name}.r{r}",
        )  # fmt: skip
        counts = {c: int((dets.class_ids == c).sum()) for c in range(len(spec.classes))}
        # Each round travels under its own name, as the distributed rounds do: search keeps a
        # finished round's sessions, so a real Redis refuses a second round under the first's
        # name (the registry maps every round's name to the campaign's parameters).
        result = run_campaign(
            pool,
            [*events, *closed_events(campaign, spec.classes, counts)],
            campaign=campaign,
            out=rdir,
            runtime=runtime or RuntimeSettings(kafka_bootstrap=None, redis_url=None),
            search={"iou_threshold": spec.params.iou_threshold, "seed": spec.seed},
            annotator_error=crowd_error,
            seed=spec.seed + r - 1,
            params_for=registry.session_params,
            question_budget=cap - spent,
            mask_index={m: i for i, m in enumerate(wire_masks)},
            redundancy=spec.redundancy,
            progress=prefixed(progress, f"r{r}: "),
        )
        metrics = campaign_metrics(pool, result, spec.params, spec.redundancy)
        spent += metrics["questions"]
        accepted = [
            instance(
                k, int(dets.image_ids[i]), category_ids[int(dets.class_ids[i])], dets.rle(i),
                score=float(dets.scores[i]), maskprop_round=r,
            )
            for k, i in enumerate(sorted(result.accepted.tolist()), start=1)
        ]  # fmt: skip
        accepted_files.append(rdir / "accepted.json")
        write_coco(
            accepted_files[-1],
            info={"description": f"maskprop campaign {spec.name}: round {r} accepted masks"},
            images=list(entries.values()), annotations=accepted, categories=categories,
        )  # fmt: skip
        before = len(merged)
        merged = _merge_rounds(accepted_files)
        rounds.append(
            {
                "round": r,
                "weights": str(weights),
                "images": len(paths),
                "images_without_ground_truth": unmatched,
                "detected_masks": n,
                "undecided_masks": result.missing_labels,
                **metrics,
                "dollars": cost_usd(metrics["hours"], spec.budget.hourly_wage),
                "new_masks_after_dedup": len(merged) - before,
                "total_masks": len(merged),
                **scored,
                "fig4": fig4_correlations(trees, pool)
                if trees is not None and len(pool) > 1
                else None,
                "retrain": retrained,
            }
        )
    write_coco(
        out / "annotations.json",
        info={"description": f"maskprop campaign {spec.name}: accepted masks, every round"},
        images=list(entries.values()),
        annotations=(dict(a, id=k) for k, a in enumerate(merged, start=1)),
        categories=categories,
    )  # fmt: skip
    hours = spec.hours(spent)
    report = {
        "campaign": spec.name,
        "mode": "embedded",
        "classes": list(spec.classes),
        "images_accepted": len(report_in.accepted),
        "images_refused": dict(report_in.refused),
        "budget": {
            "questions": cap,
            "redundancy": spec.redundancy,
            "spent_questions": spent,
            "spent_answers": spent * spec.redundancy,
            "spent_hours": hours,
            "spent_dollars": cost_usd(hours, spec.budget.hourly_wage),
        },
        "rounds": rounds,
        "total_masks": len(merged),
        "annotations": str(out / "annotations.json"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if held is not None and rounds:
        from maskprop_app.plots import demo_fig4, demo_rounds

        demo_rounds(rounds, out / "rounds.png")
        plots = [str(out / "rounds.png")]
        if last is not None:
            demo_fig4(*last, out / "fig4_scores.png")
            plots.append(str(out / "fig4_scores.png"))
        report["plots"] = plots
    with atomic_file(out / "report.json") as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())
    return report
