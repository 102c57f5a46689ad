"""``maskprop demo``: the whole loop of the paper on images, end to end, in one process, as a
thin wrapper over the campaign path (``maskprop campaign run``, :func:`run_spec`).

The demo makes what a dataset team brings: a synthetic pool (``data synth``: a labelled train
split of ``labelled`` of the images, a held-out val split of 10 %, the rest the unlabelled pool)
and a detector trained on the labelled split (``detector train``: round 1's weights,
resumable).  Then it runs the campaign over the
pool folder exactly as ``campaign run`` does with a spec (the paper's parameters, the rounds, an
unbounded question budget, the labelled split to retrain on) and a simulated crowd answering
from the pool's ground truth with ``annotator_error`` noise, adding what a demo measures: every
round the detector's mask AP on val and K_pr/K_pa learned on val (Sec. 4.2), and a control model
fine-tuned on the labelled split alone for the same steps (what the propagated labels add,
Fig. 7).  Retraining between rounds is ``campaign retrain``'s: the labelled split plus every
round's accepted masks, de-duplicated across rounds, about half of every batch labelled.

Writes under ``out``: ``data/`` (the synthetic scenes), ``models/round<r>.pt`` (and
``round<r>_control.pt``), ``r<r>/`` (each round's services state, sink dataset, COCO export and
``accepted.json``), ``annotations.json`` (all accepted masks, COCO, against the pool's image
ids), ``report.json`` and the plots.  Rerunning an interrupted demo into the same folder reuses
the scenes and round 1's training checkpoint, and resumes retraining from its checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop.data.synth import DEFAULT_CLASSES, synth_scenes
from maskprop.errors import MaskpropError
from maskprop.files import atomic_file
from maskprop.params import AnnotationParams
from maskprop.progress import Progress, no_progress, prefixed
from maskprop_app.campaign_run import run_spec
from maskprop_runtime.settings import RuntimeSettings
from maskprop_runtime.treestore import check_name

# The held-out split AP is measured on.
VAL_SHARE = 0.1
# An unbounded budget: the demo measures what the method gets, not what a budget buys.
UNBOUNDED_QUESTIONS = 10**9


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and knobs of ``maskprop demo`` (defaults run in ~10 minutes on 2 CPU cores)."""

    images: int = 2000
    # Share of the images in the labelled train split (val takes VAL_SHARE, the pool the rest).
    # The paper's Fig. 7 started from 1,000 labelled ADE images and a pool of 19,210 (5 %).
    labelled: float = 0.1
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
    # labelled set only (training it on its own accepted masks lowered AP here: 0.461 vs 0.471,
    # benchmarks/README.md "bench_retrain.py").
    propagated_masks: bool = False
    # Also fine-tune the previous round's model on the labelled set alone for the same steps:
    # what the propagated labels add over plain extra training (reported, never used).
    control: bool = True
    # Detector backend: "torchvision" (Mask R-CNN R18-FPN) or "detectron2" (PointRend R50-FPN).
    backend: str = "torchvision"

    def validate(self) -> None:
        if self.images < 20:
            raise MaskpropError("the demo needs at least 20 images (train/pool/val splits)")
        if not 0.0 < self.labelled <= 1.0 - 2 * VAL_SHARE:
            raise MaskpropError(f"the labelled share must be in (0, {1.0 - 2 * VAL_SHARE:g}]")
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


def _split(cfg: DemoConfig) -> dict[str, float]:
    return {"train": cfg.labelled, "pool": 1.0 - VAL_SHARE - cfg.labelled, "val": VAL_SHARE}


def _synth(cfg: DemoConfig, data: Path, progress: Progress) -> dict[str, Any]:
    """The synthetic scenes, reused when a previous run made the same ones."""
    marker = data / "summary.json"
    split = _split(cfg)
    want = {"images": cfg.images, "seed": cfg.seed, "size": cfg.image_size, "split": split}
    if marker.exists():
        old = json.loads(marker.read_text())
        if {k: old.get(k) for k in want} == want:
            return dict(old)
    summary = synth_scenes(
        cfg.images, data, seed=cfg.seed, size=cfg.image_size, split=split,
        progress=progress,
    )  # fmt: skip
    summary = {**json.loads(json.dumps(summary, default=str)), "split": split}
    with atomic_file(marker) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return dict(summary)


def run_demo(
    cfg: DemoConfig, out: Path, runtime: RuntimeSettings, progress: Progress = no_progress
) -> dict[str, Any]:
    """Run the demo; returns (and writes) the report."""
    import torch
    from maskprop_detector.data import InstanceDataset, LabelledSet
    from maskprop_detector.model import DetectorConfig, build_model
    from maskprop_detector.train import TrainConfig, pick_device, train

    cfg.validate()
    started = time.perf_counter()
    out = Path(out).resolve()
    if (out / "report.json").exists():
        raise MaskpropError(f"{out} already holds a finished demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    _synth(cfg, out / "data", progress)
    data = out / "data"
    train_set = LabelledSet.from_coco(data / "annotations/train.json", data / "images/train")
    classes = tuple(DEFAULT_CLASSES)
    dcfg = DetectorConfig(
        classes=classes, image_size=cfg.image_size, projection_seed=cfg.seed, backend=cfg.backend
    )
    # Round 1's detector: `detector train` on the labelled split (a finished checkpoint is
    # reused, an unfinished one resumed).
    t0 = time.perf_counter()
    weights = out / "models" / "round1.pt"
    losses = train(
        build_model(dcfg), dcfg, InstanceDataset(train_set, classes, flip=True),
        TrainConfig(steps=cfg.train_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                    seed=cfg.seed + 1),
        checkpoint=weights, device=device, progress=prefixed(progress, "r1: "),
    )  # fmt: skip
    train_seconds = time.perf_counter() - t0
    spec = CampaignSpec(
        name=cfg.campaign,
        classes=classes,
        images_root=data / "images/pool",
        detector_weights=weights,
        params=AnnotationParams(),
        budget=Budget(questions=UNBOUNDED_QUESTIONS, rounds=cfg.rounds),
        seed=cfg.seed,
        labelled=data / "annotations/train.json",
        labelled_images=data / "images/train",
    )
    campaign = run_spec(
        spec, out, data / "annotations/pool.json",
        crowd_error=cfg.annotator_error, device=cfg.device, retrain_steps=cfg.retrain_steps,
        batch_size=cfg.batch_size, heldout=(data / "annotations/val.json", data / "images/val"),
        control=cfg.control, propagated_masks=cfg.propagated_masks, runtime=runtime,
        progress=progress,
    )  # fmt: skip
    rounds = campaign["rounds"]
    for r in rounds:
        retrained = r.get("retrain") or {}
        r["train_images"] = retrained.get("labelled_images", len(train_set.images)) + (
            retrained.get("accepted_images", 0)
        )
        r["train_steps"] = cfg.retrain_steps if r["round"] > 1 else cfg.train_steps
    rounds[0]["train_seconds"] = round(train_seconds, 1)
    rounds[0]["final_losses"] = {k: round(v, 4) for k, v in losses.items()}
    pool = json.loads((data / "annotations/pool.json").read_text())
    report = {
        "config": asdict(cfg),
        "device": str(device),
        "mode": "distributed" if runtime.distributed else "embedded",
        "classes": list(classes),
        "pool_images": len(pool["images"]),
        "pool_objects": len(pool["annotations"]),
        "rounds": rounds,
        "budget": campaign["budget"],
        "annotations": campaign["annotations"],
        "plots": campaign.get("plots", []),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_file(out / "report.json") as f:
        f.write((json.dumps(report, indent=2) + "\n").encode())
    return report
