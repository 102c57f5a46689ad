"""Idempotency-Key (the Stripe convention): the first response to a key is stored per vendor
and replayed for retries; the same key with different parameters is a 422.

A key being worked on holds a short *running lease* (``RUNNING_LEASE_S``), renewed while its
request runs (:class:`Renewal`).  A gateway killed mid-request stops renewing, so a retry
with the same key takes the key over once the lease lapses (issue #18: the record used to
stay "running" for its whole 24 h TTL and every retry got 409).  The taken-over request runs
again: the answers' own exactly-once guarantee (one answer per lease, question and worker;
votes and gold scores are first-write-wins) makes the re-run apply what the dead request had
not, and nothing twice, and the answers' marks carry the key, so the re-run reports what the
first response would have.  Within the worker's lease only: a retry that arrives after the
lease itself expired gets 410 like any late answer, and answers the dead request had marked
but not yet voted on are lost (the questions go back to the pool).

Each call is one Lua round trip, as the ``SET NX`` it replaces was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from maskprop_gateway import keys

_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
TTL_S = 24 * 3600
log = logging.getLogger(__name__)
#: Seconds a running request holds its key without renewing it.
RUNNING_LEASE_S = 10.0

# KEYS[1] record; ARGV fingerprint, owner, now, lease seconds, ttl seconds.
# -> {"go"} | {"takeover"} | {"busy"} | {"conflict"} | {"done", raw}
_BEGIN = """
local raw = redis.call('get', KEYS[1])
local now, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
local fresh = cjson.encode({fp=ARGV[1], state='running', owner=ARGV[2], until_=now + lease})
if not raw then
  redis.call('set', KEYS[1], fresh, 'EX', ARGV[5])
  return {'go'}
end
local rec = cjson.decode(raw)
if rec.fp ~= ARGV[1] then return {'conflict'} end
if rec.state ~= 'running' then return {'done', raw} end
if tonumber(rec.until_ or 0) > now then return {'busy'} end
redis.call('set', KEYS[1], fresh, 'EX', ARGV[5])
return {'takeover'}
"""

# KEYS[1] record; ARGV owner, new value ('' to renew), now, lease seconds, ttl seconds.
# Only the owner may renew, finish or abandon: a request whose lease lapsed and was taken
# over must not overwrite its successor's record.  -> 1 done, 0 not the owner.
_OWNED = """
local raw = redis.call('get', KEYS[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec.state ~= 'running' or rec.owner ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  rec.until_ = tonumber(ARGV[3]) + tonumber(ARGV[4])
  redis.call('set', KEYS[1], cjson.encode(rec), 'EX', ARGV[5])
elseif ARGV[2] == 'DEL' then
  redis.call('del', KEYS[1])
else
  redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[5])
end
return 1
"""


class IdempotencyConflict(Exception):
    """Same key, different request (422), or the first request is still running (409)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Stored:
    status: int
    body: Any


@dataclass(frozen=True)
class Held:
    """The key is now this request's: run it (``recovering``: a dead request held it)."""

    owner: str
    recovering: bool


class IdempotencyStore:
    def __init__(
        self,
        redis: Any,
        *,
        running_lease_s: float = RUNNING_LEASE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.r = redis
        self.running_lease_s = running_lease_s
        self.clock = clock
        self._begin = redis.register_script(_BEGIN)
        self._owned = redis.register_script(_OWNED)
        # keys held by requests of this process: (vendor, key) -> owner, renewed together by
        # one thread (the answer route runs on the event loop, so a loop task could not)
        self._held: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    @staticmethod
    def fingerprint(payload: Any) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _k(self, vendor_id: str, key: str) -> str:
        if not _KEY.match(key):
            raise IdempotencyConflict(400, "Idempotency-Key: 1-128 of A-Z a-z 0-9 _ . : -")
        return keys.idempotency(vendor_id, key)

    def begin(self, vendor_id: str, key: str, fingerprint: str) -> Held | Stored:
        """:class:`Held`: go ahead (the key is now held for ``running_lease_s``; renew it
        while the request runs).  :class:`Stored`: replay it."""
        owner = secrets.token_hex(8)
        out = self._begin(
            keys=[self._k(vendor_id, key)],
            args=[fingerprint, owner, repr(self.clock()), repr(self.running_lease_s), TTL_S],
        )
        verdict = _s(out[0])
        if verdict == "conflict":
            raise IdempotencyConflict(422, "Idempotency-Key reused with different parameters")
        if verdict == "busy":
            raise IdempotencyConflict(409, "a request with this Idempotency-Key is in progress")
        if verdict == "done":
            rec = json.loads(_s(out[1]))
            return Stored(status=int(rec["status"]), body=rec["body"])
        return Held(owner=owner, recovering=verdict == "takeover")

    def _if_owner(self, vendor_id: str, key: str, owner: str, value: str) -> bool:
        args = [owner, value, repr(self.clock()), repr(self.running_lease_s), TTL_S]
        return bool(self._owned(keys=[self._k(vendor_id, key)], args=args))

    def renew(self, vendor_id: str, key: str, owner: str) -> bool:
        """Extend the running lease; False once another request took the key over."""
        return self._if_owner(vendor_id, key, owner, "")

    def finish(
        self, vendor_id: str, key: str, fingerprint: str, status: int, body: Any, owner: str
    ) -> bool:
        """Store the response for replays (if the key is still this request's)."""
        rec = {"fp": fingerprint, "state": "done", "status": status, "body": body}
        return self._if_owner(vendor_id, key, owner, json.dumps(rec))

    def abandon(self, vendor_id: str, key: str, owner: str) -> None:
        """The request failed with an error: let a retry run it again at once."""
        self._if_owner(vendor_id, key, owner, "DEL")

    @contextmanager
    def holding(self, vendor_id: str, key: str, owner: str) -> Iterator[None]:
        """Keep the key's running lease renewed while the block runs.  A request shorter than
        a third of the lease (nearly all) makes no extra Redis call; a dead process renews
        nothing, so its keys lapse and a retry takes them over."""
        with self._lock:
            self._held[(vendor_id, key)] = owner
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_all, daemon=True)
                self._renewer.start()
        try:
            yield
        finally:
            with self._lock:
                if self._held.get((vendor_id, key)) == owner:
                    del self._held[(vendor_id, key)]

    def _renew_all(self) -> None:
        every = self.running_lease_s / 3
        while True:
            time.sleep(every)
            with self._lock:
                held = list(self._held.items())
            for (vendor_id, key), owner in held:
                try:
                    self.renew(vendor_id, key, owner)
                except Exception:  # a missed renewal only risks a takeover, which is safe
                    log.warning("idempotency key renewal failed", exc_info=True)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
