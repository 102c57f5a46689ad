"""Kafka topics and the payload type each carries (docs/architecture.md lists them)."""

from __future__ import annotations

from google.protobuf.message import Message

from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2

IMAGES = "maskprop.images"  # ImageBatch: detector input
MASKS = "maskprop.masks"  # MaskStreamEvent: masks detected / class batch closed
TREES = "maskprop.trees"  # TreeBuilt
LABELS = "maskprop.labels"  # LabelsPropagated
DEADLETTER = "maskprop.deadletter"  # DeadLetter

PAYLOADS: dict[str, type[Message]] = {
    IMAGES: detector_pb2.ImageBatch,
    MASKS: detector_pb2.MaskStreamEvent,
    TREES: clusterer_pb2.TreeBuilt,
    LABELS: search_pb2.LabelsPropagated,
    DEADLETTER: common_pb2.DeadLetter,
}


def class_key(campaign: str, class_id: int) -> bytes:
    """Partition key: all events of one class of one campaign stay in order."""
    return f"{campaign}/{class_id}".encode()
