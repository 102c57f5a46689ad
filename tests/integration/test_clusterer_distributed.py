"""The clusterer as a process on the real broker and Redis: a class above the exact-linkage
limit (100k masks, two-level tree, built in a worker while the consumer stays in its group)
ends in TreeBuilt, and a class whose build fails (a real MemoryError under the worker's
address-space limit) ends in a DeadLetter while the classes after it on the same partition
finish."""

from __future__ import annotations

import time

import numpy as np
import pytest
from maskprop_detector.simulated import pool_events

from maskprop.simulate.generator import ade_like_class
from maskprop.simulate.pool import MaskPool
from maskprop.tree import AUTO_EXACT_MAX
from maskprop_runtime import topics
from maskprop_runtime.bus import KafkaBus, partition_for
from maskprop_runtime.pb.maskprop.clusterer.v1 import clusterer_pb2
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.treestore import TreeStore
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.integration

LARGE = 100_000  # ~30 s end to end on the 2-core CI box


def _pool(sizes: dict[int, int], n_classes: int) -> MaskPool:
    ks = sorted(sizes)
    parts = [ade_like_class(k, sizes[k], seed=2, dim=8) for k in ks]
    return MaskPool(
        features=np.concatenate([p[0] for p in parts]),
        scores=np.concatenate([p[1] for p in parts]),
        ious=np.concatenate([p[2] for p in parts]),
        class_ids=np.repeat(np.array(ks, dtype=np.int32), [sizes[k] for k in ks]),
        class_names=tuple(f"class{k}" for k in range(n_classes)),
    )


def test_a_large_class_builds_and_a_failing_one_is_dead_lettered_on_kafka(infra, tmp_path):
    dep = Deployment(infra, tmp_path)
    # Three classes on one partition: the first (exact, 20k masks: a 1.6 GB distance matrix)
    # cannot fit the worker's 1.5 GiB; the large one (two-level) and a small one follow it.
    by_partition: dict[int, list[int]] = {}
    for k in range(12):
        by_partition.setdefault(partition_for(topics.class_key(dep.campaign, k)), []).append(k)
    failing, large, small = next(ks for ks in by_partition.values() if len(ks) >= 3)[:3]
    sizes = {failing: AUTO_EXACT_MAX, large: LARGE, small: 500}
    clusterer = dep.services["clusterer"]
    clusterer.env.update({"MASKPROP_BUILD_MEMORY_LIMIT_MB": "1536", "MASKPROP_KEEP_ALIVE_S": "1"})
    clusterer.start()
    try:
        bus = KafkaBus(infra["kafka"], namespace=dep.env["MASKPROP_TOPIC_NAMESPACE"])
        producer = bus.producer()
        for key, ev in pool_events(_pool(sizes, 12), dep.campaign, batch_size=1000):
            producer.send(topics.MASKS, key, ev.SerializeToString())
        producer.close()

        consumer = bus.consumer([topics.TREES, topics.DEADLETTER], f"check-{dep.tag}")
        trees: dict[int, clusterer_pb2.TreeBuilt] = {}
        dead: list[common_pb2.DeadLetter] = []
        deadline = time.monotonic() + 300
        while (len(trees) < 2 or not dead) and time.monotonic() < deadline:
            for r in consumer.poll(1.0, 100):
                if r.topic == topics.TREES:
                    ev = clusterer_pb2.TreeBuilt.FromString(r.value)
                    trees[ev.class_id] = ev
                else:
                    dead.append(common_pb2.DeadLetter.FromString(r.value))
            assert clusterer.alive(), dep.log_tail()
        consumer.close()
        assert sorted(trees) == sorted([large, small]) and len(dead) == 1, dep.log_tail()
        closed = detector_pb2.MaskStreamEvent.FromString(dead[0].payload)
        assert closed.closed.class_id == failing and "MemoryError" in dead[0].reason
        assert f"class {failing} ('class{failing}') of {dep.campaign}, {AUTO_EXACT_MAX} masks" in (
            dead[0].reason
        )

        assert trees[large].n_masks == LARGE and trees[small].n_masks == sizes[small]
        tree, masks, name = TreeStore.load_tree(trees[large].tree_uri, verify=True)
        assert tree.n_leaves == LARGE and name == f"class{large}"
        assert masks.features.shape == (LARGE, 0)
        store = TreeStore(dep.data / "trees")
        assert store.stored_tree(dep.campaign, large)[1] == trees[large].checksum
        assert store.read_batches(dep.campaign, large) is None  # removed once the tree is stored
        assert store.read_batches(dep.campaign, failing) is not None  # kept for a retry
        log = (dep.logs / "maskprop_clusterer.1.log").read_text(errors="replace")
        assert "event loop error" not in log  # keep-alive polls on the broker never failed
    finally:
        clusterer.stop()
