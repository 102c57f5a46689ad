"""Issue #18: nothing a vendor or worker can observe tells hidden gold from real questions.
Here the timing class: an answer request's path does only what is the same for both kinds (it
marks the answers and appends them to the answer inbox in one Lua step, then reads the worker's
standing); scoring gold and voting run in the settler, off the request path.  So a request
sends Redis byte-identical commands whether it answers a gold or a real question, ids aside
(gold used to cost different round trips, later the same round trips running different Lua
work: real answers' p50 was 1.02-1.30x gold's).  The response fields are compared over HTTP in
tests/inprocess/test_gateway.py."""

from __future__ import annotations

import fakeredis
from maskprop_gateway import keys, views
from maskprop_gateway.gateway import Gateway
from maskprop_gateway.qc_rules import GoldItem, QualityPolicy
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.search_client import Submitted
from maskprop_gateway.settings import GatewaySettings


class Recording(fakeredis.FakeRedis):
    """Records every command sent, with all its arguments (a pipeline's commands in order,
    marked as one round trip)."""

    calls: list[tuple[str, ...]]

    def execute_command(self, *args, **options):
        self.calls.append(tuple(_text(a) for a in args))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        run = pipe.execute

        def execute(*a, **k):
            self.calls.append(("PIPELINE", str(transaction)))
            for command in pipe.command_stack:
                args = command.args if hasattr(command, "args") else command[0]
                self.calls.append(tuple(_text(x) for x in args))
            return run(*a, **k)

        pipe.execute = execute
        return pipe


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Search:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []

    def submit(self, answers, top_ups=None, owner=""):
        answers = list(answers)
        self.sent += answers
        return Submitted(len(answers), 0, 0, [])

    def lease(self, campaign, n, owner):
        return [], False


def anonymous(calls, names: dict[str, str]) -> tuple[tuple[str, ...], ...]:
    """The commands with the request's ids (lease, question, worker) replaced by their role:
    an argument that is one of them, and within keys, in the order given (random ids first:
    a worker id such as "w3" may occur inside one)."""
    out = []
    for command in calls:
        args = []
        for a in command:
            if a in names:
                a = names[a]
            else:
                for name, role in names.items():
                    a = a.replace(name, role)
            args.append(a)
        out.append(tuple(args))
    return tuple(out)


def test_an_answer_request_sends_identical_redis_commands_for_gold_and_real_questions():
    r = Recording()
    r.calls = []
    policy = QualityPolicy(qualification_size=0, gold_share=0.3, gold_exposure=50)
    qc = QualityControl(r, policy, clock=lambda: 1_700_000_000.0)
    search = Search()
    gw = Gateway(r, search, qc, GatewaySettings(key_pepper="p" * 20), clock=lambda: 1_700_000_000.0)
    qids = [f"c:0:{i}:{i}" for i in range(400)]
    gw.pool.add("c", {q: views.render("cat", "i.png", 4, 4, "0g0") for q in qids}, 1.0)
    qc.import_gold(
        GoldItem(f"g{i}", "c", "cat", "i.png", 4, 4, b"0g0", answer=i % 2 == 0) for i in range(50)
    )
    traces: dict[str, set[tuple[tuple[str, ...], ...]]] = {"g": set(), "r": set()}
    counts = {"g": 0, "r": 0}
    for w in range(10):
        offer = gw.create_lease("v", f"w{w}", "c", 20, refill=False)
        refs = gw.lease("v", offer.lease_id)["refs"]
        names = {offer.lease_id: "<lease>", f"v:w{w}:": "v:<worker>:", f"w{w}": "<worker>"}
        for oid, _ in offer.questions:
            r.calls = []
            gw.submit("v", offer.lease_id, f"w{w}", [(oid, True, 1500)])
            kind = refs[oid][0]
            counts[kind] += 1
            if w > 1:  # after the first leases loaded every script (SCRIPT LOAD once)
                traces[kind].add(anonymous(r.calls, {oid: "<question>", **names}))
        gw.settle_pending()  # between leases, as the settler thread would
    assert counts["g"] >= 10 and counts["r"] >= 100, counts
    assert traces["g"] == traces["r"] and len(traces["g"]) == 1, traces
    (trace,) = traces["g"]
    # the request path: the lease's record, the mark (one script, which appends the inbox
    # entry), the worker's standing (fixed fields); no QC or pool work at all
    assert [c[0] for c in trace] == ["HMGET", "EVALSHA", "HMGET"]
    # and the settler did the kind-dependent work afterwards: votes decided the real questions
    # (their labels wait in the outbox for the forwarder, not running here)
    assert gw.forwarder.outbox.pending() == counts["r"]
    assert gw.settler.backlog() == 0 and gw.leases.stats("c")["gold_answers"] == counts["g"]
    assert r.xlen(keys.ANSWER_INBOX) == 0


def test_creating_a_lease_costs_the_same_commands_with_or_without_gold():
    """A lease keeps its gold questions' views (real ones are in the question pool); it writes
    its views hash whether or not it holds gold, so a lease request's Redis work does not tell
    a worker that gold is among its questions."""
    r = Recording()
    gw = Gateway(
        r, Search(), QualityControl(r, QualityPolicy()), GatewaySettings(key_pepper="p" * 20)
    )
    view = views.render("cat", "i.png", 4, 4, "0g0")
    shapes = []
    for refs in ({"q_1": ("r", "c:0:1:1"), "q_2": ("r", "c:0:2:2")},
                 {"q_1": ("g", "g7"), "q_2": ("r", "c:0:2:2")}):  # fmt: skip
        r.calls = []
        gw.leases.create("v", "w", "c", "work", refs, dict.fromkeys(refs, view), 1.0, 600.0)
        shapes.append([(c[0], len(c)) if c[0] != "HSET" else (c[0],) for c in r.calls])
    assert shapes[0] == shapes[1], shapes


def test_exhausted_hidden_gold_is_counted_every_lease_and_logged_once_a_minute(caplog):
    """Once a campaign's gold is used up every lease is short of it: the metric counts every
    empty slot, the log says so once a minute a campaign with the slots missed since (a
    line a lease was 5,106 lines in one 120 s benchmark run)."""
    from maskprop_gateway.metrics import GOLD_SHORT

    r = fakeredis.FakeRedis()
    now = [1000.0]
    policy = QualityPolicy(qualification_size=0, gold_share=0.5)
    gw = Gateway(
        r,
        Search(),
        QualityControl(r, policy),
        GatewaySettings(key_pepper="p" * 20),
        clock=lambda: now[0],
    )
    view = views.render("cat", "i.png", 4, 4, "0g0")
    gw.pool.add("gs", {f"gs:0:{i}:{i}": view for i in range(200)}, now[0])
    warned, per_lease = [], []
    caplog.set_level("WARNING", logger="maskprop_gateway.gateway")
    for t in (0.0, 1.0, 30.0, 59.0, 61.0, 62.0):
        now[0] = 1000.0 + t
        caplog.clear()
        before = GOLD_SHORT.labels("gs")._value.get()
        offer = gw.create_lease("v", f"w{t}", "gs", 6, refill=False)
        assert offer.questions  # real questions still go out
        per_lease.append(GOLD_SHORT.labels("gs")._value.get() - before)
        warned += [(t, rec.short) for rec in caplog.records if "gold exhausted" in rec.message]
    assert all(n > 0 for n in per_lease)  # every lease was short, and counted
    # one line at 0 s, the next a minute later with the slots missed since (1-61 s); the
    # 62 s lease's slots wait for the next line
    assert warned == [(0.0, per_lease[0]), (61.0, sum(per_lease[1:5]))]
