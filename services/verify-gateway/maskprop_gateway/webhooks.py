"""Signed callbacks to crowd vendors (Standard Webhooks): ``lease.expired`` and ``batch.finished``.

Each vendor has at most one endpoint, set by an operator (``maskprop vendor webhook VENDOR URL``,
:func:`set_webhook`), never by an API caller: the gateway only ever POSTs to a URL an admin
typed.  Events wait in a Redis queue and are delivered by an asyncio task of the app
(:func:`install`); a failed delivery is retried after 5 s, 30 s, 2 min, 10 min and 1 h, then
kept as a dead record.  Every attempt is signed afresh (receivers allow 5 minutes of clock
skew) and carries the same ``webhook-id``, so a receiver dedupes retries on it.

Wire format (https://www.standardwebhooks.com): headers ``webhook-id``, ``webhook-timestamp``
(unix seconds) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``);
body ``{"type": ..., "timestamp": <ISO 8601>, "data": {...}}``.  A vendor verifies it with
``standardwebhooks.Webhook(secret).verify(body, headers)``.

Why not the runtime's :class:`~maskprop_runtime.outbox.Outbox` (the gateway's decided labels
use it): the outbox hands out its oldest entries in order and a failed batch blocks the queue
until it goes through, which fits one broker that is either up or down.  Webhooks go to many
vendors' endpoints, each failing on its own: a message needs its own due time and retry
schedule (one vendor's dead endpoint must not hold up another's callbacks) and a dead-letter
record after the last attempt, hence a zset of due times and a claim script.

Redis keys (built in :mod:`maskprop_gateway.keys`):

* ``webhook:{vendor}`` hash: url, secret (``whsec_<base64>``; it must be kept in clear to sign);
* ``webhooks:queue`` zset message id -> due time (a claimed message is pushed ``CLAIM_S`` ahead,
  so a replica that dies mid-delivery only delays it);
* ``webhooks:msg:{id}`` hash: vendor, type, body, attempts, last_error, state;
* ``webhooks:dead`` zset message id -> time given up (records kept ``DEAD_TTL_S``);
* ``webhooks:sent:{lease}`` marks a lease's ``batch.finished`` as enqueued (once per lease).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import re
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from standardwebhooks import Webhook

from maskprop_gateway import keys

log = logging.getLogger(__name__)

QUEUE = keys.WEBHOOK_QUEUE
DEAD = keys.WEBHOOK_DEAD

# Seconds to wait after the 1st, 2nd, ... failed attempt; after the last one, give up.
RETRY_SCHEDULE_S: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 3600.0)
CLAIM_S = 120.0  # > the slowest batch of deliveries (TIMEOUT_S x batch / threads)
TIMEOUT_S = 10.0
DEAD_TTL_S = 30 * 86_400
EVENTS = ("lease.expired", "batch.finished")
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Names that resolve to the cluster or the host itself, never to a vendor.
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".svc", ".cluster.local", ".lan")

# Queue a message once per marker: KEYS marker, message hash, queue; ARGV marker ttl, due
# time, message id, then the hash's field/value pairs.  One step, so a gateway that dies in
# between can neither leave the marker without its message (the event never sent) nor queue
# it twice.
_ENQUEUE_ONCE = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return 1
"""

# Claim up to ARGV[2] due messages: push their due time to ARGV[3] so no other replica takes
# them while this one delivers (a crash leaves them due again after CLAIM_S).
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return ids
"""


class WebhookError(ValueError):
    """A refused endpoint URL, or a vendor that does not exist."""


@dataclass(frozen=True)
class WebhookConfig:
    vendor_id: str
    url: str
    secret: str


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt did: ``status`` is the HTTP status (0: no response)."""

    message_id: str
    vendor_id: str
    status: int
    error: str
    outcome: str  # "delivered" | "retry" | "dead"


class LeaseReader(Protocol):
    """What :meth:`Webhooks.on_submitted` reads of a lease (``Gateway`` has both)."""

    def lease(self, vendor_id: str, lease_id: str) -> dict[str, Any]: ...
    def answered_count(self, lease_id: str) -> int: ...


# ---------------------------------------------------------------------------- URLs, secrets
def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def validate_url(url: str, *, allow_http_loopback: bool = False) -> str:
    """The URL if the gateway may POST to it, else :class:`WebhookError`.

    https only, to a public DNS name or a global IP address, no credentials or fragment.
    ``allow_http_loopback`` (tests) also admits ``http://127.0.0.1[:port]/...``.
    """
    if not isinstance(url, str) or len(url) > 2048 or any(c.isspace() or ord(c) < 32 for c in url):
        raise WebhookError("webhook URL: at most 2048 characters, no spaces or control characters")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise WebhookError(f"webhook URL: {exc}") from None
    scheme, host = u.scheme.lower(), (u.hostname or "").lower()
    loopback_http = allow_http_loopback and scheme == "http" and host == "127.0.0.1"
    if scheme != "https" and not loopback_http:
        raise WebhookError("webhook URL must use https://")
    if not host:
        raise WebhookError("webhook URL has no host")
    if u.username is not None or u.password is not None:
        raise WebhookError("webhook URL must not carry credentials")
    if u.fragment:
        raise WebhookError("webhook URL must not have a #fragment")
    if port == 0:
        raise WebhookError("webhook URL: port 0")
    if loopback_http:
        return url
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        if not ip.is_global:
            raise WebhookError(f"webhook URL: {ip} is not a public address")
        return url
    labels = host.rstrip(".").split(".")
    # A single label ("redis") or a numeric last label ("0x7f.1", "2130706433") resolves to
    # an internal service or an IP in disguise.
    if len(labels) < 2 or not all(_DNS_LABEL.match(x) for x in labels) or labels[-1].isdigit():
        raise WebhookError(f"webhook URL: {host!r} is not a public DNS name")
    if host == "localhost" or host.rstrip(".").endswith(_INTERNAL_SUFFIXES):
        raise WebhookError(f"webhook URL: {host!r} is an internal name")
    return url


def check_addresses(addresses: Sequence[str], *, allow_loopback: bool = False) -> None:
    """Refuse a delivery whose host resolves to a non-public address (a vendor's DNS could
    point its name at the gateway's own network)."""
    if not addresses:
        raise WebhookError("webhook host does not resolve")
    for a in addresses:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
        if not ip.is_global and not (allow_loopback and str(ip) == "127.0.0.1"):
            raise WebhookError(f"webhook host resolves to {ip}, not a public address")


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, with the certificate checked for the name
    (no second DNS lookup between the check and the connect)."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def post(
    url: str, body: bytes, headers: dict[str, str], *, allow_http_loopback: bool, timeout: float
) -> int:
    """POST once; returns the HTTP status.  Redirects are not followed (a 3xx is a failure)."""
    validate_url(url, allow_http_loopback=allow_http_loopback)
    u = urlsplit(url)
    host = u.hostname or ""
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    conn: http.client.HTTPConnection
    if u.scheme == "http":  # validate_url admitted only http://127.0.0.1 in test mode
        conn = http.client.HTTPConnection("127.0.0.1", u.port or 80, timeout=timeout)
    else:
        port = u.port or 443
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        check_addresses(addresses, allow_loopback=allow_http_loopback)
        conn = _PinnedHTTPSConnection(host, addresses[0], port, timeout)
    try:
        conn.request("POST", target, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(65_536)  # drained and dropped: a receiver's answer is never stored
        return int(resp.status)
    finally:
        conn.close()


# ---------------------------------------------------------------------------- configuration
class WebhookStore:
    """Per-vendor endpoint and signing secret (:func:`maskprop_gateway.keys.webhook`)."""

    def __init__(self, redis: Any) -> None:
        self.r = redis

    def set(
        self,
        vendor_id: str,
        url: str,
        *,
        allow_http_loopback: bool = False,
        rotate_secret: bool = False,
    ) -> str:
        """Point a vendor's callbacks at ``url``; returns the signing secret (a new one the
        first time or with ``rotate_secret``, else the one the vendor already has)."""
        validate_url(url, allow_http_loopback=allow_http_loopback)
        if not self.r.exists(keys.vendor(vendor_id)):
            raise WebhookError(f"no vendor {vendor_id!r}")
        key = keys.webhook(vendor_id)
        if not rotate_secret:
            self.r.hsetnx(key, "secret", new_secret())
        else:
            self.r.hset(key, "secret", new_secret())
        self.r.hset(key, mapping={"url": url, "updated": time.time()})
        return str(self.r.hget(key, "secret").decode())

    def get(self, vendor_id: str) -> WebhookConfig | None:
        url, secret = self.r.hmget(keys.webhook(vendor_id), ["url", "secret"])
        if url is None or secret is None:
            return None
        return WebhookConfig(vendor_id, url.decode(), secret.decode())

    def remove(self, vendor_id: str) -> bool:
        return bool(self.r.delete(keys.webhook(vendor_id)))


def set_webhook(
    vendor_id: str,
    url: str,
    *,
    allow_http_loopback: bool = False,
    rotate_secret: bool = False,
    redis: Any = None,
) -> str:
    """``maskprop vendor webhook VENDOR URL``: set a vendor's callback endpoint (an operator's
    command; the API has no route that takes a URL).  Returns the signing secret to hand to
    the vendor.  ``redis`` defaults to the gateway's (``MASKPROP_REDIS_URL``)."""
    if redis is None:
        from maskprop_gateway.settings import GatewaySettings
        from maskprop_runtime.store import make_redis

        settings = GatewaySettings()
        if settings.redis_url is None:
            raise WebhookError("set MASKPROP_REDIS_URL to the gateway's Redis")
        redis = make_redis(settings.redis_url.get_secret_value(), connect_timeout_s=10)
    return WebhookStore(redis).set(
        vendor_id, url, allow_http_loopback=allow_http_loopback, rotate_secret=rotate_secret
    )


# ---------------------------------------------------------------------------- queue, delivery
class Webhooks:
    """The event queue and its deliverer.

    ``clock`` (unix seconds) decides when retries are due and stamps signatures; ``post_fn``
    sends one request (tests may swap it).  Nothing here raises into the caller's request:
    a callback problem never fails an answer.
    """

    def __init__(
        self,
        redis: Any,
        *,
        leases: LeaseReader | None = None,
        schedule: Sequence[float] = RETRY_SCHEDULE_S,
        allow_http_loopback: bool = False,
        clock: Callable[[], float] = time.time,
        timeout_s: float = TIMEOUT_S,
        batch: int = 32,
        threads: int = 8,
        config_ttl_s: float = 5.0,
        sent_ttl_s: float = DEAD_TTL_S,
        post_fn: Callable[..., int] = post,
    ) -> None:
        """``sent_ttl_s``: how long a lease's batch.finished marker is kept (as long as the
        lease's record, which a late submit needs to be told apart)."""
        self.r = redis
        self.store = WebhookStore(redis)
        self.leases = leases
        self.schedule = tuple(schedule)
        self.allow_http_loopback = allow_http_loopback
        self.clock = clock
        self.timeout_s = timeout_s
        self.batch = batch
        self.threads = threads
        self.config_ttl_s = config_ttl_s
        self.sent_ttl_s = int(sent_ttl_s)
        self.post_fn = post_fn
        self._claim = redis.register_script(_CLAIM)
        self._enqueue_once = redis.register_script(_ENQUEUE_ONCE)
        self._configs: dict[str, tuple[float, WebhookConfig | None]] = {}

    # -------------------------------------------------------------- events in
    def _config(self, vendor_id: str) -> WebhookConfig | None:
        """The vendor's endpoint, cached briefly: most vendors have none, and asking Redis on
        every answer would cost a round trip per request."""
        now = time.monotonic()
        hit = self._configs.get(vendor_id)
        if hit is not None and now - hit[0] < self.config_ttl_s:
            return hit[1]
        cfg = self.store.get(vendor_id)
        self._configs[vendor_id] = (now, cfg)
        return cfg

    def enqueue(
        self, vendor_id: str, event_type: str, data: dict[str, Any], *, once: str | None = None
    ) -> str | None:
        """Queue one event for a vendor; its message id, or None when it has no endpoint (or
        the marker key ``once`` was already set: it is set in the same step)."""
        if event_type not in EVENTS:
            raise ValueError(f"unknown event type {event_type!r}")
        if self._config(vendor_id) is None:
            return None
        now = self.clock()
        message_id = "msg_" + secrets.token_urlsafe(16)
        body = json.dumps(
            {
                "type": event_type,
                "timestamp": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
                "data": data,
            },
            separators=(",", ":"),
        )
        record: dict[str, Any] = {
            "vendor": vendor_id,
            "type": event_type,
            "body": body,
            "attempts": 0,
            "created": now,
            "state": "pending",
        }
        if once is not None:
            fields = [x for kv in record.items() for x in kv]
            queued = self._enqueue_once(
                keys=[once, keys.webhook_message(message_id), QUEUE],
                args=[self.sent_ttl_s, repr(now), message_id, *fields],
            )
            return message_id if queued else None
        pipe = self.r.pipeline()
        pipe.hset(keys.webhook_message(message_id), mapping=record)
        pipe.zadd(QUEUE, {message_id: now})
        pipe.execute()
        return message_id

    def on_expired(self, expired: list[dict[str, str]]) -> None:
        """``app.state.expired_hooks`` entry: one ``lease.expired`` per expired lease, queued
        once (a marker per lease, set in the same step), so an expiry run again after a crash
        sends none twice.  Raises after trying them all if any could not be queued, so the
        caller leaves those leases to be expired (and their callbacks queued) again."""
        failed = 0
        for lease in expired:
            try:
                self.enqueue(
                    lease["vendor"],
                    "lease.expired",
                    {
                        "lease_id": lease["lease_id"],
                        "worker_id": lease["worker_id"],
                        "unanswered": int(lease["unanswered"]),
                    },
                    once=keys.webhook_expired_sent(lease["lease_id"]),
                )
            except Exception:
                failed += 1
                log.exception("lease.expired callback not queued", extra={"lease": lease})
        if failed:
            raise RuntimeError(f"{failed} lease.expired callbacks not queued; will retry")

    def on_submitted(self, vendor_id: str, lease_id: str) -> None:
        """After answers to a lease: ``batch.finished`` once, when its last question is
        answered (a marker makes concurrent or retried submits send it only once)."""
        if self.leases is None:
            return
        try:
            if self._config(vendor_id) is None:
                return
            rec = self.leases.lease(vendor_id, lease_id)
            total = len(rec["refs"])
            if self.leases.answered_count(lease_id) < total:
                return
            self.enqueue(
                vendor_id,
                "batch.finished",
                {
                    "lease_id": lease_id,
                    "worker_id": rec["worker"],
                    "campaign": rec["campaign"],
                    "kind": rec["kind"],
                    "questions": total,
                },
                once=keys.webhook_sent(lease_id),
            )
        except Exception:
            log.exception("batch.finished callback not queued", extra={"lease_id": lease_id})

    # -------------------------------------------------------------- delivery
    def _headers(self, message_id: str, body: str, secret: str) -> dict[str, str]:
        now = self.clock()
        signature = Webhook(secret).sign(message_id, datetime.fromtimestamp(now, UTC), body)
        return {
            "content-type": "application/json",
            "user-agent": "maskprop-gateway/1",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now)),
            "webhook-signature": signature,
        }

    def _attempt(self, message_id: str) -> Attempt | None:
        rec = self.r.hgetall(keys.webhook_message(message_id))
        if not rec:
            self.r.zrem(QUEUE, message_id)
            return None
        vendor_id = rec[b"vendor"].decode()
        body = rec[b"body"].decode()
        cfg = self.store.get(vendor_id)  # fresh: a changed URL or secret applies at once
        status, error = 0, ""
        if cfg is None:
            error = "vendor has no webhook endpoint"
        else:
            try:
                status = self.post_fn(
                    cfg.url,
                    body.encode(),
                    self._headers(message_id, body, cfg.secret),
                    allow_http_loopback=self.allow_http_loopback,
                    timeout=self.timeout_s,
                )
                error = "" if 200 <= status < 300 else f"HTTP {status}"
            except (OSError, http.client.HTTPException, WebhookError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
        return self._record(message_id, vendor_id, status, error, final=cfg is None)

    def _record(
        self, message_id: str, vendor_id: str, status: int, error: str, *, final: bool
    ) -> Attempt:
        key = keys.webhook_message(message_id)
        now = self.clock()
        if not error:
            pipe = self.r.pipeline()
            pipe.zrem(QUEUE, message_id)
            pipe.delete(key)
            pipe.execute()
            return Attempt(message_id, vendor_id, status, "", "delivered")
        attempts = int(self.r.hincrby(key, "attempts", 1))
        pipe = self.r.pipeline()
        if final or attempts > len(self.schedule):
            pipe.zrem(QUEUE, message_id)
            pipe.hset(key, mapping={"state": "dead", "last_error": error, "died": now})
            pipe.expire(key, DEAD_TTL_S)
            pipe.zadd(DEAD, {message_id: now})
            pipe.zremrangebyscore(DEAD, "-inf", now - DEAD_TTL_S)
            outcome = "dead"
            log.warning(
                "webhook given up", extra={"vendor": vendor_id, "id": message_id, "error": error}
            )
        else:
            pipe.hset(key, "last_error", error)
            pipe.zadd(QUEUE, {message_id: now + self.schedule[attempts - 1]})
            outcome = "retry"
        pipe.execute()
        return Attempt(message_id, vendor_id, status, error, outcome)

    def deliver_due(self) -> list[Attempt]:
        """Claim the messages due now and try each once (blocking; run it off the event
        loop).  Returns what each attempt did."""
        now = self.clock()
        ids = [
            x.decode() if isinstance(x, bytes) else str(x)
            for x in self._claim(keys=[QUEUE], args=[now, self.batch, now + CLAIM_S])
        ]
        if not ids:
            return []
        if len(ids) == 1 or self.threads <= 1:
            done = [self._attempt(m) for m in ids]
        else:
            with ThreadPoolExecutor(min(self.threads, len(ids))) as pool:
                done = list(pool.map(self._attempt, ids))
        return [a for a in done if a is not None]

    def pending(self) -> int:
        return int(self.r.zcard(QUEUE))

    def dead(self, limit: int = 100) -> list[dict[str, str]]:
        """The newest dead records (message id, vendor, type, attempts, last error)."""
        out = []
        for raw in self.r.zrevrange(DEAD, 0, limit - 1):
            message_id = raw.decode()
            rec = self.r.hgetall(keys.webhook_message(message_id))
            if rec:
                fields = {k.decode(): v.decode() for k, v in rec.items() if k != b"body"}
                out.append({"id": message_id, **fields})
        return out


async def deliver_forever(hooks: Webhooks, poll_s: float = 1.0) -> None:
    """The delivery task: drain what is due, then sleep ``poll_s``."""
    while True:
        try:
            attempts = await asyncio.to_thread(hooks.deliver_due)
        except Exception:
            log.exception("webhook delivery failed; will retry")
            attempts = []
        if len(attempts) < hooks.batch:
            await asyncio.sleep(poll_s)


def install(
    app: Any,
    redis: Any,
    *,
    poll_s: float = 1.0,
    **options: Any,
) -> Callable[[], Awaitable[None]]:
    """Wire callbacks into a running app (call it in the lifespan, after ``app.state.gateway``
    and ``app.state.expired_hooks`` exist): listen to expired leases and, where the gateway
    offers ``submitted_hooks``, to finished ones; start the delivery task.  Returns the
    coroutine function that stops it.  ``options`` go to :class:`Webhooks`."""
    gateway = getattr(app.state, "gateway", None)
    if gateway is not None and hasattr(gateway, "record_ttl_s"):
        options.setdefault("sent_ttl_s", gateway.record_ttl_s)
    hooks = Webhooks(redis, leases=gateway, **options)
    app.state.webhooks = hooks
    app.state.expired_hooks.append(hooks.on_expired)
    submitted = getattr(gateway, "submitted_hooks", None)
    if submitted is not None:
        submitted.append(hooks.on_submitted)
    task = asyncio.create_task(deliver_forever(hooks, poll_s))

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop
