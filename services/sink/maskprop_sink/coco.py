"""Export a campaign's dataset as one COCO instances JSON, streamed.

A COCO document for millions of masks does not fit in memory when built as one object (a peer
project's 11 GB file with 16M masks ran out of it), so :func:`maskprop.data.coco.write_coco`
writes it piece by piece: the header, the categories and images (small), then one annotation
at a time straight from the shards.  Only the image id map (string -> int) is held in memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from maskprop.data.coco import instance, write_coco
from maskprop_sink.dataset import DatasetReader


def export_coco(
    dataset_root: Path, campaign: str, out: Path, *, accepted_only: bool = True
) -> dict[str, int]:
    """Write ``campaign``'s labels under ``dataset_root`` to ``out`` as COCO instances JSON.

    Parameters
    ----------
    dataset_root : the sink's dataset directory (``DatasetWriter``'s root).
    campaign : the campaign to export.
    out : the JSON file; written to a temp file beside it and renamed, so a reader never
        sees half a document.
    accepted_only : export accepted labels only (rejected masks are the method's negatives,
        not annotations).

    Returns
    -------
    dict with ``images``, ``annotations``, ``categories`` (counts written) and
    ``skipped_late`` (labels whose image or class appeared after the export read the image
    and category lists, i.e. written by the live sink during the export; 0 on a quiet dataset)
    and ``skipped_no_outline`` (rejected labels exported with ``accepted_only=False`` that have
    no RLE: search sends none for rejected masks).  ``accepted_only`` reads the accepted
    shards alone.

    Notes
    -----
    COCO ids are ints: images are numbered 1..N in ``images.jsonl`` order, with the maskprop
    id kept in ``maskprop_image_id`` (and in ``file_name`` when the image had none);
    ``category_id = class_id + 1`` (COCO reserves 0).  Every described image is listed,
    including images without accepted masks: propagated labels are not exhaustive, so such
    images are not verified negatives.  Each annotation carries its provenance under
    ``"maskprop"`` (mask_id, accepted, source, node, outcome).

    Examples
    --------
    >>> summary = export_coco(root, "demo", tmp_path / "demo.json")  # doctest: +SKIP
    >>> COCO(str(tmp_path / "demo.json")).getAnnIds()                 # doctest: +SKIP
    """
    reader = DatasetReader(dataset_root)
    if campaign not in reader.campaigns():
        raise FileNotFoundError(f"no dataset for campaign {campaign!r} under {dataset_root}")
    classes = reader.categories(campaign)
    image_ids: dict[str, int] = {}  # maskprop image id -> COCO id, filled as images stream
    skipped = no_outline = 0

    def images() -> Iterator[dict[str, Any]]:
        for im in reader.images(campaign):
            image_ids[im["image_id"]] = len(image_ids) + 1
            yield {
                "id": image_ids[im["image_id"]],
                "width": im["width"],
                "height": im["height"],
                "file_name": im["file_name"] or im["image_id"],
                "maskprop_image_id": im["image_id"],
            }

    def annotations() -> Iterator[dict[str, Any]]:
        # Runs after images() is exhausted (the writer streams images first).
        nonlocal skipped, no_outline
        n = 0
        for rec in reader.labels(campaign, accepted_only=accepted_only):
            image_id = image_ids.get(rec["image_id"])
            if image_id is None or rec["class_id"] not in classes:
                skipped += 1
                continue
            if rec["segmentation"] is None:  # a rejected mask search sent without its RLE
                no_outline += 1
                continue
            n += 1
            yield instance(
                n,
                image_id,
                rec["class_id"] + 1,
                rec["segmentation"],
                score=rec["score"],
                maskprop={
                    "mask_id": rec["mask_id"],
                    "accepted": rec["accepted"],
                    "source": rec["source"],
                    "node": rec["node"],
                    "outcome": rec["outcome"],
                },
            )

    now = dt.datetime.now(dt.UTC)
    written = write_coco(
        Path(out),
        info={
            "description": f"maskprop campaign {campaign}",
            "version": "1.0",
            "year": now.year,
            "date_created": now.isoformat(timespec="seconds"),
            "maskprop": {"campaign": campaign, "accepted_only": accepted_only},
        },
        categories=[
            {"id": cid + 1, "name": name or f"class_{cid}", "supercategory": ""}
            for cid, name in sorted(classes.items())
        ],
        images=images(),
        annotations=annotations(),
    )
    return {**written, "skipped_late": skipped, "skipped_no_outline": no_outline}
