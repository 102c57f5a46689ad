"""Datasets for the detector (issue #4): synthetic scenes with exact instance masks, and COCO
instance files (the same format users bring their own labelled sets in)."""

from maskprop.data.synth import (
    DEFAULT_CLASSES,
    DEFAULT_SPLIT,
    SHAPES,
    Scene,
    load_coco_instances,
    render_scene,
    synth_scenes,
)

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_SPLIT",
    "SHAPES",
    "Scene",
    "load_coco_instances",
    "render_scene",
    "synth_scenes",
]
