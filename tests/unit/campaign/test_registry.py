"""The campaign registry on fakeredis: create, a taken name, versions, states, and the
parameters search reads from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import fakeredis
import pytest

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop_runtime.campaigns import (
    CampaignError,
    CampaignRegistry,
    spec_from_proto,
    spec_to_proto,
)
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2


def make_spec(name: str = "shapes", **kw: object) -> CampaignSpec:
    values: dict[str, object] = {
        "name": name,
        "classes": ("circle", "square"),
        "images_root": Path("/data/pool"),
        "detector_weights": Path("/models/detector.pt"),
        "budget": Budget(questions=100),
        **kw,
    }
    return CampaignSpec(**values)  # type: ignore[arg-type]


@pytest.fixture
def registry() -> CampaignRegistry:
    ticks = iter(range(1000, 2000))
    return CampaignRegistry(fakeredis.FakeRedis(), clock=lambda: float(next(ticks)))


def test_spec_round_trips_through_its_proto() -> None:
    spec = make_spec(
        params=AnnotationParams(samples_per_cluster=9, accept_threshold=0.9, sequential="beta"),
        manifest=Path("/data/list.txt"),
        strategy="bfs",
        seed=7,
        redundancy=3,
    )
    back = spec_from_proto(
        campaign_pb2.CampaignSpec.FromString(spec_to_proto(spec).SerializeToString())
    )
    assert back == spec


def test_create_get_list(registry: CampaignRegistry) -> None:
    made = registry.create(make_spec())
    assert made.state == campaign_pb2.CAMPAIGN_STATE_CREATED
    assert made.spec.version == 1 and made.created_unix == made.updated_unix
    registry.create(make_spec("other", seed=3))
    assert registry.names() == ["shapes", "other"]
    assert [c.spec.name for c in registry.list()] == ["shapes", "other"]
    assert registry.spec("other").seed == 3


def test_second_create_with_a_taken_name_is_refused(registry: CampaignRegistry) -> None:
    registry.create(make_spec())
    with pytest.raises(CampaignError, match=r"'shapes' exists \(version 1, created\)"):
        registry.create(make_spec(seed=5))
    assert registry.spec("shapes").seed == 0  # the first one is untouched
    assert registry.names() == ["shapes"]


def test_bad_names_and_unknown_campaigns(registry: CampaignRegistry) -> None:
    with pytest.raises(CampaignError, match="must be 1-64 characters"):
        registry.create(make_spec("../etc"))
    with pytest.raises(CampaignError, match="no campaign named 'ghost'"):
        registry.get("ghost")
    with pytest.raises(CampaignError, match="no campaign named 'ghost'"):
        registry.set_state("ghost", "paused")
    with pytest.raises(CampaignError, match="starts at version 1"):
        registry.create(make_spec(version=2))
    assert registry.names() == []


def test_parameter_change_needs_an_explicit_new_version(registry: CampaignRegistry) -> None:
    registry.create(make_spec())
    changed = make_spec(params=AnnotationParams(accept_threshold=0.95))
    with pytest.raises(CampaignError, match="must say version = 2"):
        registry.revise(changed)
    assert registry.revise(make_spec()).spec.version == 1  # the same spec again: a no-op
    with pytest.raises(CampaignError, match="must say version = 2, not 3"):
        registry.revise(dataclasses.replace(changed, version=3))
    revised = registry.revise(dataclasses.replace(changed, version=2))
    assert revised.spec.version == 2
    assert registry.spec("shapes").params.accept_threshold == 0.95
    assert registry.spec("shapes", version=1).params.accept_threshold == 0.85  # kept
    with pytest.raises(CampaignError, match="cannot change them"):
        registry.revise(make_spec(classes=("circle",), version=3))
    registry.set_state("shapes", "stopped")
    with pytest.raises(CampaignError, match="is stopped"):
        registry.revise(dataclasses.replace(changed, version=3))


def test_states(registry: CampaignRegistry) -> None:
    registry.create(make_spec())
    assert registry.state("shapes") == "created"
    assert registry.set_state("shapes", "running").state == campaign_pb2.CAMPAIGN_STATE_RUNNING
    registry.set_state("shapes", "paused")
    registry.set_state("shapes", "paused")  # again: a no-op, so a retried call is safe
    assert registry.state("shapes") == "paused"
    registry.set_state("shapes", "running")
    stopped = registry.set_state("shapes", "stopped")
    assert stopped.state == campaign_pb2.CAMPAIGN_STATE_STOPPED
    assert stopped.updated_unix > stopped.created_unix
    for state in ("running", "paused"):
        with pytest.raises(CampaignError, match="is stopped: it cannot become"):
            registry.set_state("shapes", state)
    with pytest.raises(CampaignError, match="cannot be set 'created'"):
        registry.set_state("shapes", "created")


def test_session_params_come_from_the_campaign(registry: CampaignRegistry) -> None:
    assert registry.session_params("unregistered") is None
    params = AnnotationParams(
        samples_per_cluster=5, prior_accept_threshold=0.6, prior_reject_threshold=0.1
    )
    registry.create(make_spec(params=params, strategy="dfs", seed=11))
    got = registry.session_params("shapes")
    assert got is not None
    assert got.params == params and got.selection == Selection(0.1, 0.6)
    assert (got.strategy, got.seed) == ("dfs", 11)


def test_registry_is_shared_by_every_reader() -> None:
    redis = fakeredis.FakeRedis()
    CampaignRegistry(redis).create(make_spec())
    assert CampaignRegistry(redis).spec("shapes") == make_spec()


def test_round_names_map_one_to_one(registry: CampaignRegistry) -> None:
    from maskprop_runtime.campaigns import campaign_round, round_campaign

    assert round_campaign("shapes", 1) == "shapes"
    assert round_campaign("shapes", 2) == "shapes.r2"
    assert campaign_round("shapes.r2") == ("shapes", 2)
    assert campaign_round("shapes.r12") == ("shapes", 12)
    assert campaign_round("shapes") == ("shapes", 1)
    assert campaign_round("v1.r0") == ("v1.r0", 1) and campaign_round("a.r1") == ("a.r1", 1)
    with pytest.raises(CampaignError, match="rounds count from 1"):
        round_campaign("shapes", 0)
    for taken in ("shapes.r2", "shapes.r1"):  # a user name cannot look like a round's
        with pytest.raises(CampaignError, match="ends like a later round's"):
            registry.create(make_spec(taken))
    assert registry.names() == []
