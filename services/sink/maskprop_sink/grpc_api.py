"""The sink's gRPC ``maskprop.sink.v1.Dataset``: ``campaign export`` for callers that do not
mount the dataset volume (a laptop, a CI job, a pod on another node).

The export is :func:`maskprop_sink.campaign_export.export_campaign` into a private temporary
folder, then streamed in chunks of :data:`CHUNK_BYTES` with the file's sha256 in the last
message, and removed.  At most ``max_exports`` run at once (an export holds one round's document
in memory); another caller gets RESOURCE_EXHAUSTED and retries later.  The sink's event loop
keeps writing meanwhile: labels it writes during an export are counted in ``skipped_late``."""

from __future__ import annotations

import hashlib
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
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.admin_token = admin_token
        self.scratch = scratch
        self._slots = threading.BoundedSemaphore(max_exports)

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
                try:
                    summary = export_campaign(
                        self.dataset_dir, request.name, out,
                        deduplicate_rounds=not request.keep_duplicates,
                    )  # fmt: skip
                except NoLabels as exc:
                    context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
                except MaskpropError as exc:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
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
