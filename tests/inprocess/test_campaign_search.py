"""Two campaigns with different parameters on the same clusterer and search (one Redis, one
bus): search opens each campaign's sessions with the parameters in the campaign registry, not
its process settings, and each campaign's labels equal the library's for its own parameters
(issue #16, "Must show")."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import fakeredis
from maskprop_detector.simulated import pool_events, wire_pool
from maskprop_search.service import SearchSettings

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop.params import AnnotationParams
from maskprop.simulate.scenes import pool_index
from maskprop_app.embedded import reference_labels
from maskprop_runtime import topics
from maskprop_runtime.campaigns import CampaignRegistry
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from tests.inprocess.conftest import Wired

# Parameters far from the process's (paper) settings, and from each other.
CAMPAIGNS = {
    "strict": {"samples_per_cluster": 5, "accept_threshold": 0.95, "seed": 4, "strategy": "bfs"},
    "loose": {
        "samples_per_cluster": 9,
        "accept_threshold": 0.7,
        "prior_accept_threshold": 0.4,
        "seed": 1,
        "strategy": "heuristic",
    },
}


def test_each_campaign_decides_by_its_own_registered_parameters(tmp_path: Path, pool) -> None:
    redis = fakeredis.FakeRedis()
    registry = CampaignRegistry(redis)
    for name, values in CAMPAIGNS.items():
        kw = dict(values)
        seed, strategy = kw.pop("seed"), kw.pop("strategy")
        registry.create(
            CampaignSpec(
                name=name,
                classes=tuple(pool.class_names),
                images_root=tmp_path,
                detector_weights=tmp_path / "d.pt",
                params=AnnotationParams(**kw),  # type: ignore[arg-type]
                budget=Budget(questions=10_000),
                seed=int(seed),
                strategy=str(strategy),
            )
        )
    w = Wired(tmp_path, pool, redis=redis)  # the process itself runs the paper's defaults
    producer = w.bus.producer()
    for name in CAMPAIGNS:
        for key, ev in pool_events(pool, name, batch_size=200):
            producer.send(topics.MASKS, key, ev.SerializeToString())
    producer.flush()
    w.settle()
    truth = wire_pool(pool).ious >= 0.75
    for name in CAMPAIGNS:
        assert len(w.core.classes(name)) == len(pool.class_names)
        while True:
            qs, done = w.core.lease(name, 50)
            if done:
                break
            w.core.submit((q.question_id, bool(truth[pool_index(q.mask_id)])) for q in qs)
    labels: dict[str, dict[str, int]] = defaultdict(dict)
    for rec in w.bus.read(topics.LABELS):
        ev = search_pb2.LabelsPropagated.FromString(rec.value)
        for lab in ev.labels:
            labels[ev.campaign][lab.mask_id] = int(lab.accepted)
    for name, values in CAMPAIGNS.items():
        expected = reference_labels(wire_pool(pool), SearchSettings(**values))
        assert labels[name] == expected, name
    assert labels["strict"] != labels["loose"]
    # and neither equals what the process's own (paper) settings decide
    assert labels["strict"] != reference_labels(wire_pool(pool), SearchSettings())
