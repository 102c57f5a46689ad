"""``maskprop demo``: the whole loop of the paper on images, end to end, in one process.

Round 1 trains the detector on the labelled ~10% of a synthetic pool; every round then measures
mask AP on the held-out split, learns K_pr/K_pa on it (Sec. 4.2), detects on the unlabelled
pool, sends the masks through the clusterer, search and sink services (embedded: in-memory bus,
fakeredis; distributed when MASKPROP_KAFKA_BOOTSTRAP/MASKPROP_REDIS_URL are set), answers the
questions with a simulated annotator whose answers come from ground truth with noise, and
keeps the accepted masks.  Accepted masks join the training set, de-duplicated across rounds
(within an image and class a later mask with IoU > 0.5 against an earlier one is dropped),
and the next round fine-tunes the previous round's model on it (Sec. 5.1, Fig. 7).

Writes under ``out``: ``data/`` (the synthetic scenes), ``models/round<r>.pt``,
``rounds/r<r>/`` (each round's services state, sink dataset and COCO export),
``annotations.json`` (all accepted masks, COCO, against the pool's image ids), ``report.json``
and PNG plots.  Training checkpoints make an interrupted demo resumable: run it again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from maskprop.data.coco import instance, write_coco
from maskprop.data.instances import deduplicate, detections_pool, mask_ap
from maskprop.data.masks import MaskTable
from maskprop.data.synth import DEFAULT_CLASSES, synth_scenes
from maskprop.errors import MaskpropError
from maskprop.files import atomic_file
from maskprop.params import AnnotationParams
from maskprop.progress import Progress, no_progress
from maskprop.selection import Selection
from maskprop.simulate.pool import MaskPool
from maskprop.simulate.runner import build_class_trees, fig4_correlations, learn_selection
from maskprop.simulate.scenes import mask_id
from maskprop_app.embedded import campaign_metrics, run_campaign
from maskprop_runtime.settings import RuntimeSettings
from maskprop_runtime.treestore import check_name


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and knobs of ``maskprop demo`` (defaults run in ~10 minutes on 2 CPU cores)."""

    images: int = 2000
    image_size: int = 128
    rounds: int = 2
    train_steps: int = 300
    retrain_steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    annotator_error: float = 0.03
    seed: int = 0
    campaign: str = "demo"
    device: str = "auto"
    # Propagated masks teach the box and class heads; the mask head learns from the human-drawn
    # labelled set only (training it on its own accepted masks lowered AP here: 0.453 vs 0.470).
    propagated_masks: bool = False
    # Also fine-tune the previous round's model on the labelled set alone for the same steps:
    # what the propagated labels add over plain extra training (reported, never used).
    control: bool = True
    # Detector backend: "torchvision" (Mask R-CNN R18-FPN) or "detectron2" (PointRend R50-FPN).
    backend: str = "torchvision"

    def validate(self) -> None:
        if self.images < 20:
            raise MaskpropError("the demo needs at least 20 images (train/pool/val splits)")
        if not 1 <= self.rounds <= 10:
            raise MaskpropError("rounds must be 1-10")
        if self.train_steps < 1 or self.retrain_steps < 1 or self.batch_size < 1:
            raise MaskpropError("training steps and batch size must be positive")
        if not 0.0 <= self.annotator_error <= 0.5:
            raise MaskpropError("annotator error must be in [0, 0.5]")
        try:
            check_name("campaign name", self.campaign)
        except ValueError as exc:
            raise MaskpropError(str(exc)) from None


def _synth(cfg: DemoConfig, data: Path, progress: Progress) -> dict[str, Any]:
    """The synthetic scenes, reused when a previous run made the same ones."""
    marker = data / "summary.json"
    want = {"images": cfg.images, "seed": cfg.seed, "size": cfg.image_size}
    if marker.exists():
        old = json.loads(marker.read_text())
        if {k: old.get(k) for k in want} == want:
            return dict(old)
    summary = synth_scenes(cfg.images, data, seed=cfg.seed, size=cfg.image_size, progress=progress)
    summary = json.loads(json.dumps(summary, default=str))
    with atomic_file(marker) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return dict(summary)


def _prefixed(progress: Progress, prefix: str) -> Progress:
    def report(label: str, done: int, total: int) -> None:
        progress(prefix + label, done, total)

    return report


def _learn(pool: MaskPool, params: AnnotationParams) -> Selection:
    """K_pr/K_pa learned on held-out detections (Sec. 4.2); the paper's fixed thresholds when
    there are too few to learn from (an untrained detector)."""
    try:
        return learn_selection(pool, params)[0]
    except (ValueError, MaskpropError):
        return Selection(0.0, params.prior_accept_threshold or 0.7)


def run_demo(
    cfg: DemoConfig, out: Path, runtime: RuntimeSettings, progress: Progress = no_progress
) -> dict[str, Any]:
    """Run the demo; returns (and writes) the report."""
    import torch
    from maskprop_detector.data import BOX_ONLY, IGNORE, InstanceDataset, LabelledSet, read_image
    from maskprop_detector.events import closed_events, masks_events, table_encoder
    from maskprop_detector.infer import detect
    from maskprop_detector.model import DetectorConfig, build_model
    from maskprop_detector.train import TrainConfig, load_model, pick_device, train

    from maskprop_runtime.pb.maskprop.common.v1 import common_pb2

    cfg.validate()
    started = time.perf_counter()
    out = Path(out)
    if (out / "report.json").exists():
        raise MaskpropError(f"{out} already holds a finished demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    _synth(cfg, out / "data", progress)
    data = out / "data"
    train_set = LabelledSet.from_coco(data / "annotations/train.json", data / "images/train")
    val_set = LabelledSet.from_coco(data / "annotations/val.json", data / "images/val")
    pool_set = LabelledSet.from_coco(data / "annotations/pool.json", data / "images/pool")
    classes = tuple(DEFAULT_CLASSES)
    category_ids = [
        next(int(c["id"]) for c in pool_set.categories if c["name"] == name) for name in classes
    ]
    class_of_category = {cid: k for k, cid in enumerate(category_ids)}
    dcfg = DetectorConfig(
        classes=classes, image_size=cfg.image_size, projection_seed=cfg.seed, backend=cfg.backend
    )
    params = AnnotationParams()

    def gt(ls: LabelledSet) -> list[dict[str, Any]]:
        return [
            {
                "image_id": a["image_id"],
                "class_id": class_of_category[int(a["category_id"])],
                "segmentation": a["segmentation"],
            }
            for a in ls.annotations
        ]

    val_gt, pool_gt = gt(val_set), gt(pool_set)
    infos = {
        str(im["id"]): common_pb2.ImageInfo(
            image_id=str(im["id"]),
            width=im["width"],
            height=im["height"],
            file_name=im["file_name"],
        )
        for im in pool_set.images
    }

    def run_detect(model: Any, ls: LabelledSet, label: str) -> MaskTable:
        def images() -> Any:
            for im in ls.images:
                yield int(im["id"]), read_image(ls.image_root, im["file_name"])

        return detect(
            model,
            dcfg,
            images(),
            total=len(ls.images),
            device=device,
            progress=lambda _l, d, t: progress(label, d, t),
        )

    accepted_anns: list[dict[str, Any]] = []  # every round's accepted masks, de-duplicated
    # The last round's detections that got no label: ignore regions when retraining.
    ignore_anns: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    last: tuple[MaskPool, Any] | None = None  # the last round's pool and trees, for Fig. 4
    model = None
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        ckpt = out / "models" / f"round{r}.pt"
        if r == 1:
            model = build_model(dcfg)
            steps = cfg.train_steps
        else:
            model, _ = load_model(out / "models" / f"round{r - 1}.pt", device)
            steps = cfg.retrain_steps
        labelled = InstanceDataset(train_set, classes, flip=True)
        train_data: Any = labelled
        n_train_images = len(train_set.images)
        tcfg = TrainConfig(
            steps=steps, batch_size=cfg.batch_size, lr=cfg.lr if r == 1 else cfg.lr / 2,
            seed=cfg.seed + r,
        )  # fmt: skip
        if accepted_anns:
            used = {int(a["image_id"]) for a in accepted_anns}
            box_only = {} if cfg.propagated_masks else {BOX_ONLY: True}
            extra = LabelledSet(
                images=[im for im in pool_set.images if int(im["id"]) in used],
                annotations=[
                    dict(a, id=10_000_000 + i, **box_only) for i, a in enumerate(accepted_anns)
                ]
                + [dict(a, id=20_000_000 + i) for i, a in enumerate(ignore_anns)],
                categories=pool_set.categories,
                image_root=pool_set.image_root,
            )
            # About half of every batch comes from the human-labelled set.
            repeat = max(1, round(len(extra.images) / len(train_set.images)))
            train_data = torch.utils.data.ConcatDataset(
                [labelled] * repeat + [InstanceDataset(extra, classes, flip=True)]
            )
            n_train_images += len(extra.images)
        losses = train(
            model, dcfg, train_data, tcfg, checkpoint=ckpt, device=device,
            progress=_prefixed(progress, f"round {r}: "),
        )  # fmt: skip
        train_seconds = time.perf_counter() - t0

        val_dets = run_detect(model, val_set, f"round {r}: detect val")
        ap = mask_ap(val_set.doc(), val_dets.coco_results(category_ids))
        control_ap = None
        if cfg.control and r > 1:
            twin, _ = load_model(out / "models" / f"round{r - 1}.pt", device)
            train(
                twin, dcfg, labelled, tcfg, checkpoint=out / "models" / f"round{r}_control.pt",
                device=device, progress=_prefixed(progress, f"round {r}: control "),
            )  # fmt: skip
            twin_dets = run_detect(twin, val_set, f"round {r}: control val")
            control_ap = mask_ap(val_set.doc(), twin_dets.coco_results(category_ids))["ap"]
            del twin
        val_pool = detections_pool(val_dets, val_gt, classes)
        selection = _learn(val_pool, params)

        pool_dets = run_detect(model, pool_set, f"round {r}: detect pool")
        pool = detections_pool(pool_dets, pool_gt, classes)
        pool_trees = build_class_trees(pool)
        fig4 = fig4_correlations(pool_trees, pool) if len(pool) > 1 else None

        campaign = f"{cfg.campaign}-r{r}"
        rdir = out / "rounds" / f"r{r}"
        if rdir.exists():  # an interrupted earlier attempt of this round: start it again
            shutil.rmtree(rdir)
        n = len(pool_dets)
        mask_ids = [mask_id(i) for i in range(n)]
        image_keys = [str(int(i)) for i in pool_dets.image_ids]
        events = masks_events(
            campaign=campaign, class_names=classes, class_ids=pool_dets.class_ids,
            mask_ids=mask_ids, image_ids=image_keys, scores=pool_dets.scores,
            features=pool_dets.features, encode=table_encoder(pool_dets), images=infos,
            event_prefix=f"masks.{campaign}",
        )  # fmt: skip
        counts = {c: int((pool_dets.class_ids == c).sum()) for c in range(len(classes))}
        search = {
            "prior_reject_threshold": selection.prior_reject_threshold,
            "prior_accept_threshold": selection.prior_accept_threshold,
            "seed": cfg.seed,
        }
        result = run_campaign(
            pool,
            [*events, *closed_events(campaign, classes, counts)],
            campaign=campaign,
            out=rdir,
            runtime=runtime,
            search=search,
            annotator_error=cfg.annotator_error,
            seed=cfg.seed + r,
            progress=_prefixed(progress, f"round {r}: "),
        )
        metrics = campaign_metrics(pool, result, params)
        new = [
            {
                "image_id": int(pool_dets.image_ids[i]),
                "category_id": category_ids[int(pool_dets.class_ids[i])],
                "segmentation": pool_dets.rle(i),
                "score": float(pool_dets.scores[i]),
                "iscrowd": 0,
                "maskprop_round": r,
            }
            for i in sorted(result.accepted.tolist())
        ]
        taken = set(result.accepted.tolist())
        ignore_anns = [
            {
                "image_id": int(pool_dets.image_ids[i]),
                "category_id": category_ids[int(pool_dets.class_ids[i])],
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                IGNORE: True,
            }
            for i, b in enumerate(pool_dets.boxes.tolist())
            if i not in taken
        ]
        before = len(accepted_anns)
        merged = accepted_anns + new
        keep = deduplicate(merged)
        accepted_anns = [merged[i] for i in keep]
        rounds.append(
            {
                "round": r,
                **metrics,
                "detector_ap": ap["ap"],
                "detector_ap50": ap["ap50"],
                "detector_ap_control_labelled_only": control_ap,
                "detected_masks": n,
                "new_masks_after_dedup": len(accepted_anns) - before,
                "total_masks": len(accepted_anns),
                "train_images": n_train_images,
                "train_steps": steps,
                "train_seconds": round(train_seconds, 1),
                "final_losses": {k: round(v, 4) for k, v in losses.items()},
                "prior_reject_threshold": selection.prior_reject_threshold,
                "prior_accept_threshold": selection.prior_accept_threshold,
                "fig4": fig4,
                "wall_seconds": round(time.perf_counter() - t0, 1),
            }
        )
        last = (pool, pool_trees)

    _write_annotations(out / "annotations.json", accepted_anns, pool_set)
    report = {
        "config": asdict(cfg),
        "device": str(device),
        "mode": "distributed" if runtime.distributed else "embedded",
        "classes": list(classes),
        "pool_images": len(pool_set.images),
        "pool_objects": len(pool_set.annotations),
        "rounds": rounds,
        "annotations": str(out / "annotations.json"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    from maskprop_app.plots import demo_fig4, demo_rounds

    demo_rounds(rounds, out / "rounds.png")
    assert last is not None
    demo_fig4(*last, out / "fig4_scores.png")
    report["plots"] = [str(out / "rounds.png"), str(out / "fig4_scores.png")]
    with atomic_file(out / "report.json") as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())
    return report


def _write_annotations(path: Path, anns: list[dict[str, Any]], pool_set: Any) -> None:
    """COCO instances of the accepted masks, against the pool's images and categories."""
    write_coco(
        path,
        info={"description": "maskprop demo: masks accepted by verification + propagation"},
        images=pool_set.images,
        annotations=(
            instance(
                k, a["image_id"], a["category_id"], a["segmentation"],
                score=a["score"], maskprop_round=a["maskprop_round"],
            )
            for k, a in enumerate(anns, start=1)
        ),
        categories=pool_set.categories,
    )  # fmt: skip
