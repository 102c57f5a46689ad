"""The detector service: consumes ``maskprop.images`` (ImageBatch: image references, never
pixels) as consumer group ``maskprop-detector``, runs the model (one per process, batched,
CUDA with mixed precision when present) and produces ``maskprop.masks`` events.

A campaign's batches share one partition (key = campaign), so one detector handles them in
order.  Each batch's per-class mask counts go to Redis (``maskprop:detector:<campaign>:counts``,
one field per batch index: a redelivered batch rewrites its own field); the batch that completes
the set also announces ``closed`` for every class, after its own masks on the same partitions.
Unreadable images are skipped with a warning (and counted), so one bad file cannot stall a
campaign; a batch that is malformed as a whole is dead-lettered with the reason.

A campaign's round r > 1 (campaign ``<name>.r<r>``, ``maskprop campaign next-round``) names the
retrained weights in ``ImageBatch.weights``: a path under ``MASKPROP_MODELS_ROOT``
(``resolve_under``: ``..``, absolute paths and symlinks out are refused), loaded once with the
service's backend setting and kept (the last one besides the service's own); weights outside the
root, missing or unloadable dead-letter the batch with the reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message
from pydantic import Field

from maskprop.errors import MaskpropError
from maskprop_runtime import topics
from maskprop_runtime.bus import Bus, Record
from maskprop_runtime.files import resolve_under
from maskprop_runtime.loop import DedupStore, Emit, EventLoop, InvalidEvent
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.server import entrypoint, start_health_only, start_service
from maskprop_runtime.settings import RuntimeSettings
from maskprop_runtime.treestore import check_name
from maskprop_runtime.watchdog import watch

log = logging.getLogger(__name__)

MAX_IMAGES_PER_BATCH = 1024
#: Seconds between the consumer keep-alives of a batch going through the model.
KEEP_ALIVE_S = 5.0
T = TypeVar("T")


class DetectorSettings(RuntimeSettings):
    detector_weights: Path = Path("models/detector.pt")
    models_root: Path = Path("models")  # where a round's ImageBatch.weights may point
    image_root: Path = Path("images")
    device: str = "auto"
    detector_batch_size: int = Field(default=16, ge=1, le=256)
    # "torchvision" or "detectron2": the weights must be of this backend ("": whichever the
    # checkpoint names; the architecture is always the checkpoint's).
    detector_backend: str = ""


class DetectorHandler:
    """ImageBatch -> MasksDetected events (+ ClassBatchClosed after the campaign's last batch)."""

    def __init__(
        self,
        model: Any,
        cfg: Any,
        redis: Any,
        *,
        image_root: Path,
        device: Any = None,
        batch_size: int = 16,
        max_bytes: int = topics.record_limit(),
        models_root: Path | None = None,
        load_weights: Callable[[Path], tuple[Any, Any]] | None = None,
    ) -> None:
        """``max_bytes``: the most bytes a ``maskprop.masks`` event may take
        (:func:`maskprop_runtime.topics.record_limit` of ``kafka_max_message_bytes``).
        ``models_root`` and ``load_weights`` (path -> (model, cfg)): a round's weights; without
        them a batch naming weights is dead-lettered."""
        self.model, self.cfg, self.redis = model, cfg, redis
        self.models_root = models_root
        self.load_weights = load_weights
        self._round_model: tuple[Path, Any, Any] | None = None
        self.max_bytes = max_bytes
        self.image_root = Path(image_root)
        self.device = device
        self.batch_size = batch_size
        self.skipped_images = 0
        #: Called at most every :data:`KEEP_ALIVE_S` while a batch's images go through the
        #: model (the loop's consumer keep-alive, which also beats its watchdog): 1,024 images
        #: on a CPU take longer than the group's max.poll.interval (600 s).
        self.keep_alive: Callable[[], None] = lambda: None

    def _model_for(self, weights: str) -> tuple[Any, Any]:
        """(model, cfg) of a batch: the service's own, or the round's weights it names."""
        if not weights:
            return self.model, self.cfg
        if self.models_root is None or self.load_weights is None:
            raise InvalidEvent(f"this detector loads no round weights (asked for {weights!r})")
        path = resolve_under(self.models_root, weights)
        if path is None:
            raise InvalidEvent(f"weights {weights!r} are not under the models root")
        if self._round_model is not None and self._round_model[0] == path:
            return self._round_model[1], self._round_model[2]
        if not path.is_file():
            raise InvalidEvent(f"weights {weights!r} do not exist under the models root")
        try:
            model, cfg = self.load_weights(path)
        except MaskpropError as exc:
            raise InvalidEvent(f"weights {weights!r}: {exc}") from None
        self._round_model = (path, model, cfg)
        log.info("round weights loaded", extra={"weights": str(path)})
        return model, cfg

    def _check(self, msg: detector_pb2.ImageBatch, cfg: Any = None) -> None:
        """Raise :class:`InvalidEvent` for a malformed batch; ``cfg``: the model's (default
        the service's own)."""
        cfg = self.cfg if cfg is None else cfg
        try:
            check_name("campaign", msg.campaign)
        except ValueError as exc:
            raise InvalidEvent(str(exc)) from None
        if not 1 <= len(msg.images) <= MAX_IMAGES_PER_BATCH:
            raise InvalidEvent(f"an ImageBatch carries 1-{MAX_IMAGES_PER_BATCH} images")
        if msg.batch_count < 1 or msg.batch_index >= msg.batch_count:
            raise InvalidEvent("batch_index must be below batch_count (>= 1)")
        if msg.class_names and tuple(msg.class_names) != tuple(cfg.classes):
            raise InvalidEvent(
                f"campaign classes {list(msg.class_names)} differ from the model's "
                f"{list(cfg.classes)}"
            )
        ids = [ref.image_id for ref in msg.images]
        if any(not i for i in ids) or len(set(ids)) != len(ids):
            raise InvalidEvent("image ids must be non-empty and unique within a batch")

    def _kept_alive(self, items: Iterator[T]) -> Iterator[T]:
        """``items`` as the model takes them (a batch at a time), keeping the consumer alive."""
        last = time.monotonic()
        for item in items:
            if time.monotonic() - last >= KEEP_ALIVE_S:
                self.keep_alive()
                last = time.monotonic()
            yield item

    def handle(self, msg: Message, record: Record) -> list[Emit]:
        from maskprop_detector.data import read_image
        from maskprop_detector.events import closed_events, masks_events, table_encoder
        from maskprop_detector.infer import detect

        assert isinstance(msg, detector_pb2.ImageBatch)
        model, cfg = self._model_for(msg.weights)
        self._check(msg, cfg)
        pixels = []
        for ref in msg.images:
            try:
                pixels.append((ref, read_image(self.image_root, ref.uri)))
            except MaskpropError as exc:
                self.skipped_images += 1
                log.warning("image skipped", extra={"image_id": ref.image_id, "reason": str(exc)})
        dets = detect(
            model,
            cfg,
            self._kept_alive((ref.image_id, px) for ref, px in pixels),
            batch_size=self.batch_size,
            device=self.device,
        )
        images = {
            ref.image_id: common_pb2.ImageInfo(
                image_id=ref.image_id, width=px.shape[1], height=px.shape[0], file_name=ref.uri
            )
            for ref, px in pixels
        }
        oversized: list[tuple[int, int]] = []
        out = [
            Emit(topics.MASKS, key, ev)
            for key, ev in masks_events(
                campaign=msg.campaign,
                class_names=cfg.classes,
                class_ids=dets.class_ids,
                mask_ids=dets.mask_ids.tolist(),
                image_ids=dets.image_ids.tolist(),
                scores=dets.scores,
                features=dets.features,
                encode=table_encoder(dets),
                images=images,
                event_prefix=f"masks.{msg.campaign}.{msg.batch_index}",
                max_bytes=self.max_bytes,
                oversized=oversized,
            )
        ]
        counts = {c: int((dets.class_ids == c).sum()) for c in range(len(cfg.classes))}
        for i, size in oversized:
            # A mask no event can carry is dead-lettered (with its metadata, not its RLE) and
            # left out of its class's expected count, so the class still closes.
            c = int(dets.class_ids[i])
            counts[c] -= 1
            out.append(_oversized_letter(msg, record, dets, i, size, self.max_bytes))
        key = f"maskprop:detector:{msg.campaign}:counts"
        self.redis.hset(key, str(msg.batch_index), json.dumps(counts))
        if self.redis.hlen(key) >= msg.batch_count:
            total: dict[int, int] = {}
            for raw in self.redis.hvals(key):
                for c, n in json.loads(raw).items():
                    total[int(c)] = total.get(int(c), 0) + int(n)
            out += [
                Emit(topics.MASKS, k, ev)
                for k, ev in closed_events(msg.campaign, cfg.classes, total)
            ]
            log.info(
                "campaign detected", extra={"campaign": msg.campaign, "masks": sum(total.values())}
            )
        return out


def _oversized_letter(
    msg: detector_pb2.ImageBatch, record: Record, dets: Any, i: int, size: int, max_bytes: int
) -> Emit:
    """The dead letter of detection ``i`` of ``dets``, whose event would take ``size`` bytes."""
    c = int(dets.class_ids[i])
    mask = detector_pb2.MasksDetected(campaign=msg.campaign, class_id=c)
    mask.masks.add(
        mask_id=str(dets.mask_ids[i]), image_id=str(dets.image_ids[i]), score=float(dets.scores[i])
    )
    key = topics.class_key(msg.campaign, c)
    letter = common_pb2.DeadLetter(
        service="detector",
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key,
        payload=detector_pb2.MaskStreamEvent(
            event_id=f"oversized.{msg.campaign}", masks=mask
        ).SerializeToString(),
        reason=(
            f"mask {dets.mask_ids[i]!s} of image {dets.image_ids[i]!s}: an event of {size} bytes "
            f"alone exceeds maskprop.masks' limit of {max_bytes} (its RLE is left out here)"
        ),
    )
    return Emit(topics.DEADLETTER, key, letter)


def build_detector(settings: DetectorSettings, bus: Bus, redis: Any) -> EventLoop:
    """Load the model (clear error when the weights are missing) and wire the handler."""
    from maskprop_detector.train import load_model, pick_device

    device = pick_device(settings.device)
    model, cfg = load_model(
        settings.detector_weights, device, backend=settings.detector_backend or None
    )
    handler = DetectorHandler(
        model, cfg, redis, image_root=settings.image_root, device=device,
        batch_size=settings.detector_batch_size,
        max_bytes=topics.record_limit(settings.kafka_max_message_bytes),
        models_root=settings.models_root,
        load_weights=lambda path: load_model(
            path, device, backend=settings.detector_backend or None
        ),
    )  # fmt: skip
    loop = EventLoop(
        service="detector",
        bus=bus,
        group="maskprop-detector",
        handlers={topics.IMAGES: handler.handle},
        dedup=DedupStore(redis, "detector", ttl_s=settings.dedup_ttl_s),
        max_records=1,
    )
    handler.keep_alive = loop.keep_alive
    return loop


@entrypoint
def main() -> None:
    settings = DetectorSettings()
    run = start_service(settings, "detector", needs_redis=True)
    server, health = start_health_only(settings.grpc_host, settings.grpc_port, "detector")
    loop = build_detector(settings, run.bus, run.redis)
    watch(health, ["detector"], [loop.heartbeat], settings.loop_stall_s, run.stop)
    loop.run(run.stop)
    health.enter_graceful_shutdown()
    server.stop(5).wait()
