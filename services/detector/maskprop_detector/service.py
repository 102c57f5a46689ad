"""The detector service shell: consumes ``maskprop.images`` (ImageBatch) as consumer group
``maskprop-detector``.  The model itself (Mask R-CNN with a mask-IoU head, issue #4) is not
built yet, so every batch is dead-lettered with that reason rather than silently dropped;
``maskprop feed-simulated`` publishes a simulated detector's masks instead."""

from __future__ import annotations

import logging

from google.protobuf.message import Message

from maskprop_runtime import topics
from maskprop_runtime.bus import Bus, Record
from maskprop_runtime.loop import Emit, EventLoop, InvalidEvent
from maskprop_runtime.server import entrypoint, start_health_only, start_service
from maskprop_runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)


def handle_images(msg: Message, record: Record) -> list[Emit]:
    raise InvalidEvent("no detector model is configured in this build (see issue #4)")


def build_detector(settings: RuntimeSettings, bus: Bus) -> EventLoop:
    return EventLoop(
        service="detector",
        bus=bus,
        group="maskprop-detector",
        handlers={topics.IMAGES: handle_images},
        max_records=settings.kafka_max_poll_records,
    )


@entrypoint
def main() -> None:
    settings = RuntimeSettings()
    run = start_service(settings, "detector", needs_redis=False)
    server, health = start_health_only(settings.grpc_host, settings.grpc_port, "detector")
    build_detector(settings, run.bus).run(run.stop)
    health.enter_graceful_shutdown()
    server.stop(5).wait()
