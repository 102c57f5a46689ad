"""The annotator page in real headless Chromium, against the gateway served by uvicorn on
127.0.0.1 and wired to the in-process search (the ``Stack`` of tests/inprocess/test_gateway.py:
fakeredis, in-memory bus; no Kafka needed).

Needs Playwright and Debian's chromium (never downloaded by this module):
``apt-get install -y chromium`` and ``.venv/bin/pip install playwright==1.65.2``.  Without them
the browser test is skipped, or fails when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from maskprop_gateway.auth import WorkerClaims

from maskprop.simulate.generator import ade_like_pool
from tests.inprocess.test_gateway import Stack

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CSP = "default-src 'self'; img-src 'self' data: blob:; frame-ancestors *"
READY = """(seq) => {
    const q = document.getElementById('question');
    return (q.dataset.state === 'ready' && +q.dataset.seq > seq)
        || !document.getElementById('screen-message').hidden;
}"""


@pytest.fixture(scope="module")
def pool():
    return ade_like_pool(1200, 3, seed=4, dim=8)


@pytest.fixture
def chromium() -> str:
    """Path of the system chromium, once Playwright imports."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (.venv/bin/pip install playwright==1.65.2)"
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if reason is None and exe is None:
        reason = "no chromium binary on PATH (apt-get install -y chromium)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert exe is not None
    return exe


@contextmanager
def served(app: Any) -> Iterator[str]:
    """The app under uvicorn in a background thread on a free port; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def vendor_page(html: str) -> Iterator[str]:
    """A vendor's task page on another origin (another port on the loopback: Chrome keeps
    pages of unknown address space off local ones, Local Network Access)."""
    body = html.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/task"
    finally:
        server.shutdown()
        server.server_close()


def worker_token(stack: Stack, worker_id: str) -> str:
    return stack.keys.worker_token(WorkerClaims("acme", worker_id, "gw", time.time() + 3600))


def answer_lease(
    page: Any, stack: Stack, kind: str, seq: int, *, frame: Any = None, correct: bool = True
) -> int:
    """Answer every question of the current lease with the Y / N keys (right or wrong by the
    simulation's truth), in ``frame`` (default: the page's); returns the last question's
    sequence number."""
    frame = frame or page.main_frame
    while True:
        frame.wait_for_function(READY, arg=seq, timeout=15_000)
        q = frame.evaluate("() => ({...document.getElementById('question').dataset})")
        outcome = frame.evaluate("() => document.body.dataset.outcome || ''")
        assert not outcome, f"page says {outcome!r} while answering a {kind} lease"
        assert q["kind"] == kind, q
        seq = int(q["seq"])
        truth = stack.truth.answers[q["counts"]]
        # A steady, human-like pace: the gateway suspends workers far faster than the crowd.
        page.wait_for_timeout(120)
        page.keyboard.press("y" if truth == correct else "n")
        if int(q["index"]) + 1 == int(q["total"]):
            return seq


@pytest.mark.slow
def test_worker_qualifies_and_answers_with_the_keyboard(tmp_path, pool, chromium):
    from playwright.sync_api import sync_playwright

    stack = Stack(tmp_path / "stack", pool)
    with served(stack.app) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 820, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on(
                "console",
                lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
            )
            resp = page.goto(f"{base}/annotate#token={worker_token(stack, 'page-w1')}")
            assert resp is not None and resp.status == 200
            assert resp.headers["content-security-policy"] == CSP
            assert "x-frame-options" not in resp.headers
            assert page.evaluate("document.activeElement.id") == "start"
            page.keyboard.press("Enter")
            page.wait_for_selector("#qual-begin:focus")
            page.keyboard.press("Enter")
            seq = answer_lease(page, stack, "qualification", 0)
            seq = answer_lease(page, stack, "work", seq)
            # the work lease was sent in one batch, then the next lease came by itself
            page.wait_for_function(
                "n => +document.body.dataset.submitted > n", arg=stack.settings.qualification_size
            )
            page.wait_for_function(READY, arg=seq, timeout=15_000)
            assert page.evaluate("document.getElementById('question').dataset.kind") == "work"
            page.screenshot(path=tmp_path / "annotator.png")
            assert problems == []

            # A vendor's page embeds it; a worker who fails the qualification is told so, then
            # told again (403) when asking for more work.
            frame_src = f"{base}/annotate#token={worker_token(stack, 'page-w2')}"
            with vendor_page(
                f'<iframe src="{frame_src}" width="800" height="860"></iframe>'
            ) as url:
                page.goto(url)
                frame = page.frame_locator("iframe")
                frame.locator("#start").click()
                frame.locator("#qual-begin").click()
                inner = next(f for f in page.frames if f.url.startswith(base))
                answer_lease(page, stack, "qualification", 0, frame=inner, correct=False)
                title = frame.locator("#message-title")
                title.wait_for(state="visible")
                assert title.inner_text() == "Qualification not passed"
                inner.goto(frame_src.replace("#", "?reload#"))
                inner.locator("#start").click()
                title.wait_for(state="visible")
                assert title.inner_text() == "Qualification not passed"
                page.screenshot(path=tmp_path / "annotator-failed.png")
        finally:
            browser.close()
    assert stack.wired.core.progress("gw").questions > 0


def test_worker_routes_need_the_workers_own_token(tmp_path, pool):
    stack = Stack(tmp_path, pool)
    with TestClient(stack.app) as client:
        mine = {"X-Worker-Token": worker_token(stack, "w-a")}
        lease = client.post("/v1/worker/lease", json={"max_questions": 3}, headers=mine)
        assert lease.status_code == 201, lease.text
        body = lease.json()
        assert body["kind"] == "qualification" and body["worker_token"] is None
        q = body["questions"][0]
        assert q["image_url"].startswith("/v1/worker/leases/")
        assert client.post("/v1/worker/lease", json={}).status_code == 401
        token = mine["X-Worker-Token"]
        assert client.get(q["image_url"], params={"token": token}).status_code == 200
        assert client.get(q["overlay_url"], headers=mine).status_code == 200
        theirs = {"X-Worker-Token": worker_token(stack, "w-b")}
        assert client.get(q["image_url"], headers=theirs).status_code == 404
        answers = [{"question_id": q["question_id"], "answer": True, "elapsed_ms": 900}]
        sent = {"lease_id": body["lease_id"], "answers": answers}
        assert client.post("/v1/worker/answers", json=sent, headers=theirs).status_code == 403
        # a worker token is no vendor key
        vendor_route = q["image_url"].replace("/v1/worker/", "/v1/")
        bearer = {"Authorization": f"Bearer {token}"}
        assert client.get(vendor_route, headers=bearer).status_code == 401
        assert client.get(vendor_route, params={"token": token}).status_code == 401
        page = client.get("/annotate")
        assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
        assert "x-frame-options" not in page.headers
        assert client.get("/static/annotate.js").status_code == 200
