"""Issue #18: nothing a vendor or worker can observe tells hidden gold from real questions.
Here the timing class: an answer request makes the same Redis calls, in the same order,
whether it answers a gold or a real question (gold used to cost different round trips: real
answers' p50 was 1.12-1.30x gold's).  The response fields are compared over HTTP in
tests/inprocess/test_gateway.py."""

from __future__ import annotations

import fakeredis
from maskprop_gateway import views
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.qc_rules import GoldItem, QualityPolicy
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.settings import GatewaySettings


class Recording(fakeredis.FakeRedis):
    """Records each round trip: a command's name (a script's sha), or one pipeline."""

    calls: list[tuple[str, ...]]

    def execute_command(self, *args, **options):
        name = str(args[0]).upper()
        self.calls.append((name, str(args[1])) if name == "EVALSHA" else (name,))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        run = pipe.execute

        def execute(*a, **k):
            self.calls.append(("PIPELINE",))
            return run(*a, **k)

        pipe.execute = execute
        return pipe


class Search:
    def submit(self, answers):
        answers = list(answers)
        return len(answers), 0, 0

    def lease(self, campaign, n, owner):
        return [], False


def test_an_answer_makes_the_same_redis_calls_for_gold_and_real_questions():
    r = Recording()
    r.calls = []
    qc = QualityControl(r, QualityPolicy(qualification_size=0, gold_share=0.3, gold_exposure=50))
    gw = Gateway(r, Search(), qc, GatewaySettings(key_pepper="p" * 20))  # relay forwarding
    qids = [f"c:0:{i}:{i}" for i in range(400)]
    gw.pool.add("c", {q: views.render("cat", "i.png", 4, 4, "0g0") for q in qids}, 1.0)
    qc.import_gold(
        GoldItem(f"g{i}", "c", "cat", "i.png", 4, 4, b"0g0", answer=i % 2 == 0) for i in range(50)
    )
    traces: dict[str, set[tuple[tuple[str, ...], ...]]] = {"g": set(), "r": set()}
    for w in range(10):
        offer = gw.create_lease("v", f"w{w}", "c", 20, refill=False)
        refs = gw.lease("v", offer.lease_id)["refs"]
        for oid, _ in offer.questions:
            r.calls = []
            gw.submit("v", offer.lease_id, f"w{w}", [(oid, w % 2 == 0, 1500)])
            if w > 1:  # after the first leases loaded every script (SCRIPT LOAD once)
                traces[refs[oid][0]].add(tuple(r.calls))
    assert traces["g"] and traces["r"]  # both kinds were answered
    assert traces["g"] == traces["r"] and len(traces["g"]) == 1, traces
