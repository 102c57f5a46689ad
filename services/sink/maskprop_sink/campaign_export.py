"""``maskprop campaign export``: a campaign's accepted masks of every round as one COCO file
with the round as provenance (issue #16 item 2's ``export``), run where the dataset is mounted
or by the sink for a caller of its gRPC ``Dataset`` service (:mod:`maskprop_sink.grpc_api`).

The sink keeps round 1 of campaign ``name`` under the dataset folder ``name`` and round r > 1
under ``name.r<r>`` (:func:`maskprop_runtime.campaigns.round_campaign`: a round's trees restart
their mask indexes, so a round travels as its own campaign name).  Each round is exported by the
sink's own streaming export (:func:`maskprop_sink.coco.export_coco`) into a temporary file, then
the rounds are merged: images by their maskprop image id (the same image detected again in a
later round is one image), categories by id, every annotation tagged ``maskprop_round`` (and
``maskprop.round``) and, unless ``deduplicate=False``, de-duplicated across rounds as the
retraining and ``campaign run``'s ``annotations.json`` do
(:func:`maskprop.data.instances.deduplicate`: within an image and class a mask with IoU > 0.5
against an earlier round's is dropped, earlier rounds win).

The merge holds one round's document at a time plus the kept annotations in memory; with a
single round the file is the sink's export with the round added.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import Any

from maskprop.data.coco import write_coco
from maskprop.data.instances import canonical_key, deduplicate
from maskprop.errors import MaskpropError
from maskprop_runtime.campaigns import campaign_round


class NoLabels(MaskpropError):
    """The dataset holds no label of the campaign (unknown, or nothing decided yet)."""


def dataset_rounds(dataset: Path, name: str) -> list[tuple[int, str]]:
    """``(round, dataset campaign)`` of every round of ``name`` the sink wrote, in order."""
    from maskprop_sink.dataset import DatasetReader

    found = []
    for internal in DatasetReader(dataset).campaigns():
        base, round_ = campaign_round(internal)
        if base == name:
            found.append((round_, internal))
    return sorted(found)


def export_campaign(
    dataset: Path, name: str, out: Path, *, deduplicate_rounds: bool = True
) -> dict[str, Any]:
    """Write campaign ``name``'s accepted masks of every round under ``dataset`` to ``out``.

    Returns ``campaign``, ``rounds`` ({round: annotations the sink's export gave}), ``images``,
    ``annotations`` (written), ``categories``, ``duplicates_dropped`` and ``skipped_late``
    (labels the live sink wrote during the export, see ``export_coco``).

    Raises :class:`MaskpropError` when the dataset has no labels of ``name`` or two rounds name
    a category differently.
    """
    from maskprop_sink.coco import export_coco

    dataset, out = Path(dataset), Path(out)
    rounds = dataset_rounds(dataset, name)
    if not rounds:
        raise NoLabels(
            f"no labels of campaign {name!r} under {dataset} (the sink's MASKPROP_DATASET_DIR)"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaskpropError(f"cannot write {out}: {exc.strerror or exc}") from None
    categories: dict[int, str] = {}
    images: dict[str, dict[str, Any]] = {}  # maskprop image id -> merged image
    anns: list[dict[str, Any]] = []
    per_round: dict[int, int] = {}
    late = 0
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        for round_, internal in rounds:
            part = Path(tmp) / f"r{round_}.json"
            try:
                summary = export_coco(dataset, internal, part, accepted_only=True)
            except OSError as exc:
                raise MaskpropError(f"cannot export round {round_} of {name!r}: {exc}") from None
            late += summary["skipped_late"]
            doc = json.loads(part.read_text())
            part.unlink()
            for c in doc["categories"]:
                cid, cname = int(c["id"]), str(c["name"])
                if categories.setdefault(cid, cname) != cname:
                    raise MaskpropError(
                        f"campaign {name!r}: category {cid} is {categories[cid]!r} in an earlier "
                        f"round and {cname!r} in round {round_}"
                    )
            image_of: dict[int, int] = {}
            for im in doc["images"]:
                merged = images.setdefault(im["maskprop_image_id"], dict(im, id=len(images) + 1))
                image_of[int(im["id"])] = merged["id"]
            for a in doc["annotations"]:
                a["image_id"] = image_of[int(a["image_id"])]
                a["maskprop_round"] = round_
                a["maskprop"]["round"] = round_
                anns.append(a)
            per_round[round_] = len(doc["annotations"])
    # The embedded run's merge keeps the same masks (canonical_key: the same order whatever
    # the shards' order, which decides which of two repeats de-duplication keeps).
    names = {int(im["id"]): str(im["file_name"]) for im in images.values()}
    anns.sort(key=lambda a: canonical_key(a, names[int(a["image_id"])]))
    kept = deduplicate(anns) if deduplicate_rounds and len(rounds) > 1 else range(len(anns))
    final = [dict(anns[i], id=n) for n, i in enumerate(kept, start=1)]
    now = dt.datetime.now(dt.UTC)
    written = write_coco(
        out,
        info={
            "description": f"maskprop campaign {name}",
            "version": "1.0",
            "year": now.year,
            "date_created": now.isoformat(timespec="seconds"),
            "maskprop": {
                "campaign": name,
                "rounds": [r for r, _ in rounds],
                "accepted_only": True,
                "deduplicated_across_rounds": deduplicate_rounds,
            },
        },
        categories=[
            {"id": cid, "name": cname, "supercategory": ""}
            for cid, cname in sorted(categories.items())
        ],
        images=images.values(),
        annotations=final,
    )
    return {
        "campaign": name,
        "rounds": per_round,
        "images": written["images"],
        "annotations": written["annotations"],
        "categories": written["categories"],
        "duplicates_dropped": len(anns) - len(final),
        "skipped_late": late,
    }
