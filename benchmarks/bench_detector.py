"""Inference speed of the maskprop detector (Mask R-CNN + mask-IoU head + mask-attention
features) against the named baseline "plain torchvision Mask R-CNN": the same backbone, heads,
input size and weights (the baseline shares every weight it has), in the same process, on the
same images, alternating runs.  Both keep exactly ``--detections`` boxes per image (score
threshold 0), so the two do the same box and mask work and the ratio is the cost of the IoU head
and the features.  Also times our model with the production filters on (s > 0.2).

    python benchmarks/bench_detector.py [--weights out/demo/models/round2.pt] [--images 64]

Runs on the CPU here; on a CUDA machine it also times the GPU (fp16 autocast).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from maskprop_detector.data import to_tensor
from maskprop_detector.model import DetectorConfig, build_model
from maskprop_detector.train import load_model

from maskprop.data.synth import DEFAULT_CLASSES, render_scene


def _models(
    weights: Path | None, size: int, detections: int
) -> tuple[torch.nn.Module, torch.nn.Module, DetectorConfig]:
    if weights is not None:
        ours, cfg = load_model(weights)
    else:
        cfg = DetectorConfig(classes=DEFAULT_CLASSES, image_size=size)
        ours = build_model(cfg)
    plain = build_model(cfg, scoring=False)
    missing, unexpected = plain.load_state_dict(ours.state_dict(), strict=False)
    assert not missing, f"baseline lacks weights: {missing}"
    assert all(
        k.startswith("roi_heads.mask_iou_head") or k == "roi_heads.projection" for k in unexpected
    )
    for m in (ours, plain):
        m.roi_heads.score_thresh = 0.0
        m.roi_heads.detections_per_img = detections
        m.eval()
    return ours, plain, cfg


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


def bench(device: torch.device, args: argparse.Namespace) -> None:
    ours, plain, cfg = _models(args.weights, args.size, args.detections)
    ours.to(device)
    plain.to(device)
    images = [to_tensor(render_scene(7, k, size=cfg.image_size).image) for k in range(args.images)]
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    _time(ours, batches[:1], device)  # warm-up (allocations, cudnn autotune)
    _time(plain, batches[:1], device)
    t_ours, t_plain = [], []
    for _ in range(args.repeat):
        t_plain.append(_time(plain, batches, device))
        t_ours.append(_time(ours, batches, device))
    ips_ours = args.images / statistics.median(t_ours)
    ips_plain = args.images / statistics.median(t_plain)
    print(
        f"device {device}, {args.images} images of {cfg.image_size} px, batch {args.batch}, "
        f"{args.detections} detections/image, {torch.get_num_threads()} threads"
    )
    print(f"  plain torchvision Mask R-CNN (baseline): {ips_plain:8.1f} images/s")
    print(f"  maskprop detector (IoU head + f)       : {ips_ours:8.1f} images/s")
    print(f"  ratio maskprop / baseline              : {ips_ours / ips_plain:8.3f}x")
    if args.weights is not None:
        ours.roi_heads.score_thresh = 0.05
        ours.roi_heads.detections_per_img = cfg.max_detections
        t = statistics.median(_time(ours, batches, device) for _ in range(args.repeat))
        print(f"  maskprop detector, production filters  : {args.images / t:8.1f} images/s")


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
    args = ap.parse_args()
    bench(torch.device("cpu"), args)
    if torch.cuda.is_available():
        bench(torch.device("cuda"), args)


if __name__ == "__main__":
    main()
