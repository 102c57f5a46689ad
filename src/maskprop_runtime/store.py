"""The key-value store: a real Redis server, or fakeredis in embedded mode (same API)."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


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
            where = url.split("@")[-1]  # never log a password
            if time.monotonic() > deadline:
                raise ConnectionError(f"cannot reach Redis at {where}: {exc}") from exc
            log.warning("cannot reach Redis, retrying", extra={"redis": where, "retry_in_s": delay})
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
