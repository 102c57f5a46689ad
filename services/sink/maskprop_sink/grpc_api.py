"""The sink's gRPC ``maskprop.sink.v1.Dataset``: ``campaign export`` for callers that do not
mount the dataset volume (a laptop, a CI job, a pod on another node).

The export is :func:`maskprop_sink.campaign_export.export_campaign` into a private temporary
folder, then streamed in chunks of :data:`CHUNK_BYTES` with the file's sha256 in the last
message, and removed.  The export itself runs in a child process (``forkserver``): it holds one
round's document and the kept annotations in memory, so a campaign of millions of masks must
not grow the sink process that writes labels.  The child's address space is capped at
``memory_limit_mb`` (``MASKPROP_SINK_EXPORT_MEMORY_LIMIT_MB``): an export that needs more fails
alone with RESOURCE_EXHAUSTED and the sink goes on writing.  A caller that goes away (cancel,
deadline, the server stopping) kills the child within :data:`POLL_S`, so an abandoned export
does not hold the slot.  At most ``max_exports`` run at once; another caller gets
RESOURCE_EXHAUSTED and retries later.  The sink's event loop keeps writing meanwhile: labels it
writes during an export are counted in ``skipped_late``."""

from __future__ import annotations

import hashlib
import multiprocessing
import resource
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from maskprop.errors import MaskpropError
from maskprop_runtime.pb.maskprop.sink.v1 import sink_pb2, sink_pb2_grpc
from maskprop_runtime.server import require_bearer
from maskprop_runtime.treestore import check_name
from maskprop_sink.campaign_export import NoLabels, export_campaign

SERVICE_NAME = "maskprop.sink.v1.Dataset"
CHUNK_BYTES = 1024 * 1024
#: How often a running export checks that its caller is still there.
POLL_S = 0.2


def _export_child(
    dataset: str, name: str, out: str, deduplicate: bool, memory_limit_mb: int | None, conn: Any
) -> None:
    """The export, in the child process: sends ``(kind, value)`` back, kind ``ok`` (the
    summary), ``not_found``, ``failed`` or ``memory``."""
    if memory_limit_mb is not None:
        limit = memory_limit_mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        summary = export_campaign(Path(dataset), name, Path(out), deduplicate_rounds=deduplicate)
        result: tuple[str, Any] = ("ok", summary)
    except NoLabels as exc:
        result = ("not_found", str(exc))
    except MaskpropError as exc:
        result = ("failed", str(exc))
    except MemoryError:
        result = ("memory", None)
    conn.send(result)
    conn.close()


class DatasetServicer(sink_pb2_grpc.DatasetServicer):
    """``dataset_dir``: the sink's dataset; ``scratch``: where exports are written before they
    are streamed (None: the system's temporary folder); ``admin_token``: as the controller's."""

    def __init__(
        self,
        dataset_dir: Path,
        *,
        admin_token: str | None,
        scratch: Path | None = None,
        max_exports: int = 1,
        memory_limit_mb: int | None = None,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.admin_token = admin_token
        self.scratch = scratch
        self.memory_limit_mb = memory_limit_mb
        self._slots = threading.BoundedSemaphore(max_exports)

    def _export(self, request: Any, context: Any, out: Path) -> dict[str, Any] | None:
        """Run the export in a child process; the summary, or None when the caller left (the
        child killed).  Every failure aborts the call with its status."""
        ctx = multiprocessing.get_context("forkserver")
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=_export_child,
            args=(
                str(self.dataset_dir), request.name, str(out), not request.keep_duplicates,
                self.memory_limit_mb, send,
            ),
            daemon=True,
        )  # fmt: skip
        child.start()
        send.close()
        try:
            while not receive.poll(POLL_S):
                if not context.is_active():
                    return None  # the caller is gone: the finally below kills the child
                if not child.is_alive() and not receive.poll(0):
                    break
            try:
                kind, value = receive.recv()
            except EOFError:  # died without a word: killed (OOM) or crashed
                kind, value = "died", child.exitcode
        finally:
            if child.is_alive():
                child.kill()
            child.join()
            receive.close()
        if kind == "ok":
            return dict(value)
        if kind == "not_found":
            context.abort(grpc.StatusCode.NOT_FOUND, value)
        if kind == "failed":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, value)
        limit = f"{self.memory_limit_mb} MB" if self.memory_limit_mb else "the memory it has"
        detail = (
            f"the export needs more than {limit} (MASKPROP_SINK_EXPORT_MEMORY_LIMIT_MB); "
            "raise it with the pod's memory limit, or export with --dataset where the volume "
            "is mounted"
            if kind == "memory"
            else f"the export process ended without a result (exit code {value})"
        )
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, detail)
        return None  # not reached: abort raises

    def ExportCampaign(self, request: Any, context: Any) -> Iterator[sink_pb2.ExportChunk]:
        require_bearer(context, self.admin_token)
        try:
            check_name("campaign", request.name)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self._slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the sink is running an export: retry later"
            )
        try:
            with tempfile.TemporaryDirectory(dir=self.scratch, prefix="export-") as tmp:
                out = Path(tmp) / "export.json"
                summary = self._export(request, context, out)
                if summary is None:
                    return
                digest = hashlib.sha256()
                size = 0
                with out.open("rb") as f:
                    while chunk := f.read(CHUNK_BYTES):
                        digest.update(chunk)
                        size += len(chunk)
                        yield sink_pb2.ExportChunk(data=chunk)
                yield sink_pb2.ExportChunk(
                    summary=sink_pb2.ExportSummary(
                        campaign=summary["campaign"],
                        round_annotations=summary["rounds"],
                        images=summary["images"],
                        annotations=summary["annotations"],
                        categories=summary["categories"],
                        duplicates_dropped=summary["duplicates_dropped"],
                        skipped_late=summary["skipped_late"],
                        bytes=size,
                        sha256=digest.hexdigest(),
                    )
                )
        finally:
            self._slots.release()
