"""The clusterer on the in-memory bus and fakeredis: trees are built in a worker process, a
failed build is dead-lettered while the other classes finish, batch files go once the tree
is stored, and a redelivered ``closed`` re-announces the stored tree."""

from __future__ import annotations

import os
import signal

import fakeredis
import numpy as np
from maskprop_clusterer.build import BuildJob, BuildResult, build_class
from maskprop_clusterer.service import ClustererSettings, wire_clusterer
from maskprop_detector.simulated import pool_events

from maskprop.simulate.generator import ade_like_class
from maskprop.simulate.pool import MaskPool
from maskprop.tree import AUTO_EXACT_MAX
from maskprop_runtime import topics
from maskprop_runtime.bus import InMemoryBus, Record, partition_for
from maskprop_runtime.loop import run_until_idle
from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.treestore import TreeStore

CAMPAIGN = "c"


def sized_pool(sizes: dict[int, int], n_classes: int, dim: int = 8) -> MaskPool:
    """A simulated pool whose class k holds ``sizes[k]`` ADE-like masks (others none)."""
    ks = sorted(sizes)
    parts = [ade_like_class(k, sizes[k], seed=1, dim=dim) for k in ks]
    return MaskPool(
        features=np.concatenate([p[0] for p in parts]),
        scores=np.concatenate([p[1] for p in parts]),
        ious=np.concatenate([p[2] for p in parts]),
        class_ids=np.repeat(np.array(ks, dtype=np.int32), [sizes[k] for k in ks]),
        class_names=tuple(f"class{k}" for k in range(n_classes)),
    )


class Wired:
    def __init__(self, tmp_path, **settings) -> None:
        self.bus = InMemoryBus()
        self.settings = ClustererSettings(data_dir=tmp_path / "state", **settings)
        self.clusterer, self.loop = wire_clusterer(self.settings, self.bus, fakeredis.FakeRedis())
        self.store = TreeStore(self.settings.trees)

    def publish(self, pool: MaskPool) -> list[tuple[bytes, detector_pb2.MaskStreamEvent]]:
        events = list(pool_events(pool, CAMPAIGN, batch_size=1000))
        self.send(events)
        return events

    def send(self, events: list[tuple[bytes, detector_pb2.MaskStreamEvent]]) -> None:
        producer = self.bus.producer()
        for key, ev in events:
            producer.send(topics.MASKS, key, ev.SerializeToString())
        producer.flush()

    def settle(self) -> None:
        run_until_idle([self.loop])
        self.clusterer.close()

    def trees(self) -> dict[int, clusterer_pb2.TreeBuilt]:
        out = {}
        for r in self.bus.read(topics.TREES):
            ev = clusterer_pb2.TreeBuilt.FromString(r.value)
            assert r.partition == partition_for(r.key) and ev.class_id not in out
            out[ev.class_id] = ev
        return out

    def dead_letters(self) -> list[common_pb2.DeadLetter]:
        return [common_pb2.DeadLetter.FromString(r.value) for r in self.bus.read(topics.DEADLETTER)]

    def batches(self, k: int) -> list[str]:
        folder = self.settings.trees / CAMPAIGN / str(k) / "batches"
        return sorted(p.name for p in folder.glob("*")) if folder.exists() else []


def _same_partition(*ks: int) -> None:
    assert len({partition_for(topics.class_key(CAMPAIGN, k)) for k in ks}) == 1


def test_a_class_whose_build_runs_out_of_memory_is_dead_lettered_and_the_next_one_builds(
    tmp_path,
):
    # Exact linkage of 20k masks needs a 1.6 GB distance matrix: over the worker's 1.5 GiB
    # address-space limit, so the build raises a real MemoryError in the worker.
    _same_partition(0, 1)
    w = Wired(tmp_path, build_memory_limit_mb=1536)
    w.publish(sized_pool({0: AUTO_EXACT_MAX, 1: 300}, 2))
    w.settle()
    (dl,) = w.dead_letters()
    assert dl.service == "clusterer" and dl.source_topic == topics.MASKS
    closed = detector_pb2.MaskStreamEvent.FromString(dl.payload)
    assert closed.WhichOneof("body") == "closed" and closed.closed.class_id == 0
    assert f"class 0 ('class0') of {CAMPAIGN}, {AUTO_EXACT_MAX} masks" in dl.reason
    assert "MemoryError" in dl.reason
    trees = w.trees()
    assert sorted(trees) == [1] and trees[1].n_masks == 300
    assert w.batches(0) and not w.batches(1)  # a failed class keeps its batches to retry
    assert w.store.stored_tree(CAMPAIGN, 0) is None


def _killed_for_class0(job: BuildJob) -> BuildResult:
    """A build whose worker the kernel kills (as the OOM killer does) for class 0."""
    if job.class_id == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return build_class(job)


def test_a_killed_worker_dead_letters_its_class_and_a_fresh_pool_builds_the_next(tmp_path):
    _same_partition(0, 1, 2)
    w = Wired(tmp_path)
    w.clusterer.build = _killed_for_class0
    w.publish(sized_pool({0: 200, 1: 300, 2: 100}, 3))
    w.settle()
    (dl,) = w.dead_letters()
    assert "class 0 ('class0')" in dl.reason and "worker process died" in dl.reason
    assert sorted(w.trees()) == [1, 2]


def test_a_class_with_a_damaged_batch_or_a_wrong_count_is_dead_lettered(tmp_path):
    _same_partition(0, 1, 2)
    w = Wired(tmp_path)
    events = list(pool_events(sized_pool({0: 100, 1: 300, 2: 50}, 3), CAMPAIGN, batch_size=1000))
    for _, ev in events:
        if ev.WhichOneof("body") == "closed" and ev.closed.class_id == 2:
            ev.closed.expected_masks = 51  # announced, never sent
    bad = w.settings.trees / CAMPAIGN / "0" / "batches" / "zzz.npz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an npz")
    w.send(events)
    w.settle()
    reasons = {}
    for d in w.dead_letters():
        reasons[detector_pb2.MaskStreamEvent.FromString(d.payload).closed.class_id] = d.reason
    assert sorted(reasons) == [0, 2] and sorted(w.trees()) == [1]
    assert f"class 0 ('class0') of {CAMPAIGN}, 100 masks failed" in reasons[0]
    assert str(bad) in reasons[0]
    assert (
        f"51 masks failed: class 2 of {CAMPAIGN}: 50 masks received, 51 announced" in (reasons[2])
    )


def test_a_class_above_the_exact_limit_builds_off_the_loop_and_a_redelivery_re_announces(
    tmp_path,
):
    n = 30_000  # two-level tree (above AUTO_EXACT_MAX), a few seconds
    assert n > AUTO_EXACT_MAX
    w = Wired(tmp_path, keep_alive_s=0.05)
    calls = []
    w.clusterer.keep_alive = lambda: (calls.append(1), w.loop.keep_alive())
    events = w.publish(sized_pool({0: n, 5: 50}, 6))
    w.settle()
    assert not w.dead_letters()
    trees = w.trees()
    assert trees[0].n_masks == n and trees[5].n_masks == 50
    assert calls  # the loop's consumer was kept alive while the worker built
    tree, masks, name = TreeStore.load_tree(trees[0].tree_uri, verify=True)
    assert tree.n_leaves == n and name == "class0" and masks.features.shape == (n, 0)
    assert w.store.stored_tree(CAMPAIGN, 0)[1] == trees[0].checksum
    assert w.batches(0) == [] and w.batches(5) == []

    # The crash window: tree stored and batches gone, offsets not committed. The same events
    # come again; the masks leave no batch file and "closed" re-announces the same tree.
    record = Record(topics.MASKS, 1, 0, b"", b"")
    key, closed = next((k, e) for k, e in events if e.WhichOneof("body") == "closed")
    batch = next(e for _, e in events if e.WhichOneof("body") == "masks")
    assert w.clusterer.handle(batch, record) == []
    (again,) = w.clusterer.handle(closed, record)
    assert again.key == key and again.message == trees[0]
    assert w.batches(0) == []
    w.clusterer.close()
