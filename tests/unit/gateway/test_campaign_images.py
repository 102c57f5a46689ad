"""A registered campaign's images are served from its own folder, path-checked under it
(issue #16 item 6); other campaigns keep the gateway's store."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest
from maskprop_gateway.campaigns import CampaignSpecs
from maskprop_gateway.images import ImageMissing, image_path
from maskprop_gateway.qc_rules import QualityPolicy

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop_runtime.campaigns import CampaignRegistry


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG")
    return path


def test_a_campaign_folder_outside_the_store_serves_paths_relative_to_it(tmp_path) -> None:
    store, folder = tmp_path / "store", tmp_path / "team" / "pool"
    img = _file(folder / "a" / "1.png")
    _file(store / "shapes" / "a" / "1.png")  # the gateway's store is not asked
    assert image_path(store, "shapes", "a/1.png", folder) == img.resolve()
    for bad in ("../pool/../../store/shapes/a/1.png", "/etc/passwd", "../x.png", "a/missing.png"):
        with pytest.raises(ImageMissing):
            image_path(store, "shapes", bad, folder)


def test_a_campaign_folder_under_the_shared_volume_stays_within_itself(tmp_path) -> None:
    shared = tmp_path / "volume"
    folder = shared / "teams" / "one"
    img = _file(folder / "1.png")
    other = _file(shared / "teams" / "two" / "1.png")
    assert image_path(shared, "one", "teams/one/1.png", folder) == img.resolve()
    with pytest.raises(ImageMissing):  # another campaign's image on the same volume
        image_path(shared, "one", "teams/two/1.png", folder)
    link = folder / "sneaky.png"
    link.symlink_to(other)
    with pytest.raises(ImageMissing):  # a symlink out of the folder
        image_path(shared, "one", "teams/one/sneaky.png", folder)


def test_unregistered_campaigns_use_the_gateway_store(tmp_path) -> None:
    img = _file(tmp_path / "gw" / "1.png")
    assert image_path(tmp_path, "gw", "1.png", None) == img.resolve()
    with pytest.raises(ImageMissing):
        image_path(tmp_path, "gw", "../gw/../../1.png", None)


def test_campaign_roots_come_from_the_registry_and_are_cached(tmp_path) -> None:
    redis = fakeredis.FakeRedis()
    now = [0.0]
    roots = CampaignSpecs(redis, QualityPolicy(), ttl_s=30, clock=lambda: now[0])
    assert roots.root("shapes") is None
    assert roots.root("../bad") is None
    CampaignRegistry(redis).create(
        CampaignSpec(
            name="shapes", classes=("disc",), images_root=tmp_path / "pool",
            detector_weights=tmp_path / "d.pt", budget=Budget(questions=5),
        )
    )  # fmt: skip
    assert roots.root("shapes") is None  # the miss is kept ttl_s
    now[0] = 31.0
    assert roots.root("shapes") == tmp_path / "pool"


def test_a_registered_campaign_is_answered_at_its_redundancy_exactly(tmp_path) -> None:
    redis = fakeredis.FakeRedis()
    base = QualityPolicy(redundancy=1, max_redundancy=3)
    specs = CampaignSpecs(redis, base)
    assert specs.policy("feed-simulated-pool") is base  # not registered: the gateway's own
    CampaignRegistry(redis).create(
        CampaignSpec(
            name="shapes", classes=("disc",), images_root=tmp_path / "pool",
            detector_weights=tmp_path / "d.pt", budget=Budget(questions=5), redundancy=3,
        )
    )  # fmt: skip
    got = specs.policy("shapes")
    # the budget pays redundancy answers a question: no dynamic overlap beyond them
    assert (got.redundancy, got.vote_cap) == (3, 3)
    assert got.window == base.window and got.gold_share == base.gold_share
