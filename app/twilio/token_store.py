"""Single use of stream tokens across replicas: a token's nonce is marked used in Redis
(``SET NX`` with the token's own expiry), so a token redeemed on one replica is refused on
every other. Without ``REDIS_URL`` single use holds per process only (README, "Deploy").

The store is asked once per call, at the stream's start. If Redis cannot answer in time the
bridge does not refuse the call (a caller would meet a dead line): it checks single use in
its own process, logs the outage (one line for that call) and counts it.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.exceptions import RedisError

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
