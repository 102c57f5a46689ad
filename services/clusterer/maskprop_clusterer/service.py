"""The clusterer: buffers each class's detected masks, builds the class's complete-linkage
tree (``maskprop.tree.build_tree``) when the class batch closes, stores it and announces it.

Consumes ``maskprop.masks`` (MaskStreamEvent), produces ``maskprop.trees`` (TreeBuilt).
State: the tree store directory (batches and trees), written atomically; a redelivered batch
overwrites its own file, a redelivered "closed" re-announces the same tree.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from maskprop.data import coco
from maskprop.data.masks import MaskTable, pack_counts
from maskprop.tree import build_tree
from maskprop_runtime import codec, topics
from maskprop_runtime.bus import Bus, Record
from maskprop_runtime.loop import DedupStore, Emit, EventLoop, InvalidEvent
from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.server import entrypoint, start_health_only, start_service
from maskprop_runtime.settings import RuntimeSettings
from maskprop_runtime.treestore import TreeStore, check_name

log = logging.getLogger(__name__)

MAX_MASK_ID = 128


class ClustererSettings(RuntimeSettings):
    tree_dir: Path | None = None  # default: <data_dir>/trees

    @property
    def trees(self) -> Path:
        return self.tree_dir or self.data_dir / "trees"


def table_from_event(ev: detector_pb2.MasksDetected) -> MaskTable:
    """Validate a batch of detected masks and turn it into columns (boxes: the masks' extents;
    the predicted IoU is not on the wire)."""
    dim = ev.feature_dim
    if dim < 1:
        raise InvalidEvent("feature_dim must be at least 1")
    if not ev.masks:
        raise InvalidEvent("a MasksDetected event needs at least one mask")
    n = len(ev.masks)
    scores = np.empty(n, dtype=np.float32)
    h = np.empty(n, dtype=np.uint32)
    w = np.empty(n, dtype=np.uint32)
    blobs: list[bytes] = []
    for i, m in enumerate(ev.masks):
        if not m.mask_id or len(m.mask_id) > MAX_MASK_ID or not m.image_id:
            raise InvalidEvent(f"mask {i}: mask_id (1-{MAX_MASK_ID} chars) and image_id needed")
        if not (math.isfinite(m.score) and 0.0 <= m.score <= 1.0):
            raise InvalidEvent(f"mask {m.mask_id}: score must be in [0, 1]")
        scores[i] = m.score
        h[i], w[i] = m.rle.height, m.rle.width
        blobs.append(m.rle.counts)
    ok = coco.well_formed(h, w, blobs)  # the whole batch in one vectorised pass
    if not ok.all():
        bad = ev.masks[int(np.argmin(ok))]
        problem = coco.rle_problem(bad.rle.height, bad.rle.width, bad.rle.counts)
        raise InvalidEvent(f"mask {bad.mask_id}: malformed RLE: {problem}")
    feats = np.empty((n, dim), dtype=np.float32)
    for i, m in enumerate(ev.masks):
        try:
            feats[i] = codec.unpack_features(m.feature_f16, dim)
        except ValueError as exc:
            raise InvalidEvent(f"mask {m.mask_id}: {exc}") from None
    if not np.isfinite(feats).all():
        raise InvalidEvent("features must be finite")
    known = {im.image_id for im in ev.images}
    missing = {m.image_id for m in ev.masks} - known
    if missing:
        raise InvalidEvent(
            f"masks refer to images not described in the event: {sorted(missing)[:3]}"
        )
    blob, offsets = pack_counts(blobs)
    return MaskTable(
        mask_ids=np.array([m.mask_id for m in ev.masks]),
        image_ids=np.array([m.image_id for m in ev.masks]),
        class_ids=np.full(n, ev.class_id, dtype=np.int32),
        scores=scores,
        features=feats,
        boxes=coco.boxes_xyxy(h.tolist(), w.tolist(), blobs),
        mask_ious=np.full(n, np.nan, dtype=np.float32),
        rle_h=h,
        rle_w=w,
        rle_blob=blob,
        rle_offsets=offsets,
        img_ids=np.array([im.image_id for im in ev.images]),
        img_w=np.array([im.width for im in ev.images], dtype=np.uint32),
        img_h=np.array([im.height for im in ev.images], dtype=np.uint32),
        img_files=np.array([im.file_name for im in ev.images]),
    )


class Clusterer:
    """The handler: a thin adapter from MaskStreamEvent to the tree library."""

    def __init__(self, store: TreeStore) -> None:
        self.store = store

    def handle(self, msg: Message, record: Record) -> list[Emit]:
        assert isinstance(msg, detector_pb2.MaskStreamEvent)
        try:
            check_name("event_id", msg.event_id)
        except ValueError as exc:
            raise InvalidEvent(str(exc)) from None
        body = msg.WhichOneof("body")
        if body == "masks":
            ev = msg.masks
            self._check_campaign(ev.campaign)
            self.store.put_batch(ev.campaign, ev.class_id, msg.event_id, table_from_event(ev))
            return []
        if body == "closed":
            return self._close(msg.closed)
        raise InvalidEvent("MaskStreamEvent carries neither masks nor closed")

    @staticmethod
    def _check_campaign(campaign: str) -> None:
        try:
            check_name("campaign", campaign)
        except ValueError as exc:
            raise InvalidEvent(str(exc)) from None

    def _close(self, closed: detector_pb2.ClassBatchClosed) -> list[Emit]:
        self._check_campaign(closed.campaign)
        table = self.store.read_batches(closed.campaign, closed.class_id)
        got = 0 if table is None else len(table)
        if table is None or got != closed.expected_masks:
            raise InvalidEvent(
                f"class {closed.class_id} of {closed.campaign}: {got} masks received, "
                f"{closed.expected_masks} announced"
            )
        tree = build_tree(table.features, table.scores)
        path, sha = self.store.put_tree(
            closed.campaign, closed.class_id, closed.class_name, tree, table
        )
        log.info(
            "tree built",
            extra={"campaign": closed.campaign, "class_id": closed.class_id, "masks": got},
        )
        built = clusterer_pb2.TreeBuilt(
            event_id=f"tree.{closed.campaign}.{closed.class_id}",
            campaign=closed.campaign,
            class_id=closed.class_id,
            class_name=closed.class_name,
            n_masks=got,
            tree_uri=str(path),
            checksum=sha,
        )
        return [Emit(topics.TREES, topics.class_key(closed.campaign, closed.class_id), built)]


def build_clusterer(settings: ClustererSettings, bus: Bus, redis: object) -> EventLoop:
    clusterer = Clusterer(TreeStore(settings.trees))
    return EventLoop(
        service="clusterer",
        bus=bus,
        group="maskprop-clusterer",
        handlers={topics.MASKS: clusterer.handle},
        dedup=DedupStore(redis, "clusterer", ttl_s=settings.dedup_ttl_s),
        max_records=settings.kafka_max_poll_records,
    )


@entrypoint
def main() -> None:
    settings = ClustererSettings()
    run = start_service(settings, "clusterer")
    server, health = start_health_only(settings.grpc_host, settings.grpc_port, "clusterer")
    log.info("clusterer started", extra={"tree_dir": str(settings.trees)})
    build_clusterer(settings, run.bus, run.redis).run(run.stop)
    health.enter_graceful_shutdown()
    server.stop(5).wait()
