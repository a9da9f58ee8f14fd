"""One-time stream tokens: proof that a Media Streams connection follows our own TwiML.

The webhook (which checked Twilio's signature) mints a token bound to the CallSid, the agent
profile chosen for the dialled number and an expiry; Twilio hands both back in
``start.customParameters``, and a profile name changed on the way fails the signature. The media socket opens an agent
session (which costs money) only for a valid, unexpired, unused token for that very call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass

from app.observability.logging import get_logger
from app.twilio.token_store import MachineTokenStore

log = get_logger(component="stream_tokens")


@dataclass(frozen=True)
class Verified:
    """A token whose signature and expiry are good: ``nonce`` is what single use is about."""

    nonce: str
    expires: int


class StreamTokens:
    def __init__(
        self,
        secret: bytes,
        ttl_seconds: float = 60.0,
        max_remembered: int = 100_000,
        machine: MachineTokenStore | None = None,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("stream token secret must be at least 16 bytes")
        self._secret = secret
        self.ttl = ttl_seconds
        self._used: dict[str, float] = {}  # nonce -> expiry, to refuse replays until expiry
        self._max_remembered = max_remembered
        self.machine = machine
        """With worker processes: single use is checked in the file they share, not in memory."""

    def _sign(self, call_sid: str, profile: str, expires: int, nonce: str) -> str:
        mac = hmac.new(self._secret, f"{call_sid}|{profile}|{expires}|{nonce}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")

    def mint(self, call_sid: str, profile: str = "", now: float | None = None) -> str:
        now = time.time() if now is None else now
        expires = int(now + self.ttl)
        nonce = secrets.token_urlsafe(12)
        return f"{expires}.{nonce}.{self._sign(call_sid, profile, expires, nonce)}"

    def verify(self, token: str, call_sid: str, profile: str = "", now: float | None = None) -> Verified | str:
        """Signature, call, profile and expiry, without using the token up: what to mark as
        used (``Verified``), or why the token is no good."""
        now = time.time() if now is None else now
        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) != 3 or not parts[0].isdigit():
            return "malformed"
        expires, nonce, signature = int(parts[0]), parts[1], parts[2]
        if not hmac.compare_digest(signature, self._sign(call_sid, profile, expires, nonce)):
            return "bad signature or wrong call"
        if expires < now:
            return "expired"
        return Verified(nonce, expires)

    def use_locally(self, verified: Verified, now: float | None = None) -> str | None:
        """Mark a verified token used on this machine (every worker process) or, with one
        process, in this process: None the first time, else why not. Should the machine's
        file fail, this process's memory still refuses replays to this worker (logged)."""
        now = time.time() if now is None else now
        if self.machine is not None:
            try:
                return self.machine.use_once(verified.nonce, verified.expires, now)
            except sqlite3.Error as exc:
                log.error("machine_token_store_unavailable", detail=str(exc), fallback="checked in this process")
        self._forget_expired(now)
        if verified.nonce in self._used:
            return "already used"
        if len(self._used) >= self._max_remembered:
            return "too many outstanding tokens"
        self._used[verified.nonce] = float(verified.expires)
        return None

    def redeem(self, token: str, call_sid: str, profile: str = "", now: float | None = None) -> str | None:
        """Consume ``token`` for ``call_sid`` and ``profile`` in this process. None when
        accepted, else why not. (With Redis, the pump uses ``verify`` and the store.)"""
        verified = self.verify(token, call_sid, profile, now)
        if isinstance(verified, str):
            return verified
        return self.use_locally(verified, now)

    def _forget_expired(self, now: float) -> None:
        # one redeem per call, and only unexpired nonces are kept: this stays small
        for nonce in [n for n, exp in self._used.items() if exp < now]:
            del self._used[nonce]
