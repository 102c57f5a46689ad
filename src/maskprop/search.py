"""Search orders over cluster trees (paper Sec. 4.3 and 5.1, Fig. 6b).

A search keeps a frontier of candidate clusters, pops one, and (after annotation) may push its
two children.  The strategies differ only in the order of pops, so with the same decisions they
all end at the same leaves (Sec. 5.1); the order decides how fast good clusters are found.

Frontier items are ``(class_id, node)`` pairs so one search can span every class of a campaign.
Each frontier's state is a plain list of ints, which makes sessions snapshot-able as JSON.

Strategies (``STRATEGIES``):

* ``heuristic`` ("Heuristics only", the paper's choice and the default): always pop the
  candidate with the highest priority (the cluster score S_j = mean mask score);
* ``bfs``: breadth-first; ``dfs``: depth-first, children in tree order (a blind path);
* ``dfs_heuristic``: depth-first, the child with the higher priority first.

The universal threshold cut is not a search (it never splits); see :func:`universal_cut`.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from maskprop.errors import MaskpropError
from maskprop.tree import Tree

Item = tuple[int, int]


class Frontier(Protocol):
    """Candidate clusters waiting to be examined."""

    def push_children(self, parent: Item, children: list[Item]) -> None: ...
    def push_roots(self, roots: list[Item]) -> None: ...
    def pop(self) -> Item: ...
    def __len__(self) -> int: ...
    def state(self) -> list[int]: ...


PriorityTable = Mapping[int, NDArray[np.float64]]


def _sortable_keys(priorities: NDArray[np.float64]) -> NDArray[np.uint64]:
    """uint64 keys that order like ``-priorities`` (larger priority first).

    IEEE-754 bits of a float order like the float itself once the magnitude bits of a
    negative number are flipped; -0.0 is folded into 0.0 so equal floats get equal keys.
    """
    neg = -np.asarray(priorities, dtype=np.float64) + 0.0
    bits = neg.view(np.int64)
    keys = np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)
    return keys.view(np.uint64) ^ np.uint64(1 << 63)


class HeuristicFrontier:
    """Max-priority queue over all candidates (ties: lower class, then lower node id).

    An integer heap: each item is one Python int ``key(-priority) << 64 | class << 32 | node``,
    which orders exactly like the tuple ``(-priority, class, node)`` (so the heap's layout,
    and :meth:`state`, are the same as a tuple heap's) but compares faster and holds no
    per-node Python list: the per-node keys stay one int64 array per class.
    """

    def __init__(self, priorities: PriorityTable, state: list[int] | None = None) -> None:
        self._keys = {c: _sortable_keys(p) for c, p in priorities.items()}
        self._heap: list[int] = []
        if state:
            # Stored as flat (class, node) pairs in heap order: the heap invariant still holds.
            self._heap = [self._item(c, j) for c, j in zip(state[0::2], state[1::2], strict=True)]

    def _item(self, c: int, j: int) -> int:
        return (int(self._keys[c][j]) << 64) | (c << 32) | j

    def push_roots(self, roots: list[Item]) -> None:
        for c, j in roots:
            heapq.heappush(self._heap, self._item(c, j))

    def push_children(self, parent: Item, children: list[Item]) -> None:
        heap, keys = self._heap, self._keys  # the sweep's inner loop
        for c, j in children:
            heapq.heappush(heap, (int(keys[c][j]) << 64) | (c << 32) | j)

    def pop(self) -> Item:
        item = heapq.heappop(self._heap)
        return (item >> 32) & 0xFFFFFFFF, item & 0xFFFFFFFF

    def __len__(self) -> int:
        return len(self._heap)

    def state(self) -> list[int]:
        return [v for item in self._heap for v in ((item >> 32) & 0xFFFFFFFF, item & 0xFFFFFFFF)]


class BfsFrontier:
    """First in, first out."""

    def __init__(self, priorities: PriorityTable, state: list[int] | None = None) -> None:
        self._queue: deque[Item] = deque()
        if state:
            self._queue.extend(zip(state[0::2], state[1::2], strict=True))

    def push_roots(self, roots: list[Item]) -> None:
        self._queue.extend(roots)

    def push_children(self, parent: Item, children: list[Item]) -> None:
        self._queue.extend(children)

    def pop(self) -> Item:
        return self._queue.popleft()

    def __len__(self) -> int:
        return len(self._queue)

    def state(self) -> list[int]:
        return [v for item in self._queue for v in item]


class DfsFrontier:
    """Last in, first out; children in tree order (left popped first)."""

    def __init__(self, priorities: PriorityTable, state: list[int] | None = None) -> None:
        self._priorities = priorities
        self._stack: list[Item] = []
        if state:
            self._stack.extend(zip(state[0::2], state[1::2], strict=True))

    def push_roots(self, roots: list[Item]) -> None:
        self._stack.extend(reversed(roots))

    def push_children(self, parent: Item, children: list[Item]) -> None:
        self._stack.extend(reversed(self._order(children)))

    def _order(self, children: list[Item]) -> list[Item]:
        return children

    def pop(self) -> Item:
        return self._stack.pop()

    def __len__(self) -> int:
        return len(self._stack)

    def state(self) -> list[int]:
        return [v for item in self._stack for v in item]


class DfsHeuristicFrontier(DfsFrontier):
    """Depth-first, but the child with the higher priority is explored first."""

    def _order(self, children: list[Item]) -> list[Item]:
        return sorted(children, key=lambda it: (-float(self._priorities[it[0]][it[1]]), it))


FrontierFactory = Callable[[PriorityTable, "list[int] | None"], Frontier]

STRATEGIES: dict[str, FrontierFactory] = {
    "heuristic": HeuristicFrontier,
    "bfs": BfsFrontier,
    "dfs": DfsFrontier,
    "dfs_heuristic": DfsHeuristicFrontier,
}


def make_frontier(
    strategy: str, priorities: PriorityTable, state: list[int] | None = None
) -> Frontier:
    """The frontier of a named strategy; ``priorities[class_id][node]`` orders heuristics."""
    try:
        factory = STRATEGIES[strategy]
    except KeyError:
        names = ", ".join(sorted(STRATEGIES))
        raise MaskpropError(f"unknown search strategy {strategy!r} (choose from {names})") from None
    return factory(priorities, state)


def universal_cut(tree: Tree, n_clusters: int) -> NDArray[np.int64]:
    """Nodes of the cut of ``tree`` into ``n_clusters`` clusters at one height.

    Equivalent to ``scipy.cluster.hierarchy.fcluster(Z, n_clusters, "maxclust")``: undo the
    ``n_clusters - 1`` highest merges.  Returns the node ids of the resulting clusters.
    """
    n = tree.n_leaves
    k = int(min(max(n_clusters, 1), n))
    if k == 1:
        return np.array([tree.root], dtype=np.int64)
    # Internal nodes in decreasing merge order are n+n-2, ..., so the k-1 last merges are the
    # nodes from ``first_undone`` up; the clusters are their children below it.
    first_undone = tree.n_nodes - k + 1
    undone = np.arange(first_undone, tree.n_nodes)
    children = np.concatenate([tree.left[undone], tree.right[undone]]).astype(np.int64)
    return np.sort(children[children < first_undone])
