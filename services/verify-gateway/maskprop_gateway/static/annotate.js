/* The annotator page: instructions, the qualification test, then yes/no mask verification.
 *
 * The worker token comes from the URL fragment (#token=...) and is sent only in the
 * X-Worker-Token header of same-origin calls to /v1/worker/...; images are fetched the same way
 * and shown from blob: URLs, so the token never appears in a URL a server logs.  Answers of a
 * lease are sent in one batch when the lease is finished, then the next lease is fetched.
 * Resubmitting a batch is safe: the gateway counts an answer once per (lease, question).
 *
 * For tests, #question carries data-state (loading | ready | submitting), data-seq (increments
 * per shown question), data-kind, data-index, data-total and data-counts (the mask's RLE counts,
 * which the page receives anyway); <body data-submitted> counts answers the gateway accepted.
 */
"use strict";

(() => {
  const BATCH = 10; // questions asked per lease (the gateway allows 1..50)
  const RETRY_MS = [1000, 3000, 10000]; // waits before retrying a network error, 429 or 5xx
  const POLL_MS = 30000; // with no work available, ask again this often
  const MAX_ELAPSED_MS = 3600000; // the gateway's bound on one answer's time

  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  class ApiError extends Error {
    constructor(status, detail, retryAfterS) {
      super(detail);
      this.status = status; // 0: the request did not reach the gateway
      this.retryAfterS = retryAfterS || 0;
    }
  }

  const state = {
    token: null,
    lease: null,
    index: 0,
    answers: [],
    shownAt: 0,
    seq: 0,
    accepting: false,
    images: new Map(), // question id -> Promise<{image, overlay}> of blob: URLs
    pollTimer: 0,
    leasing: false,
    qualificationIntroduced: false,
    submitted: 0,
  };

  // ------------------------------------------------------------------ screens
  function showScreen(id, focusTarget) {
    for (const s of document.querySelectorAll(".screen")) s.hidden = s.id !== id;
    const target = focusTarget || $(id).querySelector("h1");
    if (target) {
      if (target.tagName === "H1") target.tabIndex = -1;
      target.focus();
    }
  }

  function announce(text) {
    $("live").textContent = text;
  }

  function message(title, text, { retry = false } = {}) {
    clearTimeout(state.pollTimer);
    state.accepting = false;
    $("message-title").textContent = title;
    $("message-text").textContent = text;
    $("retry").hidden = !retry;
    document.body.dataset.outcome = title;
    showScreen("screen-message");
  }

  function fail(err) {
    const status = err instanceof ApiError ? err.status : 0;
    const detail = err && err.message ? err.message : String(err);
    if (status === 401) {
      return message(
        "This link has expired",
        "Open the task again from your work page to get a fresh link.",
      );
    }
    if (status === 403 && /suspend/i.test(detail)) return suspended();
    if (status === 403 && /qualification/i.test(detail)) return failedQualification();
    if (status === 403) return message("No access", detail);
    if (status === 422) return message("No work available", detail, { retry: true });
    return message(
      "Something went wrong",
      `${detail}. Your sent answers are kept; try again in a moment.`,
      { retry: true },
    );
  }

  function suspended() {
    message(
      "Your work on this task is paused",
      "Quality checks paused your access (too many check questions wrong, or answers much " +
        "faster than other workers). Answers you already sent are kept. Contact the " +
        "requester if you think this is a mistake.",
    );
  }

  function failedQualification() {
    message(
      "Qualification not passed",
      "Thank you for taking the test. Too few answers matched, so this task is not open to " +
        "you. Answers you already sent are kept.",
    );
  }

  function noWork() {
    message(
      "No more work right now",
      "Every question of this task is answered or being answered by someone else. This page " +
        `checks again every ${POLL_MS / 1000} seconds.`,
      { retry: true },
    );
    state.pollTimer = setTimeout(nextLease, POLL_MS);
  }

  // ------------------------------------------------------------------ gateway calls
  async function api(method, path, body) {
    const headers = { "X-Worker-Token": state.token };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (_) {
      throw new ApiError(0, "the gateway could not be reached");
    }
    if (!res.ok) {
      let detail = res.statusText || `HTTP ${res.status}`;
      try {
        detail = (await res.json()).detail || detail;
      } catch (_) {
        // not JSON: keep the status text
      }
      throw new ApiError(res.status, detail, Number(res.headers.get("Retry-After")));
    }
    return res;
  }

  async function withRetry(call) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        return await call();
      } catch (err) {
        const s = err instanceof ApiError ? err.status : -1;
        const transient = s === 0 || s === 429 || s >= 500;
        if (!transient || attempt >= RETRY_MS.length) throw err;
        announce("Connection problem; retrying…");
        await sleep(Math.max(RETRY_MS[attempt], err.retryAfterS * 1000));
      }
    }
  }

  async function blobUrl(path) {
    const res = await withRetry(() => api("GET", path));
    return URL.createObjectURL(await res.blob());
  }

  function imagesFor(q) {
    let p = state.images.get(q.question_id);
    if (!p) {
      p = Promise.all([blobUrl(q.image_url), blobUrl(q.overlay_url)]).then(
        ([image, overlay]) => ({ image, overlay }),
      );
      p.catch(() => state.images.delete(q.question_id));
      state.images.set(q.question_id, p);
    }
    return p;
  }

  function releaseImages() {
    for (const p of state.images.values()) {
      p.then(
        (u) => {
          URL.revokeObjectURL(u.image);
          URL.revokeObjectURL(u.overlay);
        },
        () => {},
      );
    }
    state.images.clear();
  }

  function setSrc(img, url) {
    img.src = url;
    return img.decode();
  }

  // ------------------------------------------------------------------ leases
  async function nextLease() {
    clearTimeout(state.pollTimer);
    if (state.leasing) return; // a double click on Start asks once
    state.leasing = true;
    setStage("loading");
    let lease;
    try {
      const res = await withRetry(() =>
        api("POST", "/v1/worker/lease", { max_questions: BATCH }),
      );
      lease = await res.json();
    } catch (err) {
      return fail(err);
    } finally {
      state.leasing = false;
    }
    if (!lease.questions.length) return noWork();
    state.lease = lease;
    state.index = 0;
    state.answers = [];
    if (lease.kind === "qualification" && !state.qualificationIntroduced) {
      state.qualificationIntroduced = true;
      $("qual-count").textContent = String(lease.questions.length);
      showScreen("screen-qualification", $("qual-begin"));
      return;
    }
    beginLease();
  }

  function beginLease() {
    const qualification = state.lease.kind === "qualification";
    $("mode").textContent = qualification ? "Qualification test" : "Work";
    const wasHidden = $("screen-task").hidden;
    if (wasHidden) showScreen("screen-task");
    updateProgress();
    showQuestion(0);
  }

  function updateProgress() {
    const total = state.lease ? state.lease.questions.length : 0;
    const done = Math.min(state.index, total);
    $("progress").max = Math.max(total, 1);
    $("progress").value = done;
    $("progress-text").textContent = `${done} / ${total}`;
  }

  function setStage(stateName, note) {
    const stage = $("question");
    stage.dataset.state = stateName;
    stage.setAttribute("aria-busy", stateName === "ready" ? "false" : "true");
    $("stage-note").hidden = !note;
    $("stage-note").textContent = note || "";
    // aria-disabled, not disabled: a disabled button would drop the keyboard focus.
    const off = stateName === "ready" ? "false" : "true";
    $("yes").setAttribute("aria-disabled", off);
    $("no").setAttribute("aria-disabled", off);
  }

  async function showQuestion(i) {
    const lease = state.lease;
    const q = lease.questions[i];
    state.accepting = false;
    setStage("loading");
    $("class-name").textContent = q.class_name;
    try {
      const urls = await imagesFor(q);
      await Promise.all([setSrc($("image"), urls.image), setSrc($("overlay"), urls.overlay)]);
    } catch (err) {
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return fail(err);
      return imageFailed(i);
    }
    if (state.lease !== lease || state.index !== i) return; // superseded meanwhile
    const stage = $("question");
    Object.assign(stage.dataset, {
      qid: q.question_id,
      counts: q.mask.counts,
      kind: lease.kind,
      index: String(i),
      total: String(lease.questions.length),
      seq: String(++state.seq),
    });
    setStage("ready");
    state.shownAt = performance.now();
    state.accepting = true;
    const next = lease.questions[i + 1];
    if (next) imagesFor(next).catch(() => {}); // prefetch; errors surface when it is shown
  }

  function imageFailed(i) {
    if (state.lease.kind === "work") {
      // A work question may stay unanswered: it returns to the pool when the lease expires.
      setStage("loading", "This image could not be loaded; skipping it.");
      setTimeout(() => advance(), 1500);
      return;
    }
    setStage("loading", "This image could not be loaded; retrying…");
    setTimeout(() => showQuestion(i), 3000);
  }

  function answer(yes) {
    if (!state.accepting) return;
    state.accepting = false;
    const q = state.lease.questions[state.index];
    const elapsed = Math.round(performance.now() - state.shownAt);
    state.answers.push({
      question_id: q.question_id,
      answer: yes,
      elapsed_ms: Math.min(MAX_ELAPSED_MS, Math.max(0, elapsed)),
    });
    advance();
  }

  function advance() {
    state.index += 1;
    updateProgress();
    if (state.index < state.lease.questions.length) showQuestion(state.index);
    else submitLease();
  }

  async function submitLease() {
    const lease = state.lease;
    setStage("submitting", "Sending your answers…");
    let out = null;
    if (state.answers.length) {
      const body = { lease_id: lease.lease_id, answers: state.answers };
      try {
        out = await (await withRetry(() => api("POST", "/v1/worker/answers", body))).json();
      } catch (err) {
        releaseImages();
        if (err instanceof ApiError && err.status === 410) {
          announce("This batch expired before it was sent; starting a new one.");
          return nextLease();
        }
        return fail(err);
      }
      state.submitted += out.accepted;
      document.body.dataset.submitted = String(state.submitted);
    }
    releaseImages();
    const status = out ? out.worker_status : null;
    if (status === "suspended") return suspended();
    if (status === "failed") return failedQualification();
    if (lease.kind === "qualification" && status === "passed") {
      announce("Qualification passed. The work starts now.");
    } else if (out) {
      announce(`${state.submitted} answers sent. Thank you!`);
    }
    return nextLease();
  }

  // ------------------------------------------------------------------ input
  function setOverlayVisible(visible) {
    $("question").classList.toggle("overlay-hidden", !visible);
    $("toggle-overlay").setAttribute("aria-pressed", visible ? "false" : "true");
  }

  function onKeyDown(e) {
    if (e.ctrlKey || e.metaKey || e.altKey || $("screen-task").hidden) return;
    const key = e.key.toLowerCase();
    if (key === "h") {
      e.preventDefault();
      setOverlayVisible(false);
      return;
    }
    if (e.repeat) return; // a held key answers once
    if (key === "y" || key === "n") {
      e.preventDefault();
      answer(key === "y");
    }
  }

  function onKeyUp(e) {
    if (e.key.toLowerCase() === "h") setOverlayVisible(true);
  }

  function init() {
    state.token = new URLSearchParams(location.hash.slice(1)).get("token");
    document.addEventListener("keydown", onKeyDown);
    document.addEventListener("keyup", onKeyUp);
    $("yes").addEventListener("click", () => answer(true));
    $("no").addEventListener("click", () => answer(false));
    $("toggle-overlay").addEventListener("click", () =>
      setOverlayVisible($("question").classList.contains("overlay-hidden")),
    );
    $("start").addEventListener("click", nextLease);
    $("qual-begin").addEventListener("click", beginLease);
    $("retry").addEventListener("click", nextLease);
    if (!state.token) {
      message(
        "This link is incomplete",
        "Open the task from your work page: its link carries your access token.",
      );
      return;
    }
    showScreen("screen-intro", $("start"));
  }

  init();
})();
