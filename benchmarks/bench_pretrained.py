"""Fine-tuning from a checkpoint in torchvision's formats vs training from scratch (issue #17,
item 2's "must show").

Nothing can be downloaded here, so the checkpoints hold random values in the exact formats a
dataset team copies onto the volume: torchvision's COCO Mask R-CNN ``state_dict``
(``maskrcnn_resnet50_fpn`` or ``_v2``, 91 COCO classes) and an ImageNet ResNet-50
``state_dict`` (with its ``fc`` layer), each written with ``torch.save`` and read back through
``maskprop detector train --pretrained``'s loader (``torch.load(weights_only=True)``,
class-specific layers re-initialised, the IoU head added).  Every arm trains the same
architecture on the same synthetic set with the same steps, batch, learning rate and seed, and
is scored by mask AP on the held-out split.  Named baseline: ``scratch`` (the architecture's
own initialisation).  With random values no arm should gain: the figure shows the loaded
weights train like any others (a real COCO checkpoint would start far ahead).

    python benchmarks/bench_pretrained.py [--images 300] [--steps 60] [--batch 4]
        [--architecture maskrcnn_resnet50_fpn|maskrcnn_resnet50_fpn_v2] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from bench_retrain import minus_baseline
from maskprop_detector.data import InstanceDataset, LabelledSet
from maskprop_detector.model import DetectorConfig, build_model
from maskprop_detector.pretrained import load_pretrained
from maskprop_detector.train import TrainConfig, train

from maskprop.data.synth import DEFAULT_CLASSES, synth_scenes
from maskprop_app.campaign_priors import detect_heldout, load_heldout

ARMS = ("scratch", "coco", "imagenet")


def checkpoints(architecture: str, folder: Path, seed: int) -> dict[str, Path]:
    """Random-valued checkpoints in torchvision's own formats, written with ``torch.save``."""
    torch.manual_seed(seed)
    coco = getattr(torchvision.models.detection, architecture)(weights=None, weights_backbone=None)
    paths = {"coco": folder / f"{architecture}_coco.pth", "imagenet": folder / "resnet50.pth"}
    torch.save(coco.state_dict(), paths["coco"])
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), paths["imagenet"])
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=300, help="synthetic images (10%% train)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--architecture",
        default="maskrcnn_resnet50_fpn",
        choices=("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"),
    )
    ap.add_argument("--arms", default=",".join(ARMS), help=f"of {','.join(ARMS)}")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := set(arms) - set(ARMS):
        ap.error(f"--arms: unknown {sorted(unknown)}")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_pretrained.") as tmp:
        folder = Path(tmp)
        synth_scenes(args.images, folder / "data", seed=args.seed)
        train_set = LabelledSet.from_coco(
            folder / "data/annotations/train.json", folder / "data/images/train"
        )
        classes = tuple(DEFAULT_CLASSES)
        held = load_heldout(
            classes, folder / "data/annotations/val.json", folder / "data/images/val"
        )
        cfg = DetectorConfig(classes=classes, architecture=args.architecture)
        paths = checkpoints(args.architecture, folder, args.seed)

        print(
            f"# {args.architecture}: {len(train_set.images)} labelled images, "
            f"{len(held.paths)} val; {args.steps} steps, batch {args.batch}, lr {args.lr}, "
            f"seed {args.seed}, {args.threads} threads; checkpoints of random values"
        )
        print(f"{'arm':<9} {'loaded':>7} {'reinit':>7} {'final loss':>11} {'mask AP':>8} {'s':>6}")
        results: dict[str, Any] = {}
        for arm in arms:
            t0 = time.perf_counter()
            torch.manual_seed(args.seed)
            model = build_model(cfg)
            done: dict[str, Any] = {"loaded": 0, "reinitialised": []}
            if arm != "scratch":
                done = load_pretrained(model, cfg, paths[arm])
            losses = train(
                model, cfg, InstanceDataset(train_set, classes, flip=True),
                TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed),
            )  # fmt: skip
            score = float(detect_heldout(held, model, cfg)[1]["ap"])
            loss = sum(losses.values())
            results[arm] = {
                "loaded": done["loaded"],
                "reinitialised": len(done["reinitialised"]),
                "final_loss": loss,
                "mask_ap": score,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            r = results[arm]
            print(
                f"{arm:<9} {r['loaded']:>7} {r['reinitialised']:>7} {loss:>11.4f} "
                f"{score:>8.4f} {r['seconds']:>6.0f}",
                flush=True,
            )
    if "scratch" in results:
        print(minus_baseline(results, "scratch", "mask_ap", "mask AP"))
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                        "results": results}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
