"""The sink: writes the search service's propagated labels as a dataset.

Consumes ``maskprop.labels`` (LabelsPropagated) as group ``maskprop-sink``; produces nothing.
Serves gRPC ``maskprop.sink.v1.Dataset`` (``campaign export`` without the volume,
:mod:`maskprop_sink.grpc_api`) beside its health service.
State: the dataset directory (:mod:`maskprop_sink.dataset`).  Exactly-once comes from the
writer's ledger (a bitmap per class over mask indices, checkpointed beside the shards and
completed from the shards' tail at start), so the loop needs no Redis dedup set; a redelivered
event or a republished search outbox writes nothing the second time.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from google.protobuf.message import Message
from prometheus_client import Counter
from pydantic import Field, SecretStr, model_validator

from maskprop.data import coco
from maskprop_runtime import topics
from maskprop_runtime.bus import Bus, Record
from maskprop_runtime.loop import Emit, EventLoop, InvalidEvent
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from maskprop_runtime.pb.maskprop.sink.v1 import sink_pb2_grpc
from maskprop_runtime.server import build_server, entrypoint, listen, start_service
from maskprop_runtime.settings import RuntimeSettings
from maskprop_runtime.treestore import check_name
from maskprop_runtime.watchdog import watch
from maskprop_sink.dataset import DatasetWriter, UnwritableEvent
from maskprop_sink.grpc_api import SERVICE_NAME as DATASET_SERVICE
from maskprop_sink.grpc_api import DatasetServicer

log = logging.getLogger(__name__)

SERVICE = "sink"
GROUP = "maskprop-sink"
MAX_ID = 128

LABELS_WRITTEN = Counter(
    "maskprop_sink_labels_written_total", "Label lines appended to the dataset", ["campaign"]
)
LABELS_SKIPPED = Counter(
    "maskprop_sink_labels_skipped_total",
    "Labels already in the ledger (redelivered or republished)",
    ["campaign"],
)


class SinkSettings(RuntimeSettings):
    """``MASKPROP_DATASET_DIR`` (default ``<data_dir>/dataset``) on top of the runtime's, and
    the bearer token of its gRPC ``Dataset`` service (``MASKPROP_SINK_ADMIN_TOKEN``; the serving
    sink, :class:`ServingSinkSettings`, requires it in prod: an export hands out the whole
    dataset).  The CLI reads the dataset folder with this class, serving nothing."""

    dataset_dir: Path = Path("dataset")
    sink_admin_token: SecretStr | None = None
    # Where exports are written before they are streamed (default: the system's temp folder).
    sink_export_scratch: Path | None = None
    # The export child's address-space cap (None: none); the pod's memory limit must cover it.
    sink_export_memory_limit_mb: int | None = Field(default=None, ge=64)

    @model_validator(mode="after")
    def _default_dataset_dir(self) -> SinkSettings:
        if "dataset_dir" not in self.model_fields_set:
            self.dataset_dir = self.data_dir / "dataset"
        token = self.sink_admin_token
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("MASKPROP_SINK_ADMIN_TOKEN must be at least 16 characters")
        return self


class ServingSinkSettings(SinkSettings):
    """The sink process's settings: it serves ``Dataset``, so prod needs the admin token."""

    @model_validator(mode="after")
    def _token_in_prod(self) -> ServingSinkSettings:
        if self.env == "prod" and self.sink_admin_token is None:
            raise ValueError(
                "MASKPROP_ENV=prod needs MASKPROP_SINK_ADMIN_TOKEN: the sink's Dataset service "
                "exports whole campaigns"
            )
        return self


def validate(event: search_pb2.LabelsPropagated) -> None:
    """Raise :class:`InvalidEvent` (-> dead letter) for an event the sink cannot write."""
    try:
        check_name("campaign", event.campaign)
    except ValueError as exc:
        raise InvalidEvent(str(exc)) from None
    if not event.labels:
        raise InvalidEvent(f"event {event.event_id!r} carries no labels")
    for i, lab in enumerate(event.labels):
        if not lab.mask_id or len(lab.mask_id) > MAX_ID:
            raise InvalidEvent(f"label {i}: mask_id must be 1-{MAX_ID} characters")
        if not lab.image_id or len(lab.image_id) > MAX_ID:
            raise InvalidEvent(f"label {lab.mask_id!r}: image_id must be 1-{MAX_ID} characters")
        if not math.isfinite(lab.score):
            raise InvalidEvent(f"label {lab.mask_id!r}: score is not finite")
        if lab.accepted and not lab.HasField("rle"):
            if lab.omitted_rle_bytes:
                # Search sends such a label alone: parking this event blocks nothing else.
                raise InvalidEvent(
                    f"label {lab.mask_id!r} (mask_index {lab.mask_index}) is accepted but came "
                    f"without its RLE: {lab.omitted_rle_bytes} bytes cannot fit under the "
                    "labels topic's max.message.bytes"
                )
            raise InvalidEvent(f"label {lab.mask_id!r} is accepted but has no RLE")
    # Checked before anything decodes them (pycocotools trusts the counts and writes past its
    # h * w buffer when the runs add up to more), all labels in one vectorised pass.  Only
    # accepted labels need an RLE; a rejected one may still carry one.
    outlined = [lab for lab in event.labels if lab.HasField("rle")]
    rles = [lab.rle for lab in outlined]
    ok = coco.well_formed(
        [r.height for r in rles], [r.width for r in rles], [r.counts for r in rles]
    )
    if not ok.all():
        lab = outlined[int(np.argmin(ok))]
        problem = coco.rle_problem(lab.rle.height, lab.rle.width, lab.rle.counts)
        raise InvalidEvent(f"label {lab.mask_id!r}: {problem}")


class Sink:
    """The handler: a thin adapter from LabelsPropagated to :class:`DatasetWriter`."""

    def __init__(self, writer: DatasetWriter) -> None:
        self.writer = writer

    def handle(self, msg: Message, record: Record) -> list[Emit]:
        assert isinstance(msg, search_pb2.LabelsPropagated)
        validate(msg)
        try:
            written = self.writer.write(msg, record.partition)
        except UnwritableEvent as exc:
            # The writer checks what needs its ledger (unknown images) before any I/O.
            raise InvalidEvent(str(exc)) from None
        LABELS_WRITTEN.labels(msg.campaign).inc(written)
        LABELS_SKIPPED.labels(msg.campaign).inc(len(msg.labels) - written)
        log.info(
            "labels written",
            extra={
                "event_id": msg.event_id,
                "campaign": msg.campaign,
                "class_id": msg.class_id,
                "written": written,
                "skipped": len(msg.labels) - written,
            },
        )
        return []


def build_sink(
    settings: SinkSettings, bus: Bus, *, writer: DatasetWriter | None = None
) -> EventLoop:
    """The sink's event loop over ``writer`` (default: a writer on ``settings.dataset_dir``,
    which locks the directory and rebuilds the ledger from its shards)."""
    sink = Sink(writer if writer is not None else DatasetWriter(settings.dataset_dir))
    return EventLoop(
        service=SERVICE,
        bus=bus,
        group=GROUP,
        handlers={topics.LABELS: sink.handle},
        dedup=None,  # the dataset's own ledger is the dedup record
        max_records=settings.kafka_max_poll_records,
    )


@entrypoint
def main() -> None:
    settings = ServingSinkSettings()
    run = start_service(settings, SERVICE, needs_redis=False)
    bus, stop = run.bus, run.stop
    # Wait for a previous sink (a pod still draining) to let go of the directory; health
    # answers only once the lock is held and the ledger rebuilt, so probes see a ready sink.
    writer = DatasetWriter(settings.dataset_dir, lock_timeout_s=settings.connect_timeout_s)
    token = settings.sink_admin_token
    datasets = DatasetServicer(
        settings.dataset_dir,
        admin_token=token.get_secret_value() if token else None,
        scratch=settings.sink_export_scratch,
        memory_limit_mb=settings.sink_export_memory_limit_mb,
    )
    server, health = build_server(
        lambda s: sink_pb2_grpc.add_DatasetServicer_to_server(datasets, s),
        [SERVICE, DATASET_SERVICE],
        workers=4,
    )
    listen(server, settings.grpc_host, settings.grpc_port)
    server.start()
    log.info("sink started", extra={"dataset_dir": str(settings.dataset_dir)})
    loop = build_sink(settings, bus, writer=writer)
    watch(health, [SERVICE, DATASET_SERVICE], [loop.heartbeat], settings.loop_stall_s, stop)
    try:
        loop.run(stop)
    finally:
        health.enter_graceful_shutdown()
        server.stop(5).wait()
        writer.close()
