"""Idempotency-Key (the Stripe convention): the first response to a key is stored per vendor
and replayed for retries; the same key with different parameters is a 422."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from maskprop_gateway import keys

_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
TTL_S = 24 * 3600


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


class IdempotencyStore:
    def __init__(self, redis: Any) -> None:
        self.r = redis

    @staticmethod
    def fingerprint(payload: Any) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _k(self, vendor_id: str, key: str) -> str:
        if not _KEY.match(key):
            raise IdempotencyConflict(400, "Idempotency-Key: 1-128 of A-Z a-z 0-9 _ . : -")
        return keys.idempotency(vendor_id, key)

    def begin(self, vendor_id: str, key: str, fingerprint: str) -> Stored | None:
        """None: go ahead (the key is now held).  Stored: replay it."""
        k = self._k(vendor_id, key)
        if self.r.set(k, json.dumps({"fp": fingerprint, "state": "running"}), nx=True, ex=TTL_S):
            return None
        raw = self.r.get(k)
        if raw is None:  # expired in between: try once more
            return self.begin(vendor_id, key, fingerprint)
        rec = json.loads(raw)
        if rec["fp"] != fingerprint:
            raise IdempotencyConflict(422, "Idempotency-Key reused with different parameters")
        if rec["state"] == "running":
            raise IdempotencyConflict(409, "a request with this Idempotency-Key is in progress")
        return Stored(status=rec["status"], body=rec["body"])

    def finish(self, vendor_id: str, key: str, fingerprint: str, status: int, body: Any) -> None:
        rec = {"fp": fingerprint, "state": "done", "status": status, "body": body}
        self.r.set(self._k(vendor_id, key), json.dumps(rec), ex=TTL_S)

    def abandon(self, vendor_id: str, key: str) -> None:
        """The first request failed before any effect: let a retry run it again."""
        self.r.delete(self._k(vendor_id, key))
