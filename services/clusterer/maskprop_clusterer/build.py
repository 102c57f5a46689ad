"""One class's tree build, run in a worker process (never in the poll loop's process).

The worker reads the class's batches from the tree store, checks the count the detector
announced, builds the tree (``maskprop.tree.build_tree``, method ``auto``: exact up to 20k
masks, two-level above) and stores the class file.  Only the result's path, checksum and
count travel back; the masks and their features live in the worker, whose memory the
operating system takes back when it exits (one build per worker process).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

from maskprop.tree import build_tree
from maskprop_runtime.loop import InvalidEvent
from maskprop_runtime.treestore import TreeStore


@dataclass(frozen=True)
class BuildJob:
    """What a worker needs to build one class (plain values: it crosses a process boundary).

    ``memory_limit_bytes``: the worker's address-space limit (``RLIMIT_AS``), so a build too
    large for the pod fails with ``MemoryError`` in the worker instead of the kernel's OOM
    killer taking the pod; ``None``: no limit.  ``tree_workers``: processes for the two-level
    tree's per-block linkage (``None``: every CPU)."""

    root: str
    campaign: str
    class_id: int
    class_name: str
    expected_masks: int
    memory_limit_bytes: int | None = None
    tree_workers: int | None = None


@dataclass(frozen=True)
class BuildResult:
    """The stored class file: manifest path, its sha256 and the number of masks."""

    tree_uri: str
    checksum: str
    n_masks: int


def build_class(job: BuildJob) -> BuildResult:
    """Build and store one class's tree; :class:`InvalidEvent` when the stored batches do not
    hold the announced number of masks.  Any other exception is the build's failure
    (``MemoryError``, a damaged batch file, ...); the caller dead-letters the class."""
    if job.memory_limit_bytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = job.memory_limit_bytes
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    store = TreeStore(Path(job.root))
    table = store.read_batches(job.campaign, job.class_id)
    got = 0 if table is None else len(table)
    if table is None or got != job.expected_masks:
        raise InvalidEvent(
            f"class {job.class_id} of {job.campaign}: {got} masks received, "
            f"{job.expected_masks} announced"
        )
    tree = build_tree(table.features, table.scores, workers=job.tree_workers)
    path, sha = store.put_tree(job.campaign, job.class_id, job.class_name, tree, table)
    return BuildResult(str(path), sha, got)
