"""Signatures on the requests callbridge sends to the operator's own endpoints.

Scheme (``v1``): ``X-Callbridge-Timestamp: <unix seconds>`` and
``X-Callbridge-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``. The receiver
recomputes it over the raw body and refuses stale timestamps, which stops replays.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Callbridge-Timestamp"
SIGNATURE_HEADER = "X-Callbridge-Signature"


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def signed_headers(secret: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(
    secret: bytes, timestamp: str, body: bytes, sig: str, now: float | None = None, tolerance: float = 300
) -> bool:
    """For receivers (and tests): constant-time check plus a freshness window."""
    if not timestamp.isdigit():
        return False
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sig, signature(secret, int(timestamp), body))
