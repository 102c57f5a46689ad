"""The key-value store: a real Redis server, or fakeredis in embedded mode (same API)."""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def redacted(url: str) -> str:
    """host:port/db of a Redis URL, never its password."""
    u = urlsplit(url)
    return f"{u.hostname}:{u.port or 6379}{u.path or '/0'}"


def make_redis(url: str | None, *, connect_timeout_s: float = 120.0) -> Any:
    """A Redis client for ``url``; ``None`` gives an in-process store for embedded mode.

    Waits for the server with backoff and says clearly which address it cannot reach.
    """
    if url is None:
        import fakeredis

        return fakeredis.FakeRedis()
    import redis

    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
    delay, deadline = 0.5, time.monotonic() + connect_timeout_s
    while True:
        try:
            client.ping()
            return client
        except redis.exceptions.ConnectionError as exc:
            where = redacted(url)
            if time.monotonic() > deadline:
                raise ConnectionError(f"cannot reach Redis at {where}: {exc}") from exc
            log.warning("cannot reach Redis, retrying", extra={"redis": where, "retry_in_s": delay})
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
