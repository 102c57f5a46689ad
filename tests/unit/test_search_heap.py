"""The heuristic frontier's integer heap orders exactly like a heap of (-priority, class, node)."""

import heapq

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from maskprop.search import HeuristicFrontier

# Few distinct values (ties decide by class, then node), signed zeros and infinities.
values = st.sampled_from([0.0, -0.0, 0.25, 0.5, 1.0, -1.0, 1e-300, -1e-300, np.inf, -np.inf])


@given(
    prios=st.lists(st.lists(values, min_size=1, max_size=12), min_size=1, max_size=3),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 10**6)), max_size=60),
)
@settings(max_examples=200, deadline=None)
def test_integer_heap_pops_and_states_like_the_tuple_heap(prios, ops):
    table = {c: np.array(p, dtype=np.float64) for c, p in enumerate(prios)}
    frontier = HeuristicFrontier(table)
    ref: list[tuple[float, int, int]] = []
    for push, r in ops:
        if push or not ref:
            c = r % len(prios)
            j = (r // 7) % len(prios[c])
            frontier.push_children((c, j), [(c, j)])
            heapq.heappush(ref, (-float(table[c][j]), c, j))
        else:
            _, c, j = heapq.heappop(ref)
            assert frontier.pop() == (c, j)
        assert frontier.state() == [v for _, c, j in ref for v in (c, j)]
    again = HeuristicFrontier(table, frontier.state())
    while ref:
        _, c, j = heapq.heappop(ref)
        assert again.pop() == (c, j)
    assert len(again) == 0
