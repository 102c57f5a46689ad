"""The verify gateway wired to an in-process search service (fakeredis, in-memory bus)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from maskprop_detector.simulated import write_images
from maskprop_gateway import keys
from maskprop_gateway.app import create_app, policy_from
from maskprop_gateway.auth import KeyStore
from maskprop_gateway.quality import QualityControl
from maskprop_gateway.schemas import LeaseOut
from maskprop_gateway.search_client import LocalSearchClient
from maskprop_gateway.settings import GatewaySettings
from maskprop_gateway.simcrowd import SimWorker, Truth, simulated_gold

from maskprop.simulate.generator import ade_like_pool
from tests.inprocess.conftest import Wired

PEPPER = "test-pepper-0123456789"


class Stack:
    def __init__(
        self, tmp_path, pool, *, redundancy=1, gold=400, redis=None, search=None, **settings
    ):
        """``redis``: a real Redis client instead of fakeredis; ``search``: a function of the
        search core giving the gateway's search client (default: in-process)."""
        self.wired = Wired(tmp_path, pool, campaign="gw", redis=redis, lease_seconds=86_400)
        self.wired.publish_pool()
        self.wired.settle()
        self.settings = GatewaySettings(
            key_pepper=PEPPER,
            image_root=tmp_path / "images",
            rate_per_s=settings.pop("rate_per_s", 10_000),
            rate_burst=settings.pop("rate_burst", 10_000),
            redundancy=redundancy,
            # inline unless a test asks for the forwarder: labels reach search before the
            # answer request returns, so tests can check them right away
            forward_linger_s=settings.pop("forward_linger_s", 0.0),
            **settings,
        )
        write_images(pool, tmp_path / "images" / "gw")
        held = ade_like_pool(2000, 4, seed=99, dim=8)
        self.gold = simulated_gold(held, "gw", gold, image_root=tmp_path / "images")
        from maskprop_gateway.app import policy_from

        QualityControl(self.wired.redis, policy_from(self.settings)).import_gold(self.gold)
        self.truth = Truth.build(pool, self.gold, ambiguity=0.03, seed=5)
        self.keys = KeyStore(self.wired.redis, PEPPER)
        self.key = self.keys.create("acme", "Acme Crowd")
        self.other_key = self.keys.create("rival", "Rival Crowd")
        self.app = create_app(
            self.settings,
            redis=self.wired.redis,
            search=(search or LocalSearchClient)(self.wired.core),
            expiry_interval_s=0.2,
        )

    def headers(self, key=None):
        return {"Authorization": f"Bearer {key or self.key}"}

    def labels(self):
        return {c: self.wired.core.labels("gw", c).tolist() for c in self.wired.core.classes("gw")}


def pending(stack) -> int:
    """Decided labels not yet acknowledged by search (the gateway's label outbox)."""
    return int(stack.wired.redis.xlen(keys.LABEL_OUTBOX))


def settled(client) -> None:
    """Let the gateway's settler apply every answer marked so far (it runs in a thread, off
    the request path, issue #18): tests check answers' effects right after their requests."""
    client.app.state.gateway.settle_pending()


def run_crowd(client, stack, workers, batch=25, max_rounds=2000):
    """Workers lease and answer until the campaign is done; returns blocked workers."""
    blocked: dict[str, str] = {}
    idle = 0
    for _ in range(max_rounds):
        prog = client.get("/v1/progress", params={"campaign": "gw"}, headers=stack.headers())
        assert prog.status_code == 200, prog.text
        if prog.json()["done"]:
            return blocked
        worked = False
        for w in workers:
            if w.worker_id in blocked:
                continue
            r = client.post(
                "/v1/leases",
                json={"worker_id": w.worker_id, "campaign": "gw", "max_questions": batch},
                headers=stack.headers(),
            )
            if r.status_code == 403:
                blocked[w.worker_id] = r.json()["detail"]
                continue
            assert r.status_code == 201, r.text
            lease = r.json()
            LeaseOut.model_validate(lease)  # the route serializes it itself: hold it to the schema
            if not lease["questions"]:
                continue
            answers = []
            for q in lease["questions"]:
                label, elapsed = w.answer(stack.truth, q["mask"]["counts"])
                answers.append(
                    {"question_id": q["question_id"], "answer": label, "elapsed_ms": elapsed}
                )
            s = client.post(
                "/v1/answers",
                json={"lease_id": lease["lease_id"], "worker_id": w.worker_id, "answers": answers},
                headers=stack.headers(),
            )
            assert s.status_code == 200, s.text
            worked = True
        settled(client)
        # A round without work can be the last one: search's remaining candidate clusters may
        # all be decided without a question (auto-reject / auto-split) while leasing, so the
        # next progress check says done.  Two in a row means the crowd is stuck.
        # With a forwarder thread, labels reach search up to a linger later: wait for them.
        linger = stack.settings.forward_linger_s
        idle = 0 if worked else idle + 1
        if idle and linger:
            time.sleep(2 * linger)
        if idle >= (2 if not linger else 20):
            raise AssertionError(f"no worker could make progress; blocked: {blocked}")
    raise AssertionError("crowd did not finish")


def one_round(client, stack, worker, batch):
    """``worker`` leases ``batch`` questions and answers them; returns the answer response."""
    r = client.post(
        "/v1/leases",
        json={"worker_id": worker.worker_id, "campaign": "gw", "max_questions": batch},
        headers=stack.headers(),
    )
    assert r.status_code == 201, r.text
    lease = r.json()
    answers = [
        {"question_id": q["question_id"], "answer": a, "elapsed_ms": ms}
        for q in lease["questions"]
        for a, ms in [worker.answer(stack.truth, q["mask"]["counts"])]
    ]
    s = client.post(
        "/v1/answers",
        json={"lease_id": lease["lease_id"], "worker_id": worker.worker_id, "answers": answers},
        headers=stack.headers(),
    )
    assert s.status_code == 200, s.text
    settled(client)
    return lease, s.json()


def honest_only_labels(tmp_path, pool):
    """The labels four honest workers reach at redundancy 3: what a mixed crowd must match."""
    honest = [SimWorker(f"h{i}", "honest", seed=i) for i in range(4)]
    run = Stack(tmp_path / "honest", pool, redundancy=3)
    with TestClient(run.app) as client:
        assert run_crowd(client, run, honest) == {}
    return run.labels()


@pytest.fixture(scope="module")
def pool():
    return ade_like_pool(1200, 3, seed=4, dim=8)


def test_mixed_crowd_bad_workers_blocked_and_labels_match_honest_only(tmp_path, pool):
    honest_labels = honest_only_labels(tmp_path, pool)
    mixed_workers = [
        *[SimWorker(f"h{i}", "honest", seed=10 + i) for i in range(4)],
        *[SimWorker(f"r{i}", "random", seed=20 + i) for i in range(2)],
        *[SimWorker(f"b{i}", "bot", seed=30 + i) for i in range(2)],
    ]
    mixed = Stack(tmp_path / "mixed", pool, redundancy=3)
    with TestClient(mixed.app) as client:
        blocked = run_crowd(client, mixed, mixed_workers)
    assert set(blocked) == {"r0", "r1", "b0", "b1"}, blocked
    assert mixed.labels() == honest_labels


def test_workers_who_turn_bad_after_qualifying_are_suspended_and_discounted(tmp_path):
    """Sleepers pass the qualification honestly, then click at random or answer "yes" in
    0.2 s: hidden gold and answer times must catch them, and their votes must not change a
    label.  (A larger pool than the other tests, over 10 classes: at ~5 % hidden gold a
    random clicker needs a dozen gold answers before its accuracy is known, and how many
    questions a few classes need swings with the masks sampled: 3,000 masks in 3 classes
    once gave the honest workers only 1-6 gold answers each; in 10 classes, 20-40.)"""
    pool = ade_like_pool(3000, 10, seed=4, dim=8)
    honest_labels = honest_only_labels(tmp_path, pool)
    workers = [
        *[SimWorker(f"h{i}", "honest", seed=10 + i) for i in range(4)],
        *[SimWorker(f"r{i}", "random", seed=20 + i, honest_for=20) for i in range(2)],
        *[SimWorker(f"b{i}", "bot", seed=30 + i, honest_for=20) for i in range(2)],
    ]
    mixed = Stack(tmp_path / "mixed", pool, redundancy=3)
    qc = QualityControl(mixed.wired.redis, policy_from(mixed.settings))
    with TestClient(mixed.app) as client:
        blocked = run_crowd(client, mixed, workers)
    states = {w.worker_id: qc.state(f"acme:{w.worker_id}") for w in workers}  # per vendor
    assert all(st.qualification == "passed" for st in states.values()), states
    # The premise: enough work that an honest worker meets well over min_gold hidden gold.
    assert min(states[f"h{i}"].gold_answers for i in range(4)) >= 2 * qc.policy.min_gold
    suspended = {w for w, st in states.items() if st.suspended}
    assert suspended == {"r0", "r1", "b0", "b1"}, {w: st for w, st in states.items()}
    assert {states[w].suspension_reason for w in ("b0", "b1")} == {"too_fast"}
    assert all("accuracy" in (states[w].suspension_reason or "") for w in ("r0", "r1"))
    assert set(blocked) <= suspended
    assert mixed.labels() == honest_labels


def test_a_registered_campaign_is_answered_at_its_specs_redundancy(tmp_path, pool):
    """The gateway reads a registered campaign's redundancy from the campaign registry (issue
    #16: parameters stored once, read by every service), not its own MASKPROP_REDUNDANCY: a
    spec saying 3 gets exactly 3 answers on every question search asked (no dynamic overlap
    beyond them: the budget pays 3 answers a question), with the gateway set to 1."""
    from maskprop.campaign_spec import Budget, CampaignSpec
    from maskprop_runtime.campaigns import CampaignRegistry

    st = Stack(tmp_path, pool, redundancy=1)
    CampaignRegistry(st.wired.redis).create(
        CampaignSpec(
            name="gw", classes=("c0", "c1", "c2"), images_root=tmp_path / "images" / "gw",
            detector_weights=tmp_path / "d.pt", budget=Budget(questions=10**6), redundancy=3,
        )
    )  # fmt: skip
    honest = [SimWorker(f"h{i}", "honest", seed=40 + i) for i in range(4)]
    with TestClient(st.app) as client:
        assert run_crowd(client, st, honest) == {}
        stats = client.app.state.gateway.leases.stats("gw")
        prog = client.get("/v1/progress", params={"campaign": "gw"}, headers=st.headers()).json()
    questions = sum(c["questions_answered"] for c in prog["classes"])
    qualification = len(honest) * policy_from(st.settings).qualification_size
    real_answers = stats["answers"] - stats["gold_answers"] - qualification
    assert questions > 0 and real_answers == 3 * questions


def test_security_basics(tmp_path, pool):
    st = Stack(tmp_path, pool)
    with TestClient(st.app) as client:
        body = {"worker_id": "w1", "campaign": "gw", "max_questions": 5}
        assert client.post("/v1/leases", json=body).status_code == 401
        bad = {"Authorization": "Bearer mpk_acme_" + "x" * 43}
        assert client.post("/v1/leases", json=body, headers=bad).status_code == 401
        lease = client.post("/v1/leases", json=body, headers=st.headers()).json()
        lid = lease["lease_id"]
        # another vendor cannot see or answer this lease
        assert client.get(f"/v1/leases/{lid}", headers=st.headers(st.other_key)).status_code == 404
        ans = {
            "lease_id": lid,
            "worker_id": "w1",
            "answers": [
                {"question_id": q["question_id"], "answer": True, "elapsed_ms": 1500}
                for q in lease["questions"]
            ],
        }
        assert (
            client.post("/v1/answers", json=ans, headers=st.headers(st.other_key)).status_code
            == 404
        )
        # idempotent replay: applied once, first response replayed
        h = {**st.headers(), "Idempotency-Key": "k-1"}
        first = client.post("/v1/answers", json=ans, headers=h)
        again = client.post("/v1/answers", json=ans, headers=h)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers.get("Idempotent-Replayed") == "true"
        changed = {**ans, "answers": ans["answers"][:1]}
        assert client.post("/v1/answers", json=changed, headers=h).status_code == 422
        # oversized body
        big = client.post(
            "/v1/answers",
            content=b"{" + b" " * (st.settings.max_body_bytes + 10) + b"}",
            headers={**st.headers(), "Content-Type": "application/json"},
        )
        assert big.status_code == 413
        # gold answers never in any response
        for g in st.gold[:50]:
            assert str(g.answer).lower() not in {"true_", "false_"}  # sanity: bools only
        texts = [client.get(f"/v1/leases/{lid}", headers=st.headers()).text, first.text]
        assert all('"answer"' not in t for t in texts)
        assert all(g.gold_id not in "".join(texts) for g in st.gold)


def test_rate_limit_says_when_to_retry(tmp_path, pool):
    st = Stack(tmp_path, pool, rate_per_s=1, rate_burst=2)
    with TestClient(st.app) as client:
        codes = [
            client.get("/v1/progress", params={"campaign": "gw"}, headers=st.headers()).status_code
            for _ in range(4)
        ]
        assert codes[:2] == [200, 200] and 429 in codes[2:]
        r = client.get("/v1/progress", params={"campaign": "gw"}, headers=st.headers())
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_images_and_overlays_come_from_the_gateway_store(tmp_path, pool):
    st = Stack(tmp_path, pool)
    with TestClient(st.app) as client:
        q = client.post(
            "/v1/leases",
            json={"worker_id": "w9", "campaign": "gw", "max_questions": 2},
            headers=st.headers(),
        ).json()["questions"][0]
        img = client.get(q["image_url"], headers=st.headers())
        ov = client.get(q["overlay_url"], headers=st.headers())
        assert img.status_code == ov.status_code == 200
        assert img.content[:8] == ov.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get(q["image_url"]).status_code == 401
        assert np.all(np.array([1]))


def test_logs_never_carry_keys_tokens_or_gold(tmp_path, pool, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    st = Stack(tmp_path, pool)
    with TestClient(st.app) as client:
        workers = [SimWorker("h0", "honest", seed=1), SimWorker("b0", "bot", seed=2)]
        for w in workers:
            for _ in range(3):
                r = client.post(
                    "/v1/leases",
                    json={"worker_id": w.worker_id, "campaign": "gw", "max_questions": 20},
                    headers=st.headers(),
                )
                if r.status_code != 201:
                    break
                lease = r.json()
                answers = []
                for q in lease["questions"]:
                    label, elapsed = w.answer(st.truth, q["mask"]["counts"])
                    answers.append(
                        {"question_id": q["question_id"], "answer": label, "elapsed_ms": elapsed}
                    )
                client.post(
                    "/v1/answers",
                    json={
                        "lease_id": lease["lease_id"],
                        "worker_id": w.worker_id,
                        "answers": answers,
                    },
                    headers=st.headers(),
                )
                token = lease.get("worker_token") or ""
    text = "\n".join(
        f"{r.getMessage()} {sorted((k, str(v)) for k, v in vars(r).items())}"
        for r in caplog.records
    )
    assert "answers" in text  # the gateway does log its work
    assert st.key not in text and st.other_key not in text
    assert not token or token not in text
    assert all(g.gold_id not in text for g in st.gold)


def test_worker_routes_share_the_vendor_rate_limit(tmp_path, pool):
    st = Stack(tmp_path, pool, rate_per_s=1, rate_burst=2)
    with TestClient(st.app) as client:
        token = client.post(
            "/v1/leases",
            json={"worker_id": "w1", "campaign": "gw", "max_questions": 1},
            headers=st.headers(),
        ).json()["worker_token"]
        codes = [
            client.post(
                "/v1/worker/lease", json={"max_questions": 1}, headers={"X-Worker-Token": token}
            ).status_code
            for _ in range(3)
        ]
        assert 429 in codes


def test_answers_decided_while_search_is_down_are_kept_and_forwarded_later(tmp_path, pool):
    from maskprop_gateway.search_client import SearchUnavailable

    class FlakySearch(LocalSearchClient):
        down = False

        def submit(self, answers, top_ups=None, owner=""):
            if self.down:
                raise SearchUnavailable("search is down")
            return super().submit(answers, top_ups, owner)

    st = Stack(tmp_path, pool)
    flaky = FlakySearch(st.wired.core)
    st.app = create_app(st.settings, redis=st.wired.redis, search=flaky, expiry_interval_s=0.2)
    worker = SimWorker("h0", "honest", seed=1)

    answered = lambda: st.wired.core.progress("gw").questions  # noqa: E731
    with TestClient(st.app) as client:
        one_round(client, st, worker, 10)  # the qualification
        flaky.down = True
        before = answered()
        _, out = one_round(client, st, worker, 10)
        assert out["forwarded_to_search"] == 0  # the workers' answers are safe
        kept = pending(st)
        assert kept > 0 and answered() == before
        flaky.down = False
        # the expiry loop (every 0.2 s here) retries what its own request could not send
        deadline = time.monotonic() + 10
        while pending(st) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pending(st) == 0
        assert answered() >= before + kept


def test_request_metrics_count_route_templates_never_raw_paths(tmp_path, pool):
    from maskprop_gateway.metrics import REQUESTS
    from prometheus_client import generate_latest

    st = Stack(tmp_path, pool)

    def count(route: str, status: str) -> float:
        return REQUESTS.labels("GET", route, status)._value.get()

    route = "/v1/leases/{lease_id}"
    before_ok, before_404 = count(route, "200"), count(route, "404")
    with TestClient(st.app) as client:
        body = {"worker_id": "w1", "campaign": "gw", "max_questions": 2}
        lid = client.post("/v1/leases", json=body, headers=st.headers()).json()["lease_id"]
        assert client.get(f"/v1/leases/{lid}", headers=st.headers()).status_code == 200
        missing = client.get("/v1/leases/l_nosuchlease", headers=st.headers())
        assert missing.status_code == 404
    assert count(route, "200") == before_ok + 1
    assert count(route, "404") == before_404 + 1
    exposed = generate_latest().decode()
    assert lid not in exposed and "l_nosuchlease" not in exposed


def test_forwarder_batches_many_requests_labels_and_reaches_the_same_labels(tmp_path, pool):
    """With ``forward_linger_s`` > 0 a forwarder thread sends the labels of several answer
    requests in one search call; the labels equal those of inline forwarding, and nothing
    stays in the label outbox once the gateway stopped."""

    class Counting(LocalSearchClient):
        calls = 0

        def submit(self, answers, top_ups=None, owner=""):
            Counting.calls += 1
            return super().submit(answers, top_ups, owner)

    def run(where, linger):
        st = Stack(tmp_path / where, pool, forward_linger_s=linger)
        search = Counting(st.wired.core)
        st.app = create_app(st.settings, redis=st.wired.redis, search=search)
        Counting.calls = 0
        workers = [SimWorker(f"h{i}", "honest", seed=i) for i in range(6)]
        with TestClient(st.app) as client:
            assert run_crowd(client, st, workers, batch=10) == {}
        assert pending(st) == 0
        return st.labels(), Counting.calls

    inline, inline_calls = run("inline", 0.0)
    batched, batched_calls = run("batched", 0.2)
    assert batched == inline
    assert batched_calls < inline_calls


def test_a_lease_carries_at_most_max_lease_questions(tmp_path, pool):
    st = Stack(tmp_path, pool, max_lease_questions=7, gold_share=0.0)
    worker = SimWorker("h0", "honest", seed=1)
    with TestClient(st.app) as client:
        one_round(client, st, worker, 50)  # the qualification
        lease, _ = one_round(client, st, worker, 50)
        assert len(lease["questions"]) == 7


def test_search_refusals_and_odd_requests_are_4xx_never_500(tmp_path, pool):
    """Issue #18: ``campaign=.``/``..`` were 500s, a chunked oversized body a 400, booleans
    counted as integers and unknown query parameters were silently ignored."""
    st = Stack(tmp_path, pool)
    with TestClient(st.app, raise_server_exceptions=False) as client:
        h = st.headers()
        for name in (".", "..", "a" * 65, "a/b"):
            r = client.get("/v1/progress", params={"campaign": name}, headers=h)
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert "campaign" in r.json()["detail"]
        for name in ("nosuch", ".a", "..a", "a" * 64):  # valid names of no campaign
            r = client.get("/v1/progress", params={"campaign": name}, headers=h)
            assert r.status_code == 200 and r.json()["classes"] == [], (name, r.text)
        lease = {"worker_id": "w1", "campaign": ".."}
        assert client.post("/v1/leases", json=lease, headers=h).status_code == 422
        body = {"worker_id": "w1", "campaign": "gw", "max_questions": True}
        r = client.post("/v1/leases", json=body, headers=h)
        assert r.status_code == 422 and "max_questions" in r.json()["detail"]
        r = client.get("/v1/progress", params={"campaign": "gw", "cmapaign": "x"}, headers=h)
        assert r.status_code == 422 and "cmapaign" in r.json()["detail"]
        ok = client.post("/v1/leases", json={**body, "max_questions": 5}, headers=h)
        assert ok.status_code == 201
        q = ok.json()["questions"][0]
        ans = {"lease_id": ok.json()["lease_id"], "worker_id": "w1"}
        for bad in ({"answer": 1, "elapsed_ms": 5}, {"answer": True, "elapsed_ms": True}):
            one = {**ans, "answers": [{"question_id": q["question_id"], **bad}]}
            assert client.post("/v1/answers", json=one, headers=h).status_code == 422

        def stream():
            for _ in range(st.settings.max_body_bytes // 1000 + 2):
                yield b" " * 1000

        big = client.post(
            "/v1/answers", content=stream(), headers={**h, "Content-Type": "application/json"}
        )
        assert big.status_code == 413


def test_gold_and_real_questions_look_the_same_to_vendors_and_workers(tmp_path, pool):
    """Issue #18: ``forwarded_to_search`` was 0 for every gold answer and 1 for every real one.
    Answering one question per request, every field, status and header a vendor or worker
    sees must be the same for hidden gold and real questions."""
    st = Stack(tmp_path, pool, gold_share=0.25)
    worker = SimWorker("h0", "honest", seed=3)
    seen: dict[str, set] = {"g": set(), "r": set()}
    counts = {"g": 0, "r": 0}
    sizes: set[tuple[int, int]] = set()  # (questions, of them hidden gold) per lease
    with TestClient(st.app) as client:
        gw = client.app.state.gateway
        h = st.headers()
        one_round(client, st, worker, 10)  # the qualification
        for _ in range(6):
            r = client.post(
                "/v1/leases",
                json={"worker_id": "h0", "campaign": "gw", "max_questions": 20},
                headers=h,
            )
            assert r.status_code == 201
            lease = r.json()
            lid, token = lease["lease_id"], lease["worker_token"]
            refs = gw.lease("acme", lid)["refs"]
            golds = sum(code == "g" for code, _ in refs.values())
            sizes.add((len(lease["questions"]), golds))
            for q in lease["questions"]:
                kind = refs[q["question_id"]][0]
                counts[kind] += 1
                label, ms = worker.answer(st.truth, q["mask"]["counts"])
                ans = client.post(
                    "/v1/answers",
                    json={
                        "lease_id": lid,
                        "worker_id": "h0",
                        "answers": [
                            {"question_id": q["question_id"], "answer": label, "elapsed_ms": ms}
                        ],
                    },
                    headers=h,
                )
                body = {k: v for k, v in ans.json().items() if k != "lease_id"}
                image = client.get(q["image_url"], headers=h)
                overlay = client.get(q["overlay_url"], headers=h)
                wimage = client.get(
                    q["image_url"].replace("/v1/leases", "/v1/worker/leases"),
                    headers={"X-Worker-Token": token},
                )
                seen[kind].add(
                    (
                        ans.status_code,
                        tuple(sorted(ans.headers)),
                        tuple(sorted(body.items())),
                        tuple(sorted(q)),
                        tuple(sorted(q["mask"])),
                        len(q["question_id"]),
                        q["image_url"].rsplit("/", 1)[-1],
                        (
                            image.status_code,
                            image.headers["content-type"],
                            tuple(sorted(image.headers)),
                        ),
                        (
                            overlay.status_code,
                            overlay.headers["content-type"],
                            tuple(sorted(overlay.headers)),
                        ),
                        (wimage.status_code, wimage.headers["content-type"]),
                    )
                )
            status = client.get(f"/v1/leases/{lid}", headers=h).json()
            assert status["answered"] == status["questions"] == len(lease["questions"])
        settled(client)
        # the campaign's progress counts every answer and no gold: it would tell which
        # answers were gold to a vendor reading it after each one
        prog = client.get("/v1/progress", params={"campaign": "gw"}, headers=h).json()
        assert prog["gold_answers"] == 0 and prog["worker_answers"] >= counts["g"] + counts["r"]
    assert counts["g"] >= 5 and counts["r"] >= 40, counts
    # gold takes real questions' places: never more questions than asked for (with gold on
    # top, 21 for 20 said "one of these is gold"); a full lease may hold gold or not
    assert max(n for n, _ in sizes) == 20 and any(n == 20 and g for n, g in sizes), sizes
    # every observation of a gold question is one a real question also produced
    assert seen["g"] <= seen["r"], (seen["g"] - seen["r"], seen["r"])
    assert len(seen["r"]) == 1, seen["r"]  # and nothing varies at all between answers
    (only,) = seen["r"]
    assert only[0] == 200 and only[7][0] == only[8][0] == only[9][0] == 200


def test_a_retry_takes_over_the_key_of_a_gateway_that_died_mid_request(tmp_path, pool):
    """Issue #18: a gateway killed while handling a keyed answer request left the key
    "running" for a day (every retry 409).  Here the dead request held the key and marked the
    answers, then stopped; the retry is 409 while the key's lease runs, then takes it over,
    applies the answers once, and its response is replayed after."""
    from maskprop_gateway.idempotency import IdempotencyStore
    from maskprop_gateway.schemas import AnswersRequest

    st = Stack(tmp_path, pool)
    worker = SimWorker("h0", "honest", seed=1)
    with TestClient(st.app) as client:
        gw = client.app.state.gateway
        gw.idempotency.running_lease_s = 0.5
        one_round(client, st, worker, 10)  # the qualification
        lease = client.post(
            "/v1/leases",
            json={"worker_id": "h0", "campaign": "gw", "max_questions": 10},
            headers=st.headers(),
        ).json()
        body = {
            "lease_id": lease["lease_id"],
            "worker_id": "h0",
            "answers": [
                {"question_id": q["question_id"], "answer": a, "elapsed_ms": ms}
                for q in lease["questions"]
                for a, ms in [worker.answer(st.truth, q["mask"]["counts"])]
            ],
        }
        n = len(body["answers"])
        # the dead request: it held the key and marked the answers, nothing after
        fp = IdempotencyStore.fingerprint(AnswersRequest.model_validate(body).model_dump())
        assert gw.idempotency.begin("acme", "retry-1", fp) is not None
        record = gw.lease("acme", lease["lease_id"])
        refs = record["refs"]
        gw.leases.mark_answered(
            record,
            lease["lease_id"],
            [(a["question_id"], a["answer"], a["elapsed_ms"]) for a in body["answers"]],
            now=time.time(),
            tag="retry-1",
            times_key=gw.qc.times_key("acme:h0"),
            window=gw.qc.policy.window,
        )
        answered = lambda: st.wired.core.progress("gw").questions  # noqa: E731
        before = answered()
        h = {**st.headers(), "Idempotency-Key": "retry-1"}
        assert client.post("/v1/answers", json=body, headers=h).status_code == 409
        time.sleep(0.6)
        first = client.post("/v1/answers", json=body, headers=h)
        assert first.status_code == 200, first.text
        assert first.json()["accepted"] == n and first.json()["duplicates"] == 0
        real = sum(refs[a["question_id"]][0] == "r" for a in body["answers"])
        settled(client)  # the dead request's marks reached the inbox with them: applied once
        assert answered() == before + real  # every real answer reached search, once
        again = client.post("/v1/answers", json=body, headers=h)
        settled(client)
        assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
        assert answered() == before + real


def test_simulated_gold_larger_than_its_pool_is_one_clear_error():
    """Asking for more gold than the labelled pool's wrong masks can fill says so (it was
    numpy's "Cannot take a larger sample than population", eleven minutes into a benchmark)."""
    held = ade_like_pool(200, 2, seed=3, dim=8)
    wrong = int((held.ious < 0.75).sum())
    with pytest.raises(ValueError, match=rf"labelled pool has \d+ and {wrong}$"):
        simulated_gold(held, "gw", 2 * wrong + 200)
    assert len(simulated_gold(held, "gw", 20)) == 20
