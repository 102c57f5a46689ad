"""Question views rendered to JSON once (maskprop_gateway.views), and lease records of the
previous version (full items) still served and answered."""

from __future__ import annotations

import doctest
import json

import fakeredis
from maskprop_gateway import views
from maskprop_gateway.gateway import Gateway, P
from maskprop_gateway.quality import QualityControl, QualityPolicy
from maskprop_gateway.schemas import LeaseOut
from maskprop_gateway.settings import GatewaySettings


def test_the_module_examples_hold():
    assert doctest.testmod(views).failed == 0


def test_a_rendered_view_is_valid_json_whatever_its_strings():
    # RLE counts use characters 48-111, the backslash among them; names may hold anything.
    name, counts = 'a "quoted"\\ class\nnamé', "0\\g0O`\\"
    view = views.render(name, "dir/a b\n.png", 7, 9, counts)
    assert views.parse(view) == views.ItemView(name, "dir/a b\n.png", 7, 9, counts.encode())
    offer = views.LeaseOffer("l_abc", "work", "c", "w1", 12.5, [("q_1", view), ("q_2", view)])
    body = offer.to_dict()
    LeaseOut.model_validate(body)  # the documented schema, extra fields forbidden
    assert body["questions"][0] == {
        "question_id": "q_1",
        "class_name": name,
        "mask": {"size": [7, 9], "counts": counts},
        "image_url": "/v1/leases/l_abc/questions/q_1/image",
        "overlay_url": "/v1/leases/l_abc/questions/q_1/overlay",
    }
    assert "dir/a b" not in offer.to_json()  # the image file stays internal
    worker_page = offer.to_dict("/v1/worker/leases")
    assert worker_page["questions"][1]["image_url"] == "/v1/worker/leases/l_abc/questions/q_2/image"
    assert worker_page["worker_token"] is None and worker_page["expires_at"] == 12.5


class OneQuestion:
    def submit(self, answers):
        self.answers = list(answers)
        return len(self.answers), 0, 0


def test_a_lease_recorded_by_the_previous_version_is_still_served_and_answered():
    r = fakeredis.FakeRedis()
    search = OneQuestion()
    qc = QualityControl(r, QualityPolicy(qualification_size=0, gold_share=0.0))
    gw = Gateway(r, search, qc, GatewaySettings(key_pepper="p" * 20, forward_linger_s=0))
    qid = "c:0:5:5"
    view = {"class_name": "cat", "image_file": "i.png", "rle_h": 4, "rle_w": 4}
    items = {"q_old": {"kind": "real", "ref": qid, **view, "rle_counts": "0g0"}}
    r.hset(
        f"{P}lease:l_old",
        mapping={
            "vendor": "v",
            "worker": "w1",
            "campaign": "c",
            "kind": "work",
            "created": 1.0,
            "expires": 4e9,
            "items": json.dumps(items),
        },
    )
    gw.pool.add("c", {qid: views.render("cat", "i.png", 4, 4, "0g0")}, 1.0)
    assert gw.pool.claim("c", "v:w1", 1, 4e9, 1.0, 1)
    assert gw.item_view("v", "l_old", "q_old") == views.ItemView("cat", "i.png", 4, 4, b"0g0")
    out = gw.submit("v", "l_old", "w1", [("q_old", True, 1500)])
    assert out["accepted"] == 1 and out["forwarded_to_search"] == 1
    assert search.answers == [(qid, True)]


def test_a_lease_record_outlives_its_deadline_by_the_retention_and_its_views_do_not():
    r = fakeredis.FakeRedis()
    qc = QualityControl(r, QualityPolicy(qualification_size=0, gold_share=0.0))
    settings = GatewaySettings(
        key_pepper="p" * 20, forward_linger_s=0, lease_ttl_s=600, lease_retention_s=3600
    )
    gw = Gateway(r, OneQuestion(), qc, settings)
    gw.pool.add("c", {"c:0:5:5": views.render("cat", "i.png", 4, 4, "0g0")}, 1.0)
    offer = gw.create_lease("v", "w1", "c", 10, refill=False)
    assert len(offer.questions) == 1
    gw.submit("v", offer.lease_id, "w1", [(offer.questions[0][0], True, 1500)])
    key = f"{P}lease:{offer.lease_id}"
    # ~4.2k s, not a day: at 5,000 answers/s every hour of records holds ~2 GB of Redis
    assert 600 + 3600 - 5 <= r.ttl(key) <= 600 + 3600 + 1
    assert 600 + 3600 - 5 <= r.ttl(f"{key}:answered") <= 600 + 3600 + 1
    assert 600 <= r.ttl(f"{key}:views") <= 660  # images and overlays: during the lease only
