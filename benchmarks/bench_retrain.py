"""Why do propagated labels (not) make the detector better?  (Issue #17 item 4; paper Sec. 5.1,
Fig. 7.)

Starts from a finished ``maskprop demo`` run: its synthetic data, round ``r``'s weights and
the masks rounds ``1..r`` accepted (``r<k>/accepted.json``, de-duplicated across rounds as
retraining does).  Every variant fine-tunes round ``r``'s weights with the demo's own schedule
(``--steps``, lr 5e-4, the same batch mixing: about half of every batch from the labelled set)
and is scored by mask AP on the held-out split.  The variants take one cause away at a time:

* ``start``: round r's weights, no more training;
* ``control``: the labelled set alone (the named baseline: what the same extra steps give);
* ``demo``: + the accepted masks as boxes and classes (the demo's and ``campaign retrain``'s
  recipe);
* ``ignore``: the same, and round r's other detections on those images as ignore regions
  (neither positives nor negatives; the pool is re-detected with round r's weights to find them);
* ``partial``: boxes and classes as ``demo``, the pool images marked partially labelled: no
  anchor or proposal there is taught as background (``propagated_set(partial=True)``);
* ``masks``: the accepted masks also teach the mask head;
* ``clean``: each accepted mask replaced by the ground-truth mask it matches (IoU >= 0.5,
  same class, each object once; the unmatched are dropped): no label noise;
* ``complete``: the same images with all their ground-truth objects: no missing objects;
* ``gt-pool``: every pool image with all its ground truth: as much data as the pool holds.

If ``gt-pool`` does not beat ``control``, the model is not short of data at this schedule and no
label from the pool can help it; the gaps demo -> masks -> clean -> complete -> gt-pool price
box-only training, label noise and missing objects.  Each variant runs with every ``--seeds``
(shuffling and flips): the spread of one variant's APs is the noise its differences are read
against.

    python benchmarks/bench_retrain.py --demo out/demo [--round 1] [--steps 200]
        [--seeds 1,2] [--variants control,demo,...] [--out out/retrain.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from maskprop_detector.data import (
    IGNORE,
    InstanceDataset,
    LabelledSet,
    mixed_training_set,
    propagated_set,
    read_image,
)
from maskprop_detector.infer import detect
from maskprop_detector.train import TrainConfig, load_model, train
from pycocotools import mask as mask_utils

from maskprop.data.coco import to_pycoco
from maskprop.data.instances import deduplicate
from maskprop_app.campaign_priors import detect_heldout, load_heldout
from maskprop_app.campaign_retrain import load_accepted

VARIANTS = (
    "start",
    "control",
    "demo",
    "ignore",
    "partial",
    "masks",
    "clean",
    "complete",
    "gt-pool",
)


def _by_key(anns: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    out: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for a in anns:
        out[(int(a["image_id"]), int(a["category_id"]))].append(a)
    return out


def _clean(
    accepted: list[dict[str, Any]], gt: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float]:
    """Accepted masks swapped for the ground truth they match (IoU >= 0.5, same class, each
    ground-truth object once), the unmatched dropped; and the labels' precision at IoU 0.5."""
    gt_of = _by_key(gt)
    clean: list[dict[str, Any]] = []
    used: set[int] = set()
    for key, anns in _by_key(accepted).items():
        targets = gt_of.get(key, [])
        if not targets:
            continue
        ious = mask_utils.iou(
            [to_pycoco(a["segmentation"]) for a in anns],
            [to_pycoco(g["segmentation"]) for g in targets],
            [0] * len(targets),
        )
        for i, a in enumerate(anns):
            j = int(ious[i].argmax())
            if ious[i, j] >= 0.5 and id(targets[j]) not in used:
                used.add(id(targets[j]))
                clean.append(dict(a, segmentation=targets[j]["segmentation"]))
    return clean, len(clean) / max(len(accepted), 1)


def _ignore_regions(
    model: Any, dcfg: Any, pool_set: Any, accepted: list[dict[str, Any]], category_ids: list[int]
) -> list[dict[str, Any]]:
    """Round r's detections on the pool that were not accepted, as ignore boxes."""

    def images() -> Any:
        for im in pool_set.images:
            yield int(im["id"]), read_image(pool_set.image_root, im["file_name"])

    dets = detect(model, dcfg, images(), total=len(pool_set.images))
    taken = {
        (int(a["image_id"]), int(a["category_id"]), str(a["segmentation"]["counts"]))
        for a in accepted
    }
    out = []
    for i, b in enumerate(dets.boxes.tolist()):
        image, category = int(dets.image_ids[i]), category_ids[int(dets.class_ids[i])]
        if (image, category, str(dets.rle(i)["counts"])) in taken:
            continue
        out.append({"image_id": image, "category_id": category, IGNORE: True,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})  # fmt: skip
    return out


def minus_baseline(results: dict[str, Any], baseline: str, key: str, what: str) -> str:
    """The line that reads every other arm's ``key`` against the named baseline's."""
    base = results[baseline][key]
    return f"# {what} minus {baseline}'s: " + ", ".join(
        f"{k} {v[key] - base:+.4f}" for k, v in results.items() if k != baseline
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished `maskprop demo` --out")
    ap.add_argument("--round", type=int, default=1, help="retrain from this round's weights")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r} (one of {', '.join(VARIANTS)})")
        return 2
    demo = args.demo
    weights = demo / "models" / f"round{args.round}.pt"
    files = [demo / f"r{k}" / "accepted.json" for k in range(1, args.round + 1)]
    for p in (weights, *files):
        if not p.is_file():
            print(f"error: {p} is missing: run `maskprop demo --out {demo}` to the end first")
            return 2
    data = demo / "data"
    train_set = LabelledSet.from_coco(data / "annotations/train.json", data / "images/train")
    pool_set = LabelledSet.from_coco(data / "annotations/pool.json", data / "images/pool")
    model, dcfg = load_model(weights)
    classes = tuple(dcfg.classes)
    category_of = {str(c["name"]): int(c["id"]) for c in pool_set.categories}
    category_ids = [category_of[n] for n in classes]
    # What retraining reads (campaign_retrain): the accepted files, de-duplicated across rounds,
    # images renumbered by file name; back to the pool's image ids here.
    images, anns = load_accepted(files, pool_set.image_root, category_of)
    pool_id = {str(im["file_name"]): int(im["id"]) for im in pool_set.images}
    name_of = {int(im["id"]): str(im["file_name"]) for im in images}
    accepted = [
        dict(anns[i], image_id=pool_id[name_of[int(anns[i]["image_id"])]])
        for i in deduplicate(anns)
    ]
    pool_gt = [a for a in pool_set.annotations if not a.get("iscrowd", 0)]
    clean, precision = _clean(accepted, pool_gt)
    used = {int(a["image_id"]) for a in accepted}
    ignore = (
        _ignore_regions(model, dcfg, pool_set, accepted, category_ids)
        if "ignore" in variants
        else []
    )

    def extra(anns: list[dict[str, Any]], ign: list[dict[str, Any]], masks: bool) -> LabelledSet:
        return propagated_set(
            pool_set.images, pool_set.image_root, pool_set.categories, anns, ign, masks=masks
        )

    in_used = [a for a in pool_gt if int(a["image_id"]) in used]
    sets: dict[str, Any] = {
        "control": (InstanceDataset(train_set, classes, flip=True), 0, 0),
        "demo": (extra(accepted, [], False), len(accepted), len(used)),
        "ignore": (extra(accepted, ignore, False), len(accepted), len(used)),
        "partial": (
            propagated_set(
                pool_set.images,
                pool_set.image_root,
                pool_set.categories,
                accepted,
                partial=True,
            ),
            len(accepted),
            len(used),
        ),
        "masks": (extra(accepted, [], True), len(accepted), len(used)),
        "clean": (extra(clean, [], True), len(clean), len(used)),
        "complete": (extra(in_used, [], True), len(in_used), len(used)),
        "gt-pool": (extra(pool_gt, [], True), len(pool_gt), len(pool_set.images)),
    }
    batch, lr = 8, 5e-4  # the demo's retraining (campaign retrain's defaults)

    held = load_heldout(classes, data / "annotations/val.json", data / "images/val")

    def val_ap(model: Any) -> float:
        return float(detect_heldout(held, model, dcfg)[1]["ap"])

    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"# {demo}: round {args.round} weights, {len(train_set.images)} labelled images; "
        f"{len(accepted)} accepted masks on {len(used)} pool images (precision at IoU 0.5: "
        f"{precision:.3f}), {len(ignore)} ignore regions; pool ground truth {len(pool_gt)} "
        f"objects on {len(pool_set.images)} images; {args.steps} steps, batch {batch}, lr {lr}"
    )
    print(f"{'variant':<10} {'masks':>7} {'images':>7}  mask AP per seed       mean    s")
    results: dict[str, Any] = {}
    for name in variants:
        t0 = time.perf_counter()
        if name == "start":
            model, _ = load_model(weights)
            aps = [val_ap(model)]
            n_masks = n_images = 0
        else:
            dataset, n_masks, n_images = sets[name]
            if name != "control":
                dataset = mixed_training_set(train_set, dataset, classes)
            aps = []
            for seed in seeds:
                model, _ = load_model(weights)
                torch.manual_seed(seed)
                train(model, dcfg, dataset, TrainConfig(steps=args.steps, batch_size=batch,
                                                        lr=lr, seed=seed))  # fmt: skip
                aps.append(val_ap(model))
        mean = statistics.fmean(aps)
        results[name] = {"masks": n_masks, "images": n_images, "ap": aps, "mean_ap": mean}
        print(
            f"{name:<10} {n_masks:>7} {n_images:>7}  "
            f"{' '.join(f'{a:.4f}' for a in aps):<21} {mean:.4f} {time.perf_counter() - t0:5.0f}",
            flush=True,
        )
    if "control" in results:
        print(minus_baseline(results, "control", "mean_ap", "mean AP"))
    if args.out:
        args.out.write_text(json.dumps({
            "demo": str(demo), "round": args.round, "steps": args.steps, "seeds": seeds,
            "label_precision": precision, "results": results,
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
