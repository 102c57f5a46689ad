"""Training and checkpoints.

A checkpoint is one ``torch.save`` dict of tensors and plain values: the detector config, the
weights, and (for resuming) the optimiser, the step and the RNG state.  It is always loaded
with ``torch.load(..., weights_only=True)``, so a checkpoint file cannot run code.  Writes go
to a temporary file and are renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maskprop.errors import MaskpropError
from maskprop.files import atomic_file
from maskprop.progress import Progress, no_progress
from maskprop_detector.model import DetectorConfig, build_model

CHECKPOINT_FORMAT = "maskprop-detector-1"


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimiser steps of ``batch_size`` images; AdamW with linear warm-up and cosine
    decay; gradients clipped at ``clip``."""

    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 30
    clip: float = 10.0
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise MaskpropError("training steps and batch size must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MaskpropError("learning rate must be a positive number")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MaskpropError(f"device {name!r} asked for, but no CUDA GPU is available")
    return torch.device(name)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    cfg: DetectorConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "step": step,
        "extra": extra or {},
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["rng"] = torch.get_rng_state()
    # Weights are read by other processes (the detector service): 0644, not mkstemp's 0600.
    with atomic_file(Path(path), permissions=0o644) as f:
        torch.save(state, f)


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise MaskpropError(
            f"detector weights not found: {path} (train a model first: maskprop detector train)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MaskpropError(f"{path} is not a maskprop detector checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MaskpropError(f"{path} is not a maskprop detector checkpoint")
    return state


def load_model(
    path: Path, device: torch.device | None = None, *, backend: str | None = None
) -> tuple[nn.Module, DetectorConfig]:
    """Model (eval mode) and config from a checkpoint, built by the backend the checkpoint
    names; with ``backend``, weights of another backend are refused."""
    state = read_checkpoint(path)
    cfg = DetectorConfig.from_dict(state["config"])
    if backend is not None and backend != cfg.backend:
        raise MaskpropError(
            f"{path} holds {cfg.backend!r} detector weights, but backend {backend!r} was asked for"
        )
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise MaskpropError(f"{path}: weights do not fit the model: {exc}") from None
    model.to(device or torch.device("cpu")).eval()
    return model, cfg


def _collate(
    batch: list[tuple[Tensor, dict[str, Tensor]]],
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def train(
    model: nn.Module,
    cfg: DetectorConfig,
    dataset: torch.utils.data.Dataset[Any],
    tcfg: TrainConfig,
    *,
    checkpoint: Path | None = None,
    device: torch.device | None = None,
    progress: Progress = no_progress,
) -> dict[str, float]:
    """Train ``model`` in place for ``tcfg.steps`` steps; returns the mean of each loss over the
    last 20 steps.  With ``checkpoint``, state is saved every ``checkpoint_every`` steps and a
    run that finds a checkpoint of an unfinished run of the same config continues from it."""
    device = device or torch.device("cpu")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = read_checkpoint(checkpoint)
        # Compared as configs, so a checkpoint written before a field was added still resumes.
        try:
            same_cfg = DetectorConfig.from_dict(state["config"]) == cfg
        except MaskpropError:  # another version's config: start afresh
            same_cfg = False
        same = same_cfg and state["extra"].get("train") == _plain(tcfg)
        if same and state["step"] >= tcfg.steps:  # finished earlier: nothing left to do
            model.load_state_dict(state["model"])
            model.eval()
            return {}
        if same and "optimizer" in state:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start = int(state["step"])
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise MaskpropError("the training set has no images")
    generator = torch.Generator().manual_seed(tcfg.seed + start)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=tcfg.batch_size,
        shuffle=True,
        collate_fn=_collate,
        generator=generator,
        drop_last=len(dataset) > tcfg.batch_size,  # type: ignore[arg-type]
    )

    def lr_at(step: int) -> float:
        if step < tcfg.warmup:
            return tcfg.lr * (step + 1) / tcfg.warmup
        t = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)
        return tcfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    recent: list[dict[str, float]] = []
    step = start
    progress("train", step, tcfg.steps)
    while step < tcfg.steps:
        for images, targets in loader:
            if step >= tcfg.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise MaskpropError(
                    f"training diverged at step {step} (loss {float(loss)}); "
                    "lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, tcfg.clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            recent = [*recent, {k: float(v.detach()) for k, v in losses.items()}][-20:]
            progress("train", step, tcfg.steps)
            if checkpoint is not None and (step % tcfg.checkpoint_every == 0 or step == tcfg.steps):
                # A finished run keeps only the weights (a third of the size: no AdamW moments).
                save_checkpoint(
                    checkpoint, model, cfg, optimizer=optimizer if step < tcfg.steps else None,
                    step=step, extra={"train": _plain(tcfg)},
                )  # fmt: skip
    model.eval()
    return {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]} if recent else {}


def _plain(tcfg: TrainConfig) -> dict[str, Any]:
    return {k: getattr(tcfg, k) for k in tcfg.__dataclass_fields__}
