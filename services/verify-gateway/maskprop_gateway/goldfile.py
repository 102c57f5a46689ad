"""Gold questions as JSONL, one object a line:
``{"gold_id", "campaign", "class_name", "image", "mask": {"size": [h, w], "counts"}, "answer"}``
where ``image`` is the image's path under the gateway's image store for that campaign."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from maskprop_gateway.qc_rules import GoldItem

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_gold(obj: Any, where: str) -> GoldItem:
    try:
        gold_id, campaign = str(obj["gold_id"]), str(obj["campaign"])
        h, w = (int(x) for x in obj["mask"]["size"])
        counts = str(obj["mask"]["counts"]).encode("ascii")
        answer = obj["answer"]
        image = str(obj["image"])
        class_name = str(obj["class_name"])
    except (KeyError, TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"{where}: missing or malformed field ({exc})") from None
    if not (_ID.match(gold_id) and _ID.match(campaign)):
        raise ValueError(f"{where}: gold_id and campaign must be 1-64 of A-Z a-z 0-9 _ . -")
    if not isinstance(answer, bool) or h <= 0 or w <= 0 or not counts:
        raise ValueError(f"{where}: answer must be true/false and the mask non-empty")
    if image.startswith("/") or ".." in Path(image).parts:
        raise ValueError(f"{where}: image must be a relative path inside the image store")
    return GoldItem(gold_id, campaign, class_name, image, h, w, counts, answer)


def read_gold(path: Path) -> list[GoldItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
                items.append(parse_gold(obj, f"{path}:{n}"))
    if not items:
        raise ValueError(f"{path}: no gold questions")
    return items


def write_gold(items: Iterable[GoldItem], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for g in items:
            f.write(
                json.dumps(
                    {
                        "gold_id": g.gold_id,
                        "campaign": g.campaign,
                        "class_name": g.class_name,
                        "image": g.image_id,
                        "mask": {"size": [g.rle_h, g.rle_w], "counts": g.rle_counts.decode()},
                        "answer": g.answer,
                    }
                )
                + "\n"
            )
