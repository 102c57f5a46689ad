"""Through the gateway's HTTP API: a registered campaign's question images come from the
campaign's own folder (issue #16 item 6), not the gateway's store."""

from __future__ import annotations

import shutil

import fakeredis
from fastapi.testclient import TestClient

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop_runtime.campaigns import CampaignRegistry
from tests.inprocess.test_gateway import Stack


def test_a_registered_campaigns_images_come_from_its_folder(tmp_path, pool) -> None:
    redis = fakeredis.FakeRedis()
    folder = tmp_path / "team" / "pool"
    folder.mkdir(parents=True)
    CampaignRegistry(redis).create(
        CampaignSpec(
            name="gw", classes=tuple(pool.class_names), images_root=folder,
            detector_weights=tmp_path / "d.pt", budget=Budget(questions=100_000),
        )
    )  # fmt: skip
    st = Stack(tmp_path, pool, redis=redis)
    with TestClient(st.app) as client:
        q = client.post(
            "/v1/leases",
            json={"worker_id": "w9", "campaign": "gw", "max_questions": 1},
            headers=st.headers(),
        ).json()["questions"][0]
        # the gateway's store holds the images, the campaign's folder not yet: not served
        assert client.get(q["image_url"], headers=st.headers()).status_code == 404
        shutil.copytree(tmp_path / "images" / "gw", folder, dirs_exist_ok=True)
        img = client.get(q["image_url"], headers=st.headers())
        assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
        shutil.rmtree(tmp_path / "images")  # the store is not asked at all
        assert client.get(q["image_url"], headers=st.headers()).status_code == 200
