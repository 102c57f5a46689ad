"""Labels on the wire and in the sink at scale (issue #15, items 3 and 4).

``labels``: Kafka bytes per label, before and after, on a simulated campaign.  ADE-like
classes (``maskprop.simulate.generator.ade_like_class``) are clustered, annotated to the end
by a noise-free crowd (the library's ``AnnotationSession``, search's default thresholds), and
their terminal decisions are turned into ``LabelsPropagated`` events twice: by the label-event
builder of commit 01eef6d (2,000 labels an event, an RLE on every label) loaded from git, and
by today's (cut by bytes under the topic's limit, RLEs on accepted masks only).  Masks are the
simulated detector's ellipses (``maskprop.simulate.scenes.ellipses``, 64 x 64), scaled up by
``--scale`` so that RLEs have a photo's length (8: 512 x 512).

``expand``: the label relay's CPU a label (``wire.expand_decisions``: a decisions record of
the outbox -> serialized ``LabelsPropagated`` events), today's against the builder of commit
``--before`` (default 4ef67e3: an ``ImageInfo`` built for every image of every event), loaded
from git and run in the same process on the same records and masks, alternately, ``--repeats``
times each: mean microseconds a label over all repeats, p50/p99 of the repeats, and whether
both made the same bytes.  One ADE-like class of ``--masks`` masks, annotated to the end by a
noise-free crowd; its terminal decisions packed ``--per-record`` to a record (search's saves
pack a call's decisions of a class).  Today's side is timed twice: a record a call
(``expand_decisions``) and the relay's way, ``--batch`` records a call (``wire.expand_many``,
what one drain of an outbox hands the relay; the before side has no such call).

``restart``: the sink's start-up at ``--labels`` labels.  Shards of that many labels (30 %
accepted with a 512 x 512 ellipse's RLE, the rest rejected without one, over ``--classes``
classes) are written in the sink's format, with the ledger checkpoint a sink would have left,
then a tail of ``--tail`` labels goes through :meth:`DatasetWriter.write` and the writer is
killed (no closing checkpoint).  Measured, each in a fresh interpreter: the new start-up
(checkpoint + tail) and the old one (every shard line parsed into a ``(class_id, mask_id)``
set: the loop of the writer before issue #15), time and peak RSS.

Run (restart at 10M labels writes ~2.5 GB under --dir and takes a few minutes; share the
machine)::

    flock /tmp/mp7/heavy.lock .venv/bin/python benchmarks/bench_sink.py labels
    .venv/bin/python benchmarks/bench_sink.py expand --masks 60000
    flock /tmp/mp7/heavy.lock .venv/bin/python benchmarks/bench_sink.py restart --labels 10000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "01eef6d"  # the last commit with label events cut by count


# --------------------------------------------------------------------------- labels
def module_at(rev: str, path: str, name: str) -> types.ModuleType:
    """The Python file ``path`` as it was at commit ``rev``, loaded from git as module
    ``name`` (a baseline run in the same process as today's code)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    mod = types.ModuleType(name)
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(src, f"{name}.py", "exec"), mod.__dict__)
    return mod


def _old_wire(rev: str = BEFORE) -> types.ModuleType:
    """``maskprop_search.wire`` as it was at ``rev``."""
    return module_at(rev, "services/search/maskprop_search/wire.py", f"wire_{rev}")


def _class_masks(wire: types.ModuleType, pool_index: np.ndarray, name: str, scale: int) -> object:
    from maskprop.simulate.scenes import ellipses, image_id, mask_id
    from maskprop_runtime import codec

    rles = []
    for lo in range(0, pool_index.size, 2000):
        masks = ellipses(pool_index[lo : lo + 2000])
        if scale > 1:
            masks = masks.repeat(scale, axis=0).repeat(scale, axis=1)
        rles += codec.encode_masks(masks)
    counts = [r.counts for r in rles]
    image_ids = [image_id(int(i)) for i in pool_index]
    size = 64 * scale
    table = SimpleNamespace(
        mask_ids=np.array([mask_id(int(i)) for i in pool_index]),
        image_ids=np.array(image_ids),
        rle_h=np.full(pool_index.size, size, np.uint32),
        rle_w=np.full(pool_index.size, size, np.uint32),
        scores=np.zeros(pool_index.size, np.float32),
        rle_blob=b"".join(counts),
        rle_offsets=np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64),
    )
    if hasattr(wire.ClassMasks, "of"):  # as search loads a class file
        images = list(dict.fromkeys(image_ids))
        table.img_ids = np.array(images)
        table.img_w = np.full(len(images), size, np.int32)
        table.img_h = np.full(len(images), size, np.int32)
        table.img_files = np.array([f"images/{im}.png" for im in images])
        return wire.ClassMasks.of(table, name)
    images = {im: (size, size, f"images/{im}.png") for im in dict.fromkeys(image_ids)}
    return wire.ClassMasks(table, name, images)


def _annotated(c: int, n: int, seed: int) -> tuple[Any, list[Any]]:
    """An ADE-like class ``c`` of ``n`` masks annotated to the end by a noise-free crowd with
    search's default thresholds: (its session, its terminal decisions in order)."""
    from maskprop.params import AnnotationParams
    from maskprop.selection import Selection
    from maskprop.session import AnnotationSession, Answer
    from maskprop.simulate.generator import ade_like_class
    from maskprop.tree import build_tree

    params = AnnotationParams()
    features, scores, ious, _ = ade_like_class(c, n, seed=seed)
    session = AnnotationSession(
        {c: build_tree(features, scores)}, params, Selection(0.0, 0.7), seed=seed
    )
    decisions = []
    while not session.done:
        qs = session.lease(500)
        session.submit(
            Answer(q.class_id, q.node, q.mask, bool(ious[q.mask] >= params.iou_threshold))
            for q in qs
        )
        decisions += [d for d in session.pop_decisions() if d.terminal]
    return session, decisions


def bench_labels(args: argparse.Namespace) -> None:
    from maskprop_search import wire

    old = _old_wire()
    sizes = [int(s) for s in args.class_sizes]
    total = {"labels": 0, "accepted": 0, "before": 0, "after": 0, "ev_before": 0, "ev_after": 0}
    max_event = {"before": 0, "after": 0}
    start = 0
    t0 = time.perf_counter()
    for c, n in enumerate(sizes):
        session, decisions = _annotated(c, n, args.seed)
        index = np.arange(start, start + n)
        start += n
        for label, w in (("before", old), ("after", wire)):
            masks = _class_masks(w, index, f"class{c}", args.scale)
            entries = w.label_entries("bench", c, masks, session, decisions)
            total[label] += sum(len(k) + len(v) for k, v in entries)
            total[f"ev_{label}"] += len(entries)
            max_event[label] = max(max_event[label], max(len(v) for _k, v in entries))
        labels = session.labels(c)
        total["labels"] += n
        total["accepted"] += int((labels == 1).sum())
    n = total["labels"]
    print(
        f"simulated campaign: {len(sizes)} classes, {n} masks, {total['accepted']} accepted "
        f"({total['accepted'] / n:.1%}), masks {64 * args.scale}x{64 * args.scale}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    for label in ("before", "after"):
        print(
            f"  {label:6s}: {total[label] / n:8.1f} Kafka bytes a label (key + value), "
            f"{total[f'ev_{label}']} events, largest {max_event[label] / 1024:.0f} KiB"
        )
    print(f"  after/before: {total['after'] / total['before']:.3f}")


def bench_expand(args: argparse.Namespace) -> None:
    from maskprop_search import wire

    old = _old_wire(args.before)
    n = args.masks
    session, decisions = _annotated(0, n, args.seed)
    records = [
        r
        for lo in range(0, len(decisions), args.per_record)
        if (r := wire.pack_decisions("bench", 0, session, decisions[lo : lo + args.per_record])[0])
    ]
    index = np.arange(n)
    times: dict[str, list[float]] = {"before": [], "today": [], "batched": []}
    made: dict[str, list[tuple[bytes, bytes]]] = {}
    for _ in range(args.repeats):
        for name, w in (("before", old), ("today", wire), ("batched", wire)):
            masks = _class_masks(w, index, "class0", 1)  # a fresh table: no warm caches
            t0 = time.perf_counter()
            if name == "batched":
                made[name] = [
                    e
                    for lo in range(0, len(records), args.batch)
                    for events in wire.expand_many(
                        records[lo : lo + args.batch], lambda c, k, m=masks: m
                    )
                    for e in events
                ]
            else:
                made[name] = [
                    e for r in records for e in w.expand_decisions(r, lambda c, k, m=masks: m)
                ]
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    same = made["before"] == made["today"] == made["batched"]
    print(
        f"one class, {n} masks, {len(decisions)} terminal decisions in {len(records)} records, "
        f"{len(made['today'])} events, {sum(len(v) for _k, v in made['today']) / n:.1f} B a label"
    )
    for name in ("before", "today", "batched"):
        t = np.array(times[name])
        print(
            f"  {name:7s} ({args.before if name == 'before' else 'HEAD'}): "
            f"{t.mean():.2f} us a label (p50 {np.percentile(t, 50):.2f}, "
            f"p99 {np.percentile(t, 99):.2f} over {len(t)} repeats)"
        )
    before = np.mean(times["before"])
    print(
        f"  today/before: {np.mean(times['today']) / before:.3f}, batched/before: "
        f"{np.mean(times['batched']) / before:.3f}; the same bytes: {same}"
    )


# --------------------------------------------------------------------------- restart
def _line(campaign: str, c: int, i: int, masks: int, accepted: bool, seg: dict | None) -> bytes:
    return (
        json.dumps(
            {
                "campaign": campaign,
                "class_id": c,
                "class_name": f"class{c}",
                "mask_id": f"m{c}-{i}",
                "mask_index": i,
                "class_masks": masks,
                "image_id": f"img{(c * 7919 + i) % 1_000_000}",
                "accepted": accepted,
                "source": "propagated",
                "node": i,
                "outcome": "accept" if accepted else "reject",
                "yes": 3,
                "answered": 4,
                "score": 0.5,
                "segmentation": seg,
                "event_id": f"labels.{campaign}.{c}.{i}.0",
            },
            separators=(",", ":"),
        )
        + "\n"
    ).encode()


def _seed_dataset(root: Path, n_labels: int, n_classes: int, tail: int) -> None:
    """Shards of ``n_labels - tail`` labels with the checkpoint the sink leaves, then ``tail``
    labels through the real writer, which is then killed (no closing checkpoint)."""
    from maskprop_sink import dataset
    from maskprop_sink.dataset import DatasetWriter

    from maskprop.simulate.scenes import ellipses
    from maskprop_runtime import codec
    from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
    from maskprop_runtime.pb.maskprop.search.v1 import search_pb2

    campaign = "bench"
    masks = (n_labels + n_classes - 1) // n_classes
    rle = codec.encode_masks(ellipses(np.array([3])).repeat(8, axis=0).repeat(8, axis=1))[0]
    seg = codec.rle_to_coco(rle)
    state = dataset._CampaignState(root / campaign)
    (state.dir / "labels" / "accepted").mkdir(parents=True)
    (state.dir / "labels" / "rejected").mkdir(parents=True)
    rng = np.random.default_rng(0)
    body = n_labels - tail
    per_class = [body // n_classes + (c < body % n_classes) for c in range(n_classes)]
    files: dict[str, object] = {}
    counts = {"accepted": [0, 0, 0], "rejected": [0, 0, 0]}  # seq, lines, bytes

    def out(kind: str, line: bytes) -> None:
        seq, lines, size = counts[kind]
        if lines == dataset.SHARD_LINES:
            files[kind].close()  # type: ignore[attr-defined]
            seq, lines, size = seq + 1, 0, 0
            files.pop(kind)
        if kind not in files:
            files[kind] = open(state.dir / "labels" / kind / dataset.shard_name(0, seq), "wb")
        files[kind].write(line)  # type: ignore[attr-defined]
        counts[kind] = [seq, lines + 1, size + len(line)]

    for c in range(n_classes):
        led = dataset._ClassLedger.empty(masks)
        accepted = rng.random(per_class[c]) < 0.3
        for i in range(per_class[c]):
            a = bool(accepted[i])
            out(
                "accepted" if a else "rejected", _line(campaign, c, i, masks, a, seg if a else None)
            )
        led.bits[: per_class[c] // 8] = 0xFF
        for i in range(per_class[c] // 8 * 8, per_class[c]):
            led.add(i)
        state.ledger[c] = led
        state.categories[c] = f"class{c}"
    for f in files.values():
        f.close()  # type: ignore[attr-defined]
    state.shards = {(k, 0): tuple(v) for k, v in counts.items()}  # type: ignore[misc]
    dataset._write_checkpoint(state)
    (state.dir / "categories.json").write_text(
        json.dumps({str(c): f"class{c}" for c in range(n_classes)})
    )

    w = DatasetWriter(root, checkpoint_labels=tail + 1)  # the tail stays past the checkpoint
    written = 0
    c = 0
    while written < tail:
        ev = search_pb2.LabelsPropagated(
            event_id=f"tail.{written}", campaign=campaign, class_id=c,
            class_name=f"class{c}", class_masks=masks,
        )  # fmt: skip
        for i in range(per_class[c], min(per_class[c] + 2000, masks)):
            if written == tail:
                break
            a = bool(rng.random() < 0.3)
            lab = ev.labels.add(
                mask_id=f"m{c}-{i}", image_id="imgtail", accepted=a,
                source=search_pb2.LABEL_SOURCE_PROPAGATED, score=0.5, node=i,
                outcome="accept" if a else "reject", yes=3, answered=4, mask_index=i,
            )  # fmt: skip
            if a:
                lab.rle.CopyFrom(rle)
            written += 1
        per_class[c] += len(ev.labels)
        ev.images.append(common_pb2.ImageInfo(image_id="imgtail", width=512, height=512))
        w.write(ev, 0)
        c = (c + 1) % n_classes
    assert w._lock is not None
    w._lock.close()  # killed: the tail is past the checkpoint


def _start(root: str, how: str) -> None:
    """In a fresh interpreter: one start-up, then its time and peak RSS as JSON."""
    from maskprop_sink.dataset import DatasetWriter, read_records, shard_paths

    t0 = time.perf_counter()  # imports excluded: both start-ups pay them alike
    if how == "new":
        w = DatasetWriter(Path(root))
        seconds = time.perf_counter() - t0
        labels = sum(led.count() for s in w._campaigns.values() for led in s.ledger.values())
        tail = sum(s.since_checkpoint for s in w._campaigns.values())
        w._lock.close()  # type: ignore[union-attr]  # no closing checkpoint: rerunnable
    else:  # the writer's start-up before issue #15
        keys: set[tuple[int, str]] = set()
        for d in sorted(Path(root).iterdir()):
            for _kind, _p, _s, path in shard_paths(d):
                for rec in read_records(path, repair=True):
                    keys.add((int(rec["class_id"]), str(rec["mask_id"])))
        seconds = time.perf_counter() - t0
        labels, tail = len(keys), len(keys)
    hwm = next(
        int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")
    )
    print(
        json.dumps({"seconds": seconds, "labels": labels, "read": tail, "peak_rss_mib": hwm / 1024})
    )


def _run_start(root: Path, how: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "_start", str(root), how],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_restart(args: argparse.Namespace) -> None:
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-sink-"))
    root = base / "dataset"
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    _seed_dataset(root, args.labels, args.classes, args.tail)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    ckpt = (root / "bench" / "ledger.ckpt").stat().st_size
    print(
        f"dataset: {args.labels} labels over {args.classes} classes, {size / 2**30:.2f} GiB, "
        f"checkpoint {ckpt / 2**20:.2f} MiB, tail {args.tail} labels "
        f"(written in {time.perf_counter() - t0:.0f} s)"
    )
    new = [_run_start(root, "new") for _ in range(args.repeat)]
    old = _run_start(root, "old")
    best = min(new, key=lambda r: r["seconds"])
    assert best["labels"] == old["labels"] == args.labels, (best, old)
    assert best["read"] == args.tail, best  # the tail really was past the checkpoint
    print(
        f"  new start-up (checkpoint + {best['read']} tail lines): {best['seconds']:.3f} s, "
        f"peak RSS {best['peak_rss_mib']:.0f} MiB (best of {args.repeat})"
    )
    print(
        f"  old start-up (scan every shard):  {old['seconds']:.3f} s, "
        f"peak RSS {old['peak_rss_mib']:.0f} MiB"
    )
    print(f"  old/new: {old['seconds'] / best['seconds']:.0f}x time")
    if not args.keep:
        shutil.rmtree(base if not args.dir else root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lab = sub.add_parser("labels", help="Kafka bytes a label, before/after")
    lab.add_argument("--class-sizes", nargs="+", default=[20000, 8000, 3000, 1000, 300, 100])
    lab.add_argument("--scale", type=int, default=8)
    lab.add_argument("--seed", type=int, default=0)
    ex = sub.add_parser("expand", help="the label relay's CPU a label, before/after")
    ex.add_argument("--masks", type=int, default=60000)
    ex.add_argument("--per-record", type=int, default=50)
    ex.add_argument("--batch", type=int, default=200, help="records a relay call (its drain)")
    ex.add_argument("--repeats", type=int, default=7)
    ex.add_argument("--before", default="4ef67e3")
    ex.add_argument("--seed", type=int, default=0)
    rs = sub.add_parser("restart", help="sink start-up time, checkpoint + tail vs full scan")
    rs.add_argument("--labels", type=int, default=10_000_000)
    rs.add_argument("--classes", type=int, default=100)
    rs.add_argument("--tail", type=int, default=100_000, help="labels past the checkpoint")
    rs.add_argument("--repeat", type=int, default=3)
    rs.add_argument("--dir", default=None)
    rs.add_argument("--keep", action="store_true")
    st = sub.add_parser("_start")
    st.add_argument("root")
    st.add_argument("how", choices=["new", "old"])
    args = ap.parse_args()
    if args.cmd == "labels":
        bench_labels(args)
    elif args.cmd == "expand":
        bench_expand(args)
    elif args.cmd == "restart":
        bench_restart(args)
    else:
        _start(args.root, args.how)


if __name__ == "__main__":
    main()
