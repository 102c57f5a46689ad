"""Inference speed of the maskprop detector (Mask R-CNN + mask-IoU head + mask-attention
features) against the named baseline "plain torchvision Mask R-CNN": the same backbone, heads,
input size and weights (the baseline shares every weight it has), in the same process, on the
same images, alternating runs.  Both keep exactly ``--detections`` boxes per image (score
threshold 0), so the two do the same box and mask work and the ratio is the cost of the IoU head
and the features.  Also times our model with the production filters on (s > 0.2).

    python benchmarks/bench_detector.py [--weights out/demo/models/round2.pt] [--images 64]
        [--backend torchvision|detectron2|both]

The detectron2 backend (PointRend R50-FPN + IoU head + f) is timed against plain PointRend
with the same weights and against plain torchvision Mask R-CNN R50-FPN (``maskrcnn_resnet50_fpn``,
random weights) of the same input size and detections, in the same run.  Runs on the CPU here;
on a CUDA machine it also times the GPU (fp16 autocast).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from maskprop_detector.data import to_tensor
from maskprop_detector.model import DetectorConfig, build_model
from maskprop_detector.train import load_model

from maskprop.data.synth import DEFAULT_CLASSES, render_scene


def _models(
    weights: Path | None, size: int, detections: int, backend: str
) -> tuple[torch.nn.Module, torch.nn.Module, DetectorConfig]:
    if weights is not None:
        ours, cfg = load_model(weights)
    else:
        # detectron2: the model zoo's PointRend R50-FPN layout (256-channel FPN, 1000 test
        # proposals), the same size as torchvision's maskrcnn_resnet50_fpn it is timed against
        arch = "pointrend_r50_fpn" if backend == "detectron2" else ""
        cfg = DetectorConfig(
            classes=DEFAULT_CLASSES, image_size=size, backend=backend, architecture=arch
        )
        ours = build_model(cfg)
    plain = build_model(cfg, scoring=False)
    missing, unexpected = plain.load_state_dict(ours.state_dict(), strict=False)
    assert not missing, f"baseline lacks weights: {missing}"
    assert all("roi_heads.mask_iou_head" in k or k.endswith("roi_heads.projection")
               for k in unexpected)  # fmt: skip
    for m in (ours, plain):
        _keep(m, 0.0, detections)
    return ours, plain, cfg


def _keep(model: torch.nn.Module, score_thresh: float, detections: int) -> None:
    """Box score threshold and detections per image of either backend's model; eval mode."""
    heads: Any = model.roi_heads
    if hasattr(heads, "box_predictor") and hasattr(heads.box_predictor, "test_score_thresh"):
        heads.box_predictor.test_score_thresh = score_thresh  # detectron2
        heads.box_predictor.test_topk_per_image = detections
    else:
        heads.score_thresh = score_thresh
        heads.detections_per_img = detections
    model.eval()


def _time(model: torch.nn.Module, batches: list[list[torch.Tensor]], device: torch.device) -> float:
    use_amp = device.type == "cuda"
    if use_amp:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, enabled=use_amp):
        for b in batches:
            model([im.to(device) for im in b])
    if use_amp:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(device: torch.device, args: argparse.Namespace, backend: str) -> None:
    ours, plain, cfg = _models(args.weights, args.size, args.detections, backend)
    ours.to(device)
    plain.to(device)
    tv_r50 = None
    if cfg.backend == "detectron2":  # the named baseline at PointRend's size: R50-FPN
        r50 = DetectorConfig(classes=cfg.classes, image_size=cfg.image_size,
                             architecture="maskrcnn_resnet50_fpn")  # fmt: skip
        tv_r50 = build_model(r50, scoring=False).to(device)
        _keep(tv_r50, 0.0, args.detections)
    images = [to_tensor(render_scene(7, k, size=cfg.image_size).image) for k in range(args.images)]
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    _time(ours, batches[:1], device)  # warm-up (allocations, cudnn autotune)
    _time(plain, batches[:1], device)
    if tv_r50 is not None:
        _time(tv_r50, batches[:1], device)
    t_ours, t_plain, t_r50 = [], [], []
    for _ in range(args.repeat):
        t_plain.append(_time(plain, batches, device))
        t_ours.append(_time(ours, batches, device))
        if tv_r50 is not None:
            t_r50.append(_time(tv_r50, batches, device))
    ips_ours = args.images / statistics.median(t_ours)
    ips_plain = args.images / statistics.median(t_plain)
    print(
        f"device {device}, backend {cfg.backend} ({cfg.arch}), {args.images} images of "
        f"{cfg.image_size} px, batch {args.batch}, {args.detections} detections/image, "
        f"{torch.get_num_threads()} threads"
    )
    name = "PointRend" if cfg.backend == "detectron2" else "torchvision Mask R-CNN"
    print(f"  plain {name:<32} (baseline): {ips_plain:8.2f} images/s")
    print(f"  maskprop detector (IoU head + f)             : {ips_ours:8.2f} images/s")
    print(f"  ratio maskprop / baseline                    : {ips_ours / ips_plain:8.3f}x")
    if t_r50:
        ips_r50 = args.images / statistics.median(t_r50)
        print(f"  plain torchvision Mask R-CNN R50-FPN         : {ips_r50:8.2f} images/s")
        print(f"  ratio maskprop PointRend / torchvision R50   : {ips_ours / ips_r50:8.3f}x")
    if args.weights is not None:
        _keep(ours, 0.05, cfg.max_detections)
        t = statistics.median(_time(ours, batches, device) for _ in range(args.repeat))
        print(f"  maskprop detector, production filters        : {args.images / t:8.2f} images/s")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--weights", type=Path, default=None, help="a checkpoint (default: random init)"
    )
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--detections", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--backend", choices=("torchvision", "detectron2", "both"), default="both",
        help="backend(s) to time when no --weights (the checkpoint names its own)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = ("torchvision", "detectron2") if args.backend == "both" else (args.backend,)
    if args.weights is not None:
        backends = backends[:1]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in backends:
            bench(device, args, backend)


if __name__ == "__main__":
    main()
