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

#: Every topic's ``max.message.bytes`` unless ``MASKPROP_KAFKA_MAX_MESSAGE_BYTES`` says
#: otherwise (Kafka's own default is 1 MiB + 12 bytes; maskprop sets it explicitly on each topic:
#: scripts/dev-infra.sh, deploy/k8s/base/kafka.yaml, ``KafkaBus.ensure_topics``).
MAX_MESSAGE_BYTES = 1_048_576
#: Bytes of a record batch that are not the record's value: the batch header (61 B), the
#: record header, the key (< 200 B) and kafka-python's estimate slack.  A value of at most
#: ``max.message.bytes - RECORD_HEADROOM`` always fits: records over the producer's 16 KiB
#: batch size travel alone in their batch.
RECORD_HEADROOM = 4096


def record_limit(max_message_bytes: int = MAX_MESSAGE_BYTES) -> int:
    """The most bytes a serialized event may take on a topic of ``max_message_bytes``."""
    if max_message_bytes <= 2 * RECORD_HEADROOM:
        raise ValueError(f"max.message.bytes must exceed {2 * RECORD_HEADROOM}")
    return max_message_bytes - RECORD_HEADROOM


def class_key(campaign: str, class_id: int) -> bytes:
    """Partition key: all events of one class of one campaign stay in order."""
    return f"{campaign}/{class_id}".encode()
