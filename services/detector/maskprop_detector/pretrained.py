"""Users' pretrained weights into a freshly built detector (nothing is downloaded).

Accepted files, told apart by their keys:

* torchvision COCO Mask R-CNN (``maskrcnn_resnet50_fpn`` / ``_v2`` ``state_dict()``, ``.pt`` or
  ``.pth``), into the matching ``architecture``; read with ``torch.load(weights_only=True)``;
* an ImageNet ResNet ``state_dict()`` (``conv1.weight``, ``layer1...``, ``fc...``) into the
  torchvision backbone (``backbone.body``; ``fc`` is dropped); same loader;
* detectron2 model-zoo ``.pkl`` (``{"model": {name: ndarray}}``) into the detectron2 backend,
  read by :func:`load_pkl`, an Unpickler that admits numpy arrays and plain containers only.

The class-specific layers (box classifier and regressor, mask predictor; PointRend's coarse
prediction and point head, whose every layer takes per-class coarse predictions) are
re-initialised whenever their shape differs (the campaign's classes are not COCO's); the
mask-IoU head and the projection are always the new model's.  Any other key that is missing
or left over is an error: a checkpoint of another layout never half-loads.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from maskprop.errors import MaskpropError
from maskprop_detector.model import DetectorConfig

# Module-level names a .pkl may reference: numpy's array and scalar reconstruction and
# OrderedDict.  Everything else (os.system, builtins.eval, any class) is refused.
_PKL_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # Python 2 pickles' byte strings (the zoo's MSRA files)
}
# Parameters the new model always brings itself.
_OWN = ("mask_iou_head.", "roi_heads.projection")


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PKL_ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")
        return super().find_class(module, name)


def load_pkl(path: Path) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` of a detectron2 ``.pkl`` (``{"model": {...}}`` or the bare dict);
    refuses (MaskpropError) any pickle that names anything but numpy arrays and containers."""
    try:
        data = _ArraysOnly(io.BytesIO(Path(path).read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise MaskpropError(f"{path} is refused as weights: {exc}") from None
    model = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in model.items()
    ):
        raise MaskpropError(f"{path} is not a detectron2 weights file ({{name: array}})")
    return model


def read_weights(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.pkl`` (numpy-only unpickler) or a torch file (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise MaskpropError(f"pretrained weights not found: {path}")
    if path.suffix == ".pkl":
        return {k: torch.as_tensor(np.array(v)) for k, v in load_pkl(path).items()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MaskpropError(f"{path} is refused as weights: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise MaskpropError(f"{path} is not a state_dict of tensors")
    return state


def load_pretrained(model: nn.Module, cfg: DetectorConfig, path: Path) -> dict[str, Any]:
    """Copy the weights of ``path`` into ``model`` (built from ``cfg``); returns what was done:
    ``{"kind", "loaded", "reinitialised"}`` (counts and the re-initialised names)."""
    weights = read_weights(path)
    target = model.state_dict()
    if "conv1.weight" in weights and "layer1.0.conv1.weight" in weights:
        kind, prefix = "imagenet-backbone", _backbone_prefix(cfg)
        weights = {prefix + k: v for k, v in weights.items() if not k.startswith("fc.")}
        own = [k for k in target if not k.startswith(prefix)]
    else:
        kind = "detector"
        if cfg.backend == "detectron2":
            weights = {"model." + k: v for k, v in weights.items()}
        own = [k for k in target if any(p in k for p in _OWN)]
    reinit = sorted(k for k, v in weights.items() if k in target and v.shape != target[k].shape)
    unknown = sorted(set(weights) - set(target))
    missing = sorted(set(target) - set(weights) - set(own) - _optional(target))
    bad = [k for k in reinit if not _class_specific(k)]
    if unknown or missing or bad:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("unknown", unknown), ("missing", missing), ("shape", bad))
            if keys
        )
        raise MaskpropError(
            f"{path} does not fit the {cfg.backend} architecture {cfg.arch!r} ({detail})"
        )
    loadable = OrderedDict((k, v) for k, v in weights.items() if k not in reinit)
    # The target's module versions: detectron2 would otherwise "convert" an old layout.
    loadable._metadata = getattr(target, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(loadable, strict=False)
    return {"kind": kind, "loaded": len(loadable), "reinitialised": reinit}


def _backbone_prefix(cfg: DetectorConfig) -> str:
    if cfg.backend != "torchvision" or cfg.arch == "r18_fpn_gn":
        raise MaskpropError(
            "an ImageNet ResNet-50 checkpoint fits the torchvision architectures "
            "maskrcnn_resnet50_fpn and maskrcnn_resnet50_fpn_v2"
        )
    return "backbone.body."


def _class_specific(key: str) -> bool:
    """Layers whose shape follows the number of classes."""
    return any(
        part in key
        for part in (
            "box_predictor.cls_score", "box_predictor.bbox_pred", "mask_predictor.mask_fcn_logits",
            # PointRend's point MLP takes the coarse prediction of every class at each layer
            "mask_head.coarse_head.prediction", "mask_head.point_head.",
        )
    )  # fmt: skip


def _optional(target: dict[str, Tensor]) -> set[str]:
    """BatchNorm counters older files lack (BatchNorm fills them in)."""
    return {k for k in target if k.endswith("num_batches_tracked")}
