"""A client of the sink's gRPC ``Dataset`` service, for the CLI (``maskprop campaign export``
with ``MASKPROP_SINK_ADDR``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc

from maskprop.errors import MaskpropError
from maskprop.files import atomic_file
from maskprop_runtime.pb.maskprop.sink.v1 import sink_pb2, sink_pb2_grpc


def export_over_grpc(
    target: str,
    name: str,
    out: Path,
    *,
    admin_token: str | None = None,
    keep_duplicates: bool = False,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Stream campaign ``name``'s export from the sink at ``target`` (``host:port``) into
    ``out``, atomically: ``out`` appears only once every byte arrived and the sha256 matches.
    Returns the summary as ``export_campaign`` does.  Every failure is a MaskpropError."""
    metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
    request = sink_pb2.ExportCampaignRequest(name=name, keep_duplicates=keep_duplicates)
    digest = hashlib.sha256()
    summary: Any = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with grpc.insecure_channel(target) as channel, atomic_file(out) as f:
            stub = sink_pb2_grpc.DatasetStub(channel)
            for chunk in stub.ExportCampaign(request, metadata=metadata, timeout=timeout_s):
                if chunk.data:
                    f.write(chunk.data)
                    digest.update(chunk.data)
                if chunk.HasField("summary"):
                    summary = chunk.summary
            if summary is None:
                raise MaskpropError(f"the sink at {target} ended the export without a summary")
            if summary.sha256 != digest.hexdigest():
                raise MaskpropError(
                    f"the export from the sink at {target} arrived damaged (sha256 differs)"
                )
    except grpc.RpcError as exc:
        raise MaskpropError(f"sink at {target}: {exc.code().name}: {exc.details()}") from None
    except OSError as exc:
        raise MaskpropError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {
        "campaign": summary.campaign,
        "rounds": dict(sorted(summary.round_annotations.items())),
        "images": summary.images,
        "annotations": summary.annotations,
        "categories": summary.categories,
        "duplicates_dropped": summary.duplicates_dropped,
        "skipped_late": summary.skipped_late,
    }
