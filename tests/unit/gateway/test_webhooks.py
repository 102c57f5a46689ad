"""Vendor callbacks (maskprop_gateway.webhooks): Standard Webhooks signatures, the retry
schedule against a tiny HTTP server on 127.0.0.1, giving up, and refused endpoint URLs."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fakeredis
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from maskprop_gateway import keys
from maskprop_gateway.auth import KeyStore
from maskprop_gateway.webhooks import (
    DEAD,
    RETRY_SCHEDULE_S,
    WebhookError,
    Webhooks,
    check_addresses,
    install,
    set_webhook,
    validate_url,
)
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

PEPPER = "test-pepper-0123456789"


class Clock:
    def __init__(self) -> None:
        self.t = time.time()  # signatures are checked against the real time (5 min tolerance)

    def __call__(self) -> float:
        return self.t


class Receiver:
    """An HTTP endpoint on 127.0.0.1 answering each POST with the next status of a script
    (the last one repeats); it records what it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses[min(len(receiver.got), len(receiver.statuses)) - 1]
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
                receiver.arrived.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/maskprop?v=1"

    @contextmanager
    def running(self) -> Iterator[Receiver]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(5)


@pytest.fixture
def redis() -> Any:
    r = fakeredis.FakeRedis()
    KeyStore(r, PEPPER).create("acme", "Acme Crowd")
    KeyStore(r, PEPPER).create("quiet", "No callbacks")
    return r


def hooks_for(redis: Any, url: str, clock: Clock, **kw: Any) -> tuple[Webhooks, str]:
    secret = set_webhook("acme", url, allow_http_loopback=True, redis=redis)
    return Webhooks(redis, allow_http_loopback=True, clock=clock, threads=1, **kw), secret


class Leases:
    """A gateway's view of one lease of 3 questions."""

    def __init__(self) -> None:
        self.answered = 0

    def lease(self, vendor_id: str, lease_id: str) -> dict[str, Any]:
        refs = {f"q_{i}": ["r", f"c1:0:{i}:{i}"] for i in range(3)}
        return {"worker": "w1", "campaign": "c1", "kind": "work", "refs": refs}

    def answered_count(self, lease_id: str) -> int:
        return self.answered


def test_signature_verifies_with_the_standard_webhooks_library(redis):
    clock, sent = Clock(), []
    secret = set_webhook("acme", "https://hooks.example.com/mp", redis=redis)
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32

    def post_fn(url, body, headers, **kw):
        sent.append((url, body, headers))
        return 204

    hooks = Webhooks(redis, clock=clock, threads=1, post_fn=post_fn)
    expired = [{"lease_id": "l_1", "vendor": "acme", "worker_id": "w1", "unanswered": "4"}]
    hooks.on_expired([*expired, {**expired[0], "vendor": "quiet"}])  # "quiet" has no endpoint
    [attempt] = hooks.deliver_due()
    assert attempt.outcome == "delivered" and hooks.pending() == 0
    [(url, body, headers)] = sent
    assert url == "https://hooks.example.com/mp"
    assert set(headers) >= {"webhook-id", "webhook-timestamp", "webhook-signature"}
    event = Webhook(secret).verify(body, headers)
    assert event["type"] == "lease.expired"
    assert event["data"] == {"lease_id": "l_1", "worker_id": "w1", "unanswered": 4}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"l_1", b"l_2"), headers)
    assert set_webhook("acme", url, redis=redis) == secret  # a new URL keeps the secret
    rotated = set_webhook("acme", url, rotate_secret=True, redis=redis)
    assert rotated != secret
    with pytest.raises(WebhookVerificationError):
        Webhook(rotated).verify(body, headers)


def test_retries_with_backoff_after_500_then_delivers(redis):
    clock = Clock()
    with Receiver([500, 503, 204]).running() as rx:
        hooks, secret = hooks_for(redis, rx.url, clock)
        message_id = hooks.enqueue("acme", "lease.expired", {"lease_id": "l_9"})
        t0 = clock.t
        assert [a.outcome for a in hooks.deliver_due()] == ["retry"]
        clock.t = t0 + RETRY_SCHEDULE_S[0] - 0.1
        assert hooks.deliver_due() == []  # not due yet
        clock.t = t0 + RETRY_SCHEDULE_S[0]
        assert [a.outcome for a in hooks.deliver_due()] == ["retry"]
        clock.t += RETRY_SCHEDULE_S[1] - 0.1
        assert hooks.deliver_due() == []
        clock.t += 0.1
        [done] = hooks.deliver_due()
    assert (done.outcome, done.status) == ("delivered", 204)
    assert len(rx.got) == 3 and hooks.pending() == 0
    # the same id on every attempt (receivers dedupe on it), each attempt signed afresh
    assert {h["webhook-id"] for h, _ in rx.got} == {message_id}
    assert len({h["webhook-timestamp"] for h, _ in rx.got}) == 3
    for headers, body in rx.got:
        assert Webhook(secret).verify(body, headers)["data"] == {"lease_id": "l_9"}


def test_gives_up_after_the_schedule_and_keeps_a_dead_record(redis):
    clock = Clock()
    with Receiver([500]).running() as rx:
        hooks, _ = hooks_for(redis, rx.url, clock)
        message_id = hooks.enqueue("acme", "lease.expired", {"lease_id": "l_1"})
        outcomes = [a.outcome for a in hooks.deliver_due()]
        for wait in RETRY_SCHEDULE_S:
            clock.t += wait
            outcomes += [a.outcome for a in hooks.deliver_due()]
        clock.t += 10 * RETRY_SCHEDULE_S[-1]
        assert hooks.deliver_due() == []
    assert outcomes == ["retry"] * len(RETRY_SCHEDULE_S) + ["dead"]
    assert len(rx.got) == len(RETRY_SCHEDULE_S) + 1
    assert hooks.pending() == 0 and redis.zscore(DEAD, message_id) is not None
    [dead] = hooks.dead()
    assert dead["id"] == message_id and dead["vendor"] == "acme" and dead["state"] == "dead"
    assert dead["attempts"] == str(len(RETRY_SCHEDULE_S) + 1) and dead["last_error"] == "HTTP 500"


def test_unreachable_endpoint_is_retried_and_a_removed_one_is_dropped(redis):
    clock = Clock()
    rx = Receiver([204])
    url = rx.url
    rx.server.server_close()  # nothing listens: connection refused
    hooks, _ = hooks_for(redis, url, clock)
    hooks.enqueue("acme", "lease.expired", {"lease_id": "l_1"})
    [a] = hooks.deliver_due()
    assert a.outcome == "retry" and a.status == 0 and "Connection" in a.error
    hooks.store.remove("acme")
    clock.t += RETRY_SCHEDULE_S[0]
    [a] = hooks.deliver_due()
    assert a.outcome == "dead" and a.error == "vendor has no webhook endpoint"


def test_batch_finished_once_when_every_question_is_answered(redis):
    clock, sent = Clock(), []
    set_webhook("acme", "https://hooks.example.com/mp", redis=redis)
    leases = Leases()

    def post_fn(url, body, headers, **kw):
        sent.append(json.loads(body))
        return 200

    hooks = Webhooks(redis, leases=leases, clock=clock, threads=1, post_fn=post_fn)
    leases.answered = 2
    hooks.on_submitted("acme", "l_5")
    assert hooks.pending() == 0
    leases.answered = 3
    hooks.on_submitted("acme", "l_5")
    hooks.on_submitted("acme", "l_5")  # a retried submit: still one event
    hooks.on_submitted("quiet", "l_6")  # no endpoint: nothing
    hooks.deliver_due()
    assert [e["type"] for e in sent] == ["batch.finished"]
    assert sent[0]["data"] == {
        "lease_id": "l_5",
        "worker_id": "w1",
        "campaign": "c1",
        "kind": "work",
        "questions": 3,
    }


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/mp",  # not https
        "ftp://hooks.example.com/mp",
        "https://127.0.0.1/mp",
        "https://10.1.2.3/mp",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/mp",
        "https://localhost/mp",
        "https://redis/mp",  # a single label: a cluster service
        "https://metadata.google.internal/",
        "https://search.default.svc/",
        "https://2130706433/mp",  # 127.0.0.1 in disguise
        "https://0x7f.1/mp",
        "https://user:pw@hooks.example.com/mp",
        "https://hooks.example.com/mp#x",
        "https://hooks.example.com:0/mp",
        "https://hooks.example.com/a b",
        "http://127.0.0.1:8080/mp",  # loopback http only in test mode
    ],
)
def test_refuses_bad_urls(redis, url):
    with pytest.raises(WebhookError):
        validate_url(url)
    with pytest.raises(WebhookError):
        set_webhook("acme", url, redis=redis)
    assert not redis.exists("maskprop:gw:webhook:acme")


def test_accepts_public_https_and_test_loopback(redis):
    assert validate_url("https://hooks.example.com/mp?x=1")
    assert validate_url("https://8.8.8.8:8443/mp")
    for url in ("http://127.0.0.1:8080/mp", "http://localhost:8080/mp", "http://10.0.0.1/"):
        ok = url.startswith("http://127.0.0.1")
        if ok:
            assert validate_url(url, allow_http_loopback=True)
        else:
            with pytest.raises(WebhookError):
                validate_url(url, allow_http_loopback=True)
    with pytest.raises(WebhookError, match="no vendor"):
        set_webhook("ghost", "https://hooks.example.com/mp", redis=redis)
    # a public name that resolves to a private address is refused at delivery
    with pytest.raises(WebhookError):
        check_addresses(["93.184.215.14", "10.0.0.7"])
    check_addresses(["93.184.215.14"])


def test_install_delivers_from_the_app_lifespan(redis):
    with Receiver([204]).running() as rx:
        set_webhook("acme", rx.url, allow_http_loopback=True, redis=redis)

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            app.state.gateway = Leases()
            app.state.expired_hooks = []
            stop = install(app, redis, poll_s=0.05, allow_http_loopback=True, threads=1)
            yield
            await stop()

        app = FastAPI(lifespan=lifespan)
        with TestClient(app):
            for hook in app.state.expired_hooks:
                hook([{"lease_id": "l_2", "vendor": "acme", "worker_id": "w", "unanswered": "1"}])
            assert rx.arrived.wait(5)
            deadline = time.monotonic() + 5
            while app.state.webhooks.pending() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert app.state.webhooks.pending() == 0
    assert json.loads(rx.got[0][1])["type"] == "lease.expired"


def test_batch_finished_marker_and_message_are_one_step(redis):
    """Issue #18 (same class as the stuck idempotency key): the once-per-lease marker was set
    before the message was queued, so a gateway dying in between lost the event for good.
    Now marker and message are written together: a submit that fails half-way leaves
    neither, and the retried submit queues the event, once."""
    clock, sent = Clock(), []
    set_webhook("acme", "https://hooks.example.com/mp", redis=redis)
    leases = Leases()
    leases.answered = 3

    def post_fn(url, body, headers, **kw):
        sent.append(json.loads(body))
        return 200

    hooks = Webhooks(redis, leases=leases, clock=clock, threads=1, post_fn=post_fn)
    real = hooks._enqueue_once

    def dies(*a, **kw):
        raise ConnectionError("gateway lost Redis mid-step")

    hooks._enqueue_once = dies
    hooks.on_submitted("acme", "l_7")  # logged, not raised
    assert hooks.pending() == 0 and not redis.exists(keys.webhook_sent("l_7"))
    hooks._enqueue_once = real
    hooks.on_submitted("acme", "l_7")
    hooks.on_submitted("acme", "l_7")
    hooks.deliver_due()
    assert [e["data"]["lease_id"] for e in sent] == ["l_7"]
