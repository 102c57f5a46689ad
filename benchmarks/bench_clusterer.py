"""The clusterer's handler on one large class: wall time, peak memory and the class file's
bytes, against the previous release's path (tree.npz with features, built in the handler).

    flock /tmp/mp7/heavy.lock .venv/bin/python benchmarks/bench_clusterer.py 1000000

Steps, each in a fresh child process (run from the repository root):

1. ``gen``: one ADE-like class of ``n`` masks (d = 32 by default) as the simulated detector's
   ``MaskStreamEvent`` records (batches of 1000 masks, then ``closed``), written to a file of
   length-prefixed records, so no step holds the events in memory (a broker would).
2. ``clusterer``: the real handler and event loop (``wire_clusterer``, fakeredis) fed from
   that file by a file-backed bus: batches stored, ``closed`` -> tree built in the worker
   process -> class file -> TreeBuilt.  Wall time from the first poll to TreeBuilt, the main
   process's peak RSS (``ru_maxrss``: what the poll loop costs) and, sampled every 0.5 s by
   this parent, the peak summed PSS of the process and all its descendants (forkserver,
   build worker, block-linkage workers: the pod's memory).
3. ``oldfile``: the previous release's ``tree.npz`` for the same masks and tree (the mask
   table with features, ``np.savez``), for its bytes a mask (the issue measured 689 B).
4. ``load-new`` / ``load-old``: what search pays to open the class (``TreeStore.load_tree``,
   memory-mapped, vs ``np.load`` of the npz + ``MaskTable.from_arrays``), then the RLEs of
   1000 random masks: seconds and RSS growth.

Prints one table and ratios new / old.  The previous release could not build this class at
all above ~40k masks (exact linkage in the handler: MemoryError, retried forever), so build
time has no old figure; ``bench_tree.py scale`` has the tree alone.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tree import run_child

CHILD = r"""
import json, resource, struct, sys, time
from pathlib import Path
import numpy as np

step, work, n, dim = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
events = work / "events.bin"
CAMPAIGN = "bench"


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def records():
    from maskprop_runtime import topics
    from maskprop_runtime.bus import Record
    with open(events, "rb") as f:
        offset = 0
        while head := f.read(8):
            klen, vlen = struct.unpack("<II", head)
            yield Record(topics.MASKS, 0, offset, f.read(klen), f.read(vlen))
            offset += 1


if step == "gen":
    from maskprop.simulate.generator import ade_like_class
    from maskprop.simulate.pool import MaskPool
    from maskprop_detector.simulated import pool_events
    f, s, iou, _ = ade_like_class(0, n, seed=0, dim=dim)
    pool = MaskPool(f, s, iou, np.zeros(n, np.int32), ("thing",))
    with open(events, "wb") as out:
        for key, ev in pool_events(pool, CAMPAIGN, batch_size=1000):
            value = ev.SerializeToString()
            out.write(struct.pack("<II", len(key), len(value)) + key + value)
    print(json.dumps({"event_bytes": events.stat().st_size}))

elif step == "clusterer":
    import fakeredis
    from maskprop_clusterer.service import ClustererSettings, wire_clusterer
    from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2

    class FileBus:
        # Replays the events file as one partition; keeps what the loop produces.
        def __init__(self):
            self._it = records()
            self.out = []
        def producer(self): return self
        def consumer(self, topics, group): return self
        def send(self, topic, key, value): self.out.append((topic, value))
        def flush(self): pass
        def poll(self, timeout_s, max_records):
            return [r for _, r in zip(range(max_records), self._it)]
        def commit(self, records): pass
        def keep_alive(self): pass
        def close(self): pass

    bus = FileBus()
    settings = ClustererSettings(data_dir=work / "state")
    clusterer, loop = wire_clusterer(settings, bus, fakeredis.FakeRedis())
    base = rss_mib()
    t0 = time.perf_counter()
    while loop.step(0.0):
        pass
    secs = time.perf_counter() - t0
    clusterer.close()
    (topic, value), = bus.out
    built = clusterer_pb2.TreeBuilt.FromString(value)
    folder = Path(built.tree_uri).parent
    print(json.dumps({
        "seconds": secs, "main_peak_mib": rss_mib(), "main_base_mib": base,
        "n_masks": built.n_masks, "tree_uri": built.tree_uri, "topic": topic,
        "class_bytes": sum(p.stat().st_size for p in folder.iterdir()),
        "batches_left": len(list(folder.parent.glob("batches/*"))),
    }))

elif step == "oldfile":
    from maskprop.data.masks import MaskTable
    from maskprop.tree import Tree
    from maskprop_clusterer.service import table_from_event
    from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
    tables = []
    for r in records():
        ev = detector_pb2.MaskStreamEvent.FromString(r.value)
        if ev.WhichOneof("body") == "masks":
            tables.append(table_from_event(ev.masks))
    table = MaskTable.concat(tables).by_mask_id()
    linkage = np.load(work / "state/trees" / CAMPAIGN / "0/tree/linkage.npy")
    tree = Tree.from_arrays({"linkage": linkage, "scores": table.scores})
    # The previous release's TreeStore.put_tree, verbatim in effect.
    arrays = {**{f"tree_{k}": v for k, v in tree.to_arrays().items()}, **table.to_arrays(),
              "class_name": np.array("thing")}
    with open(work / "tree.npz", "wb") as out:
        np.savez(out, **arrays)
    print(json.dumps({"old_bytes": (work / "tree.npz").stat().st_size}))

elif step in ("load-new", "load-old"):
    from maskprop.data.masks import MaskTable
    from maskprop.tree import Tree
    from maskprop_runtime.treestore import TreeStore
    base = rss_mib()
    t0 = time.perf_counter()
    if step == "load-new":
        tree, table, _ = TreeStore.load_tree(work / f"state/trees/{CAMPAIGN}/0/tree/manifest.json")
    else:
        with np.load(work / "tree.npz", allow_pickle=False) as z:
            a = dict(z)
        table = MaskTable.from_arrays(a)
        tree = Tree.from_arrays({"linkage": a["tree_linkage"], "scores": a["tree_scores"]})
    secs = time.perf_counter() - t0
    rows = np.random.default_rng(0).integers(0, n, 1000)
    got = sum(len(table.counts(int(i))) for i in rows) + len(table.mask_ids[rows].tolist())
    print(json.dumps({"seconds": secs, "rss_growth_mib": rss_mib() - base, "check": got,
                      "leaves": tree.n_leaves}))
"""


def run(step: str, work: Path, n: int, dim: int) -> dict[str, float]:
    return run_child([CHILD, step, str(work), str(n), str(dim)])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    with tempfile.TemporaryDirectory(prefix="bench_clusterer.") as tmp:
        work = Path(tmp)
        gen = run("gen", work, n, dim)
        new = run("clusterer", work, n, dim)
        assert new["n_masks"] == n and new["batches_left"] == 0, new
        old = run("oldfile", work, n, dim)
        load_new = run("load-new", work, n, dim)
        load_old = run("load-old", work, n, dim)
        assert load_new["check"] == load_old["check"]
    print(f"one class of {n:,} masks, d = {dim}; events {gen['event_bytes'] / n:.0f} B a mask")
    print(
        f"clusterer (handler + worker): {new['seconds']:.1f} s wall, main process peak RSS "
        f"{new['main_peak_mib']:.0f} MiB (at start {new['main_base_mib']:.0f}), whole process "
        f"tree peak PSS {new['tree_pss_mib']:.0f} MiB"
    )
    nb, ob = new["class_bytes"] / n, old["old_bytes"] / n
    print(
        f"class file: {nb:.0f} B a mask vs tree.npz {ob:.0f} B a mask: {nb / ob:.2f}x "
        f"({new['class_bytes'] / 2**20:.0f} MiB vs {old['old_bytes'] / 2**20:.0f} MiB)"
    )
    ln, lo = load_new, load_old
    print(
        f"search opens the class: {ln['seconds']:.2f} s, +{ln['rss_growth_mib']:.0f} MiB RSS "
        f"(memory-mapped) vs {lo['seconds']:.2f} s, +{lo['rss_growth_mib']:.0f} MiB (npz): "
        f"{ln['seconds'] / lo['seconds']:.2f}x time, "
        f"{ln['rss_growth_mib'] / max(lo['rss_growth_mib'], 1):.2f}x memory"
    )
    print(
        json.dumps(
            {
                "n": n,
                "dim": dim,
                "new": new,
                "old": old,
                "load_new": load_new,
                "load_old": load_old,
                "os_cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
