import fakeredis
import numpy as np
import pytest
from maskprop_clusterer.service import ClustererSettings, build_clusterer
from maskprop_detector.simulated import pool_events
from maskprop_search.service import SearchSettings, build_search

from maskprop.simulate.generator import ade_like_pool
from maskprop_runtime import topics
from maskprop_runtime.bus import InMemoryBus


@pytest.fixture
def pool():
    return ade_like_pool(1500, 4, seed=3, dim=8)


class Wired:
    """Clusterer and search on an in-memory bus and one fake Redis (embedded mode)."""

    def __init__(self, tmp_path, pool, campaign="c1", redis=None, **search):
        self.bus = InMemoryBus()
        self.redis = fakeredis.FakeRedis() if redis is None else redis
        self.tmp = tmp_path
        self.pool = pool
        self.campaign = campaign
        self.clusterer = build_clusterer(
            ClustererSettings(data_dir=tmp_path / "state"), self.bus, self.redis
        )
        self.search_settings = SearchSettings(data_dir=tmp_path / "state", **search)
        self.core, self.search_loop = build_search(self.search_settings, self.bus, self.redis)

    def publish_pool(self):
        producer = self.bus.producer()
        for key, ev in pool_events(self.pool, self.campaign, batch_size=200):
            producer.send(topics.MASKS, key, ev.SerializeToString())
        producer.flush()

    def settle(self):
        from maskprop_runtime.loop import run_until_idle

        run_until_idle([self.clusterer, self.search_loop])

    def restart_search(self):
        """A new search process on the same Redis: nothing in memory survives."""
        self.core, self.search_loop = build_search(self.search_settings, self.bus, self.redis)

    def truth(self, qs):
        from maskprop.simulate.scenes import pool_index

        ids = np.array([pool_index(q.mask_id) for q in qs], dtype=np.int64)
        return self.pool.ious[ids] >= self.search_settings.iou_threshold


@pytest.fixture
def wired(tmp_path, pool):
    return Wired(tmp_path, pool)
