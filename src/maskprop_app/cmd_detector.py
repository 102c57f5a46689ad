"""Detector commands of the ``maskprop`` CLI: ``demo`` (the main job), ``detector train`` and
``detector predict`` (bring your own COCO-format labelled set and image folder).  The detector
service's modules (torch) are imported inside the commands, so the rest of the CLI starts
without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from maskprop.errors import MaskpropError
from maskprop_app.console import Bars, user_errors

detector_app = typer.Typer(help="Train the detector and predict masks.", no_args_is_help=True)


def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/demo"),
    images: Annotated[
        int, typer.Option(help="Synthetic images (--labelled train, 10% val, the rest pool).")
    ] = 2000,
    labelled: Annotated[
        float,
        typer.Option(
            help="Share of the images in the labelled split (paper Fig. 7: 0.05; here the "
            "propagated labels beat the labelled-only control at 0.02 and below)."
        ),
    ] = 0.1,
    rounds: Annotated[int, typer.Option(help="Annotate-and-retrain rounds.")] = 2,
    train_steps: Annotated[int, typer.Option(help="Training steps in round 1.")] = 300,
    retrain_steps: Annotated[int, typer.Option(help="Fine-tuning steps in later rounds.")] = 200,
    annotator_error: Annotated[
        float, typer.Option(help="Chance that the simulated annotator answers wrongly.")
    ] = 0.03,
    seed: Annotated[int, typer.Option(help="Seed of the data, model and crowd.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    propagated_masks: Annotated[
        bool, typer.Option(help="Train the mask head on propagated masks too (default: boxes).")
    ] = False,
    control: Annotated[
        bool, typer.Option(help="Also fine-tune on the labelled set alone, for comparison.")
    ] = True,
    backend: Annotated[
        str, typer.Option(help="Detector backend: torchvision or detectron2 (PointRend).")
    ] = "torchvision",
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """The whole loop on images: synthesise, train, detect, cluster, verify (simulated crowd),
    propagate, retrain; writes annotations.json, report.json and plots under --out."""
    from maskprop_app.demo import DemoConfig, run_demo
    from maskprop_runtime.settings import RuntimeSettings

    bars = Bars(progress)
    with user_errors(bars):
        cfg = DemoConfig(
            images=images, labelled=labelled, rounds=rounds, train_steps=train_steps,
            retrain_steps=retrain_steps,
            annotator_error=annotator_error, seed=seed, device=device,
            propagated_masks=propagated_masks, control=control, backend=backend,
        )  # fmt: skip
        report = run_demo(cfg, out, RuntimeSettings(), progress=bars)
        bars.close()
        keys = ("round", "masks", "sq", "precision", "questions", "hours", "speedup_vs_manual",
                "detector_ap", "detector_ap_control_labelled_only")  # fmt: skip
        summary = {
            "rounds": [{k: r[k] for k in keys} for r in report["rounds"]],
            "wall_seconds": report["wall_seconds"],
            "report": str(out / "report.json"),
            "annotations": report["annotations"],
        }
        typer.echo(json.dumps(summary, indent=2))


@detector_app.command("train")
def detector_train(
    coco: Annotated[Path, typer.Option(help="COCO instances file of the labelled set.")],
    images: Annotated[Path, typer.Option(help="Folder the file_names are relative to.")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write (resumed if it exists).")],
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 400,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    image_size: Annotated[int, typer.Option(help="Resize images to fit this side.")] = 128,
    feature_dim: Annotated[int, typer.Option(help="d of the mask-attention feature.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    backend: Annotated[
        str, typer.Option(help="Detector backend: torchvision or detectron2 (PointRend).")
    ] = "torchvision",
    architecture: Annotated[
        str,
        typer.Option(
            help="'' (small, from scratch), maskrcnn_resnet50_fpn[_v2] (torchvision) or "
            "pointrend_r50_fpn (detectron2 model zoo): the layout --pretrained must have."
        ),
    ] = "",
    pretrained: Annotated[
        Path | None,
        typer.Option(
            help="Start from these weights: torchvision COCO Mask R-CNN or ImageNet ResNet-50 "
            "state_dict (.pt/.pth), or a detectron2 model-zoo .pkl (arrays only)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Train the detector (from random or --pretrained weights) on a COCO-format labelled set."""
    bars = Bars(progress)
    with user_errors(bars):
        from maskprop_detector.data import InstanceDataset, LabelledSet
        from maskprop_detector.model import DetectorConfig, build_model
        from maskprop_detector.train import TrainConfig, pick_device, train

        data = LabelledSet.from_coco(coco, images)
        names = tuple(c["name"] for c in sorted(data.categories, key=lambda c: c["id"]))
        cfg = DetectorConfig(
            classes=names, image_size=image_size, feature_dim=feature_dim, backend=backend,
            architecture=architecture,
        )  # fmt: skip
        model = build_model(cfg)
        if pretrained is not None:
            from maskprop_detector.pretrained import load_pretrained

            done = load_pretrained(model, cfg, pretrained)
            typer.echo(json.dumps({"pretrained": str(pretrained), **done}), err=True)
        losses = train(
            model, cfg, InstanceDataset(data, names, flip=True),
            TrainConfig(steps=steps, batch_size=batch_size, lr=lr),
            checkpoint=out, device=pick_device(device), progress=bars,
        )  # fmt: skip
        bars.close()
        typer.echo(json.dumps({"checkpoint": str(out), "classes": names, "losses": losses}))


@detector_app.command("predict")
def detector_predict(
    weights: Annotated[Path, typer.Option(help="Checkpoint from `maskprop detector train`.")],
    coco: Annotated[Path, typer.Option(help="COCO file listing the images (annotations unused).")],
    images: Annotated[Path, typer.Option(help="Folder the file_names are relative to.")],
    out: Annotated[Path, typer.Option(help="COCO results JSON to write.")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    backend: Annotated[
        str | None,
        typer.Option(help="Refuse weights of another backend (default: the checkpoint's)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Predict masks on an image set: COCO results (RLE) with s, predicted IoU and feature f;
    with ground truth in --coco, also prints mask AP."""
    bars = Bars(progress)
    with user_errors(bars):
        from maskprop_detector.data import LabelledSet, read_image
        from maskprop_detector.infer import detect
        from maskprop_detector.train import load_model, pick_device

        from maskprop.data.coco import write_coco_results
        from maskprop.data.instances import mask_ap

        dev = pick_device(device)
        model, cfg = load_model(weights, dev, backend=backend)
        data = LabelledSet.from_coco(coco, images)
        by_name = {c["name"]: int(c["id"]) for c in data.categories}
        missing = [n for n in cfg.classes if n not in by_name]
        if missing:
            raise MaskpropError(f"{coco} has no category for the model's classes {missing}")
        dets = detect(
            model, cfg,
            ((int(im["id"]), read_image(images, im["file_name"])) for im in data.images),
            total=len(data.images), device=dev, progress=bars,
        )  # fmt: skip
        results = dets.coco_results([by_name[n] for n in cfg.classes])
        for row, iou, f in zip(results, dets.mask_ious, dets.features, strict=True):
            row["mask_iou"] = float(iou)
            row["feature"] = [round(float(v), 5) for v in f]
        write_coco_results(out, results)
        bars.close()
        summary: dict[str, object] = {"masks": len(results), "out": str(out)}
        if data.annotations:
            summary["mask_ap"] = mask_ap(data.doc(), results)  # extra keys are ignored
        typer.echo(json.dumps(summary))
