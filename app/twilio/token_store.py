"""Single use of stream tokens across replicas: a token's nonce is marked used in Redis
(``SET NX`` with the token's own expiry), so a token redeemed on one replica is refused on
every other. Without ``REDIS_URL``, ``MachineTokenStore`` makes single use hold across the
worker processes of one machine (``--workers``), a process's own memory for one process
(docs/deploy.md).

The store is asked once per call, at the stream's start. If Redis cannot answer in time the
bridge does not refuse the call (a caller would meet a dead line): it checks single use in
its own process, logs the outage (one line for that call) and counts it.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis.asyncio as redis
from redis.exceptions import RedisError

from app import machine_db

KEY_PREFIX = "callbridge:stream-token:"
TIMEOUT_SECONDS = 1.0
"""Connect and command timeout: a store slower than this is treated as down for that call."""


class TokenStoreUnavailable(Exception):
    """Redis did not answer; the reason is in the message."""


class RedisTokenStore:
    def __init__(self, url: str) -> None:
        self._redis = redis.from_url(url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS)

    async def use_once(self, nonce: str, expires: int) -> bool:
        """True the first time a nonce is used anywhere; False for a replay."""
        try:
            created = await self._redis.set(KEY_PREFIX + nonce, b"1", nx=True, exat=expires)
        except (RedisError, OSError, TimeoutError) as exc:
            raise TokenStoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        return bool(created)

    async def close(self) -> None:
        await self._redis.aclose()


MAX_REMEMBERED = 100_000
"""Nonces kept at once (each until its token expires): far above what the calls admitted in
one token lifetime need; past it, a token is refused rather than the file growing without bound."""


class MachineTokenStore:
    """Single use across the worker processes of one machine: a nonce is inserted into the
    shared SQLite file (``app.machine_db``) in one transaction, and only the first insert of
    a nonce succeeds, whichever worker makes it. Synchronous: one short insert per call."""

    def __init__(self, path: Path, max_remembered: int = MAX_REMEMBERED) -> None:
        self._db = machine_db.connect(path)
        self.max_remembered = max_remembered

    def use_once(self, nonce: str, expires: int, now: float | None = None) -> str | None:
        """None the first time ``nonce`` is used on this machine, else why not. Raises
        ``sqlite3.Error`` if the file cannot be used (the caller falls back to its process)."""
        now = time.time() if now is None else now
        with machine_db.transaction(self._db) as db:
            db.execute("DELETE FROM used_tokens WHERE expires < ?", (now,))
            if db.execute("SELECT 1 FROM used_tokens WHERE nonce = ?", (nonce,)).fetchone():
                return "already used"
            (count,) = db.execute("SELECT COUNT(*) FROM used_tokens").fetchone()
            if count >= self.max_remembered:
                return "too many outstanding tokens"
            db.execute("INSERT INTO used_tokens (nonce, expires) VALUES (?, ?)", (nonce, expires))
        return None

    def remembered(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM used_tokens").fetchone()
        return int(count)

    def close(self) -> None:
        self._db.close()
