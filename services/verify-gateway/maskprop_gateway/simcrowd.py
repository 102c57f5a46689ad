"""A simulated crowd for the gateway: gold questions made from a labelled pool, and workers
that are honest, random clickers or too-fast bots.  Used by tests, the benchmark and demos.

Honest workers share per-mask "ambiguity" flips (a mask that fools one honest worker fools
them all), so any set of honest workers reaches the same labels, which is what lets a run
with bad workers be compared with an honest-only run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskprop.simulate.pool import MaskPool
from maskprop.simulate.scenes import IMAGE_SIZE, ellipses, render_images
from maskprop_gateway.qc_rules import GoldItem
from maskprop_runtime import codec


def simulated_gold(
    pool: MaskPool,
    campaign: str,
    n: int,
    *,
    iou_threshold: float = 0.75,
    image_root: Path | None = None,
    seed: int = 0,
) -> list[GoldItem]:
    """``n`` gold questions from a labelled pool, half correct masks and half wrong ones;
    their images are written to ``image_root/<campaign>/gold/<gold_id>.png`` when given."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    good = np.flatnonzero(pool.ious >= iou_threshold)
    bad = np.flatnonzero(pool.ious < iou_threshold)
    k = min(n // 2, good.size, bad.size)
    if n - k > bad.size:
        raise ValueError(
            f"{n} gold questions need about {n // 2} correct and {n - n // 2} wrong masks; "
            f"the labelled pool has {good.size} and {bad.size}"
        )
    picked = np.concatenate(
        [rng.choice(good, k, replace=False), rng.choice(bad, n - k, replace=False)]
    )
    rng.shuffle(picked)
    # Shapes from indices no pool mask has: keyed by RLE, a gold item must not look like pool
    # mask i (it took over that mask's truth and its ambiguity flip, so honest workers "missed"
    # gold and answered some pool masks with a gold answer).
    rles = codec.encode_masks(ellipses(picked + GOLD_SHAPES))
    images = render_images(pool, picked) if image_root is not None else {}
    out = []
    for j, (i, rle) in enumerate(zip(picked.tolist(), rles, strict=True)):
        gold_id = f"g{seed}-{j:06d}"
        file_name = f"gold/{gold_id}.png"
        if image_root is not None:
            path = image_root / campaign / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            img = (
                images[f"img{i // 4:08d}"]
                if f"img{i // 4:08d}" in images
                else np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            )
            Image.fromarray(img, "RGB").save(path)
        out.append(
            GoldItem(
                gold_id=gold_id,
                campaign=campaign,
                class_name=pool.class_names[int(pool.class_ids[i])],
                image_id=file_name,
                rle_h=rle.height,
                rle_w=rle.width,
                rle_counts=rle.counts,
                answer=bool(pool.ious[i] >= iou_threshold),
            )
        )
    return out


#: Offset of gold items' shape indices past any simulated pool's.
GOLD_SHAPES = 1 << 40


@dataclass
class Truth:
    """What the simulation knows about every mask a worker may be shown, keyed by RLE counts
    (the only identity a vendor-facing question carries)."""

    answers: dict[str, bool] = field(default_factory=dict)
    ambiguous: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        pool: MaskPool,
        gold: list[GoldItem],
        *,
        iou_threshold: float = 0.75,
        ambiguity: float = 0.0,
        seed: int = 0,
    ) -> Truth:
        rng = np.random.default_rng(seed)
        t = cls()
        rles = codec.encode_masks(ellipses(np.arange(len(pool))))
        flips = rng.random(len(pool)) < ambiguity
        for i, rle in enumerate(rles):
            key = rle.counts.decode()
            t.answers[key] = bool(pool.ious[i] >= iou_threshold)
            t.ambiguous[key] = bool(flips[i])
        for g in gold:
            t.answers[g.rle_counts.decode()] = g.answer
        return t


@dataclass
class SimWorker:
    """``kind``: "honest" (answers the truth, fooled by ambiguous masks, ~1.5 s a question),
    "random" (a coin flip at an honest pace) or "bot" (always "yes" in ~0.2 s).

    ``honest_for``: answer honestly for this many questions first (qualification included),
    then behave as ``kind``: a worker who passes the qualification and turns bad later, which
    only gold accuracy and answer times can catch."""

    worker_id: str
    kind: str
    seed: int = 0
    honest_for: int = 0
    rng: Any = None
    answered: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def answer(self, truth: Truth, counts: str) -> tuple[bool, int]:
        self.answered += 1
        if self.answered <= self.honest_for:
            return self._honest(truth, counts)
        if self.kind == "bot":
            return True, int(self.rng.integers(120, 260))
        elapsed = int(self.rng.lognormal(np.log(1500), 0.3))
        if self.kind == "random":
            return bool(self.rng.random() < 0.5), elapsed
        return self._honest(truth, counts, elapsed)

    def _honest(self, truth: Truth, counts: str, elapsed: int | None = None) -> tuple[bool, int]:
        if elapsed is None:
            elapsed = int(self.rng.lognormal(np.log(1500), 0.3))
        correct = truth.answers[counts]
        return (not correct) if truth.ambiguous.get(counts, False) else correct, elapsed
