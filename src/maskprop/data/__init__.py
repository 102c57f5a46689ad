"""Masks and datasets for the detector (issue #4): ``masks`` (the one table of predicted
masks), ``coco`` (the COCO format: RLE codec, read, validate, write), ``synth`` (synthetic
scenes with exact instance masks) and ``instances`` (true IoU, mask AP, de-duplication)."""

from maskprop.data.synth import (
    DEFAULT_CLASSES,
    DEFAULT_SPLIT,
    SHAPES,
    Scene,
    render_scene,
    synth_scenes,
)

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_SPLIT",
    "SHAPES",
    "Scene",
    "render_scene",
    "synth_scenes",
]
