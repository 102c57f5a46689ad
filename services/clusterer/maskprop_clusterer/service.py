"""The clusterer: buffers each class's detected masks, builds the class's complete-linkage
tree (``maskprop.tree.build_tree``) when the class batch closes, stores it and announces it.

Consumes ``maskprop.masks`` (MaskStreamEvent), produces ``maskprop.trees`` (TreeBuilt).
State: the tree store directory (batches and class files), written atomically.

A build runs in a worker process (:mod:`maskprop_clusterer.build`; a ``forkserver`` pool, one
build per worker process so its memory goes back to the system): the handler waits for it and
calls the consumer's keep-alive every ``keep_alive_s`` seconds (a poll with every partition
paused), so a build of minutes does not cost the consumer its group membership.  Effects stay
in the loop's order: the class file is stored, then the batches are removed, then TreeBuilt is
produced and only then the offsets are committed.  Any failure of a build (``MemoryError``, a
worker killed by the OOM killer, bad data) dead-letters that class's ``closed`` event with the
reason; the next class gets a fresh pool.  A redelivered ``closed`` after the tree was stored
re-announces the same tree (the batches may be gone by then), and a redelivered batch of a
class whose tree is stored is dropped.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from google.protobuf.message import Message
from pydantic import Field

from maskprop.data import coco
from maskprop.data.masks import MaskTable, pack_counts
from maskprop_clusterer.build import BuildJob, BuildResult, build_class
from maskprop_runtime import codec, topics
from maskprop_runtime.bus import Bus, Record
from maskprop_runtime.loop import DedupStore, Emit, EventLoop, InvalidEvent
from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.server import entrypoint, start_health_only, start_service
from maskprop_runtime.settings import RuntimeSettings
from maskprop_runtime.treestore import TreeStore, check_name
from maskprop_runtime.watchdog import watch

log = logging.getLogger(__name__)

MAX_MASK_ID = 128


class ClustererSettings(RuntimeSettings):
    tree_dir: Path | None = None  # default: <data_dir>/trees
    # Worker processes building trees.  The loop waits for each class's build in turn, so
    # more than 1 only helps when a build is lost with its worker; keep 1 unless measured.
    build_processes: int = Field(default=1, ge=1)
    # Address-space limit of a build worker in MiB (RLIMIT_AS): a class too large for the pod
    # fails with MemoryError (dead-lettered) instead of the pod being OOM-killed in a loop.
    # None: no limit (the two-level tree needs ~0.5 GiB at 1M masks, d = 32).
    build_memory_limit_mb: int | None = Field(default=None, ge=64)
    # Processes of the two-level tree's per-block linkage inside a build; None: every CPU.
    tree_workers: int | None = Field(default=None, ge=1)
    # Seconds between keep-alive polls while a build runs (well under max.poll.interval.ms).
    keep_alive_s: float = Field(default=5.0, gt=0, le=60)

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
    """The handler: a thin adapter from MaskStreamEvent to the tree store and the build
    worker (module docstring)."""

    def __init__(
        self,
        store: TreeStore,
        *,
        build_processes: int = 1,
        memory_limit_bytes: int | None = None,
        tree_workers: int | None = None,
        keep_alive_s: float = 5.0,
        build: Callable[[BuildJob], BuildResult] = build_class,
    ) -> None:
        self.store = store
        self.build_processes = build_processes
        self.memory_limit_bytes = memory_limit_bytes
        self.tree_workers = tree_workers
        self.keep_alive_s = keep_alive_s
        self.build = build
        #: Called every ``keep_alive_s`` while a build runs (the loop's consumer keep-alive).
        self.keep_alive: Callable[[], None] = lambda: None
        self._pool: ProcessPoolExecutor | None = None

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
            table = table_from_event(ev)
            if self.store.tree_path(ev.campaign, ev.class_id).is_file():
                # A batch redelivered after its class's tree was stored (its offsets were not
                # committed yet): the tree holds it already, and its file would never go.
                return []
            self.store.put_batch(ev.campaign, ev.class_id, msg.event_id, table)
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
        campaign, k = closed.campaign, int(closed.class_id)
        stored = self.store.stored_tree(campaign, k)
        if stored is None:
            log.info(
                "tree build started",
                extra={"campaign": campaign, "class_id": k, "masks": closed.expected_masks},
            )
            result = self._build(
                BuildJob(
                    root=str(self.store.root),
                    campaign=campaign,
                    class_id=k,
                    class_name=closed.class_name,
                    expected_masks=closed.expected_masks,
                    memory_limit_bytes=self.memory_limit_bytes,
                    tree_workers=self.tree_workers,
                )
            )
            log.info(
                "tree built", extra={"campaign": campaign, "class_id": k, "masks": result.n_masks}
            )
        else:
            path, sha, n = stored
            if n != closed.expected_masks:
                raise InvalidEvent(
                    f"class {k} of {campaign}: stored tree has {n} masks, "
                    f"{closed.expected_masks} announced"
                )
            result = BuildResult(str(path), sha, n)
        self.store.drop_batches(campaign, k)  # after the class file is stored, never before
        built = clusterer_pb2.TreeBuilt(
            event_id=f"tree.{campaign}.{k}",
            campaign=campaign,
            class_id=k,
            class_name=closed.class_name,
            n_masks=result.n_masks,
            tree_uri=result.tree_uri,
            checksum=result.checksum,
        )
        return [Emit(topics.TREES, topics.class_key(campaign, k), built)]

    def _build(self, job: BuildJob) -> BuildResult:
        """Run ``job`` in the worker pool, keeping the consumer alive meanwhile; any failure
        becomes :class:`InvalidEvent` naming the campaign, class, masks and cause."""
        what = (
            f"tree build of class {job.class_id} ({job.class_name!r}) of {job.campaign}, "
            f"{job.expected_masks} masks"
        )
        try:
            future = self._executor().submit(self.build, job)
            return self._wait(future)
        except InvalidEvent as exc:  # counts differ, a batch file of another format
            raise InvalidEvent(f"{what} failed: {exc}") from None
        except BrokenProcessPool as exc:
            # The worker died (OOM killer, a signal): this pool is unusable; the next class
            # gets a fresh one.
            self._drop_pool()
            raise InvalidEvent(f"{what} failed: worker process died ({exc})") from None
        except Exception as exc:
            raise InvalidEvent(f"{what} failed: {type(exc).__name__}: {exc}") from None

    def _wait(self, future: Future[BuildResult]) -> BuildResult:
        while True:
            try:
                return future.result(timeout=self.keep_alive_s)
            except TimeoutError:
                self.keep_alive()

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: workers fork from a clean server process (not from this one, which
            # holds Kafka and Redis clients and threads); one build per worker process.
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["maskprop_clusterer.build"])
            self._pool = ProcessPoolExecutor(
                max_workers=self.build_processes, mp_context=ctx, max_tasks_per_child=1
            )
        return self._pool

    def _drop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stop the worker pool (waits for a running build)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def wire_clusterer(
    settings: ClustererSettings, bus: Bus, redis: object
) -> tuple[Clusterer, EventLoop]:
    """The handler and its event loop, the handler's keep-alive wired to the loop's consumer."""
    limit = settings.build_memory_limit_mb
    clusterer = Clusterer(
        TreeStore(settings.trees),
        build_processes=settings.build_processes,
        memory_limit_bytes=None if limit is None else limit * 1024 * 1024,
        tree_workers=settings.tree_workers,
        keep_alive_s=settings.keep_alive_s,
    )
    loop = EventLoop(
        service="clusterer",
        bus=bus,
        group="maskprop-clusterer",
        handlers={topics.MASKS: clusterer.handle},
        dedup=DedupStore(redis, "clusterer", ttl_s=settings.dedup_ttl_s),
        max_records=settings.kafka_max_poll_records,
    )
    clusterer.keep_alive = loop.keep_alive
    return clusterer, loop


def build_clusterer(settings: ClustererSettings, bus: Bus, redis: object) -> EventLoop:
    """The clusterer's event loop (embedded mode and tests; the worker pool stops with the
    process)."""
    return wire_clusterer(settings, bus, redis)[1]


@entrypoint
def main() -> None:
    settings = ClustererSettings()
    run = start_service(settings, "clusterer")
    server, health = start_health_only(settings.grpc_host, settings.grpc_port, "clusterer")
    log.info("clusterer started", extra={"tree_dir": str(settings.trees)})
    clusterer, loop = wire_clusterer(settings, run.bus, run.redis)
    watch(health, ["clusterer"], [loop.heartbeat], settings.loop_stall_s, run.stop)
    try:
        loop.run(run.stop)
    finally:
        clusterer.close()
    health.enter_graceful_shutdown()
    server.stop(5).wait()
