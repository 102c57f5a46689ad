"""Vendor API keys (stored hashed, rotatable) and signed worker tokens for the annotator page.

A key is ``mpk_<vendor_id>_<secret>``; Redis keeps only HMAC-SHA256(pepper, key), so a leaked
database does not leak keys.  A worker token is ``<payload b64>.<HMAC b64>`` binding vendor,
worker, campaign and expiry; the annotator page sends it instead of the vendor's key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from maskprop_gateway import keys

_VENDOR = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_KEY = re.compile(r"^mpk_([a-z0-9][a-z0-9-]{0,31})_([A-Za-z0-9_-]{43})$")
WORKER_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class AuthError(Exception):
    """Missing or invalid credentials (HTTP 401)."""


@dataclass(frozen=True)
class Vendor:
    vendor_id: str
    name: str


@dataclass(frozen=True)
class WorkerClaims:
    vendor_id: str
    worker_id: str
    campaign: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyStore:
    """Vendors and their hashed keys in Redis (:func:`maskprop_gateway.keys.vendor`)."""

    def __init__(self, redis: Any, pepper: str) -> None:
        self.r = redis
        self._pepper = pepper.encode()

    def _hash(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()

    def create(self, vendor_id: str, name: str) -> str:
        """Register a vendor; returns its key (shown once, never stored in clear)."""
        if not _VENDOR.match(vendor_id):
            raise ValueError("vendor id: 1-32 of a-z 0-9 -, starting with a letter or digit")
        key = f"mpk_{vendor_id}_{secrets.token_urlsafe(32)}"
        created = self.r.hsetnx(keys.vendor(vendor_id), "key_hash", self._hash(key))
        if not created:
            raise ValueError(f"vendor {vendor_id!r} exists; rotate its key instead")
        self.r.hset(keys.vendor(vendor_id), mapping={"name": name, "created": time.time()})
        return key

    def rotate(self, vendor_id: str) -> str:
        """A new key for an existing vendor; the old one stops working at once."""
        if not self.r.exists(keys.vendor(vendor_id)):
            raise ValueError(f"no vendor {vendor_id!r}")
        key = f"mpk_{vendor_id}_{secrets.token_urlsafe(32)}"
        self.r.hset(keys.vendor(vendor_id), "key_hash", self._hash(key))
        return key

    def verify(self, key: str | None) -> Vendor:
        m = _KEY.match(key or "")
        if not m:
            raise AuthError("missing or malformed API key")
        vendor_id = m.group(1)
        stored = self.r.hmget(keys.vendor(vendor_id), ["key_hash", "name"])
        if stored[0] is None or not hmac.compare_digest(stored[0].decode(), self._hash(key or "")):
            raise AuthError("invalid API key")
        return Vendor(vendor_id=vendor_id, name=(stored[1] or b"").decode())

    # ------------------------------------------------------------------ worker tokens
    def worker_token(self, claims: WorkerClaims) -> str:
        payload = _b64(json.dumps(claims.__dict__, sort_keys=True).encode())
        sig = _b64(hmac.new(self._pepper, b"worker:" + payload.encode(), hashlib.sha256).digest())
        return f"{payload}.{sig}"

    def verify_worker(self, token: str | None, now: float | None = None) -> WorkerClaims:
        try:
            payload, sig = (token or "").split(".")
            expected = hmac.new(self._pepper, b"worker:" + payload.encode(), hashlib.sha256)
            if not hmac.compare_digest(_unb64(sig), expected.digest()):
                raise AuthError("invalid worker token")
            claims = WorkerClaims(**json.loads(_unb64(payload)))
        except (ValueError, TypeError, json.JSONDecodeError):
            raise AuthError("malformed worker token") from None
        if claims.expires < (now if now is not None else time.time()):
            raise AuthError("worker token expired")
        return claims
