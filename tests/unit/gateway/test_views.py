"""Question views rendered to JSON once (maskprop_gateway.views), and how long lease records
and their views live."""

from __future__ import annotations

import doctest

import fakeredis
import pytest
from maskprop_gateway import keys, views
from maskprop_gateway.errors import NotFound
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.qc_rules import QualityPolicy
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.schemas import LeaseOut
from maskprop_gateway.search_client import Submitted
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
    def submit(self, answers, top_ups=None, owner=""):
        self.answers = list(answers)
        return Submitted(len(self.answers), 0, 0, [])


def test_a_lease_record_outlives_its_deadline_by_the_retention_and_its_views_do_not():
    r = fakeredis.FakeRedis()
    qc = QualityControl(r, QualityPolicy(qualification_size=0, gold_share=0.0))
    settings = GatewaySettings(
        key_pepper="p" * 20, forward_linger_s=0, lease_ttl_s=600, lease_retention_s=3600
    )
    now = [1_000_000.0]
    gw = Gateway(r, OneQuestion(), qc, settings, clock=lambda: now[0])
    gw.pool.add("c", {"c:0:5:5": views.render("cat", "i.png", 4, 4, "0g0")}, 1.0)
    offer = gw.create_lease("v", "w1", "c", 10, refill=False)
    assert len(offer.questions) == 1
    gw.submit("v", offer.lease_id, "w1", [(offer.questions[0][0], True, 1500)])
    gw.settle_pending()  # applied, decided, sent to search: the question is done
    key = keys.lease(offer.lease_id)
    # ~4.2k s, not a day: at 5,000 answers/s every hour of records holds ~2 GB of Redis
    assert 600 + 3600 - 5 <= r.ttl(key) <= 600 + 3600 + 1
    assert 600 + 3600 - 5 <= r.ttl(keys.lease_answered(offer.lease_id)) <= 600 + 3600 + 1
    # images and overlays: during the lease (and a minute after) only, from the pool's one copy
    # of the view (a lease copies gold views only)
    assert r.hkeys(keys.lease_views(offer.lease_id)) == [b""]  # no copy of a real view
    assert 600 <= r.ttl(keys.lease_views(offer.lease_id)) <= 660
    oid = offer.questions[0][0]
    now[0] += 600 + 59
    assert gw.expire_leases() and gw.item_view("v", offer.lease_id, oid).class_name == "cat"
    now[0] += 2
    with pytest.raises(NotFound):
        gw.item_view("v", offer.lease_id, oid)
    now[0] += 3600
    gw.expire_leases()  # purges the retired view
    assert not r.hexists(keys.items("c"), "c:0:5:5")
