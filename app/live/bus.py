"""A small publish/subscribe bus for the operator console's view of live calls.

A call lives in one worker process; the console may be served by another worker, or by another
replica. Everything that crosses between them goes through a ``Bus``, one interface with three
transports that behave alike:

- ``LocalBus``: one process, no Redis (``serve`` with one worker).
- ``BrokerBus``: the workers of one ``serve --workers N`` without Redis; the supervisor runs a
  ``Broker`` on a Unix socket in the shared directory and every worker connects to it.
- ``RedisBus``: every replica sharing ``REDIS_URL`` (Redis pub/sub).

Publishing is called from a call's hot path, so it never waits and never fails loudly: it puts
the message in a bounded outbox that one writer task drains, and when the outbox is full, the
transport is down or the bus is closed, the message is dropped and counted in ``dropped``.
Delivery is at most once, in publishing order per publisher; a handler runs on the event loop,
never inside ``publish``'s caller. A bus delivers its own messages to its own handlers (through
the broker or Redis, like anyone else's). A message published on this bus after ``subscribe()``
returned is sent only once the subscription is in effect, so an answer to it is not missed.
Everything is called on the event loop's thread; nothing here raises for I/O problems.

Wire format between ``BrokerBus`` and ``Broker`` (both directions): frames of
``length:u32be | op:u8 | channel_length:u16be | channel (UTF-8) | payload``, where ``length``
counts everything after itself. ``op`` is SUB, UNSUB (no payload) or PUB; the broker sends only
PUB. A malformed frame closes the connection that sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import stat
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.observability.log_limit import LogLimiter
from app.observability.logging import get_logger

ENV_LIVE_BUS = "CALLBRIDGE_LIVE_BUS"  # set by the supervisor: the broker's socket path, for workers
REDIS_PREFIX = "callbridge:live:"  # Redis channel = prefix + bus channel
BROKER_SOCKET_NAME = "live-bus.sock"  # in the workers' shared directory (multiproc_dir)

OUTBOX_LIMIT = 2048
"""Messages waiting in one bus's outbox for its writer task; past it, publish drops."""
OUTBOX_BYTES_LIMIT = 8 * 1024 * 1024
"""Payload bytes waiting in one outbox: 2048 large messages must not mean gigabytes."""
MAX_CHANNEL_BYTES = 200
"""Length of a channel name in UTF-8 bytes (a call id and a word or two fit many times)."""
MAX_PAYLOAD_BYTES = 1024 * 1024
"""Size of one message; a larger one is dropped by publish and refused by the broker."""
MAX_CHANNELS = 10_000
"""Channels one bus (or one broker connection) subscribes to at once: a few per live call."""
WRITE_BATCH = 64
"""Messages the writer sends in one go (one Redis pipeline, one socket drain)."""
WRITE_BATCH_BYTES = 256 * 1024
"""Payload bytes in one go (a batch always takes at least one message)."""
CONNECT_TIMEOUT_SECONDS = 1.0
"""Connect and Redis command timeout: a peer slower than this is treated as down."""
RECONNECT_FIRST_SECONDS = 0.05
"""First wait before reconnecting; it doubles at each failure..."""
RECONNECT_MAX_SECONDS = 5.0
"""...up to this: a restarted broker or Redis is found again within about this long."""
IDLE_PING_SECONDS = 15.0
"""Silence on the Redis subscription connection after which a PING checks it; no answer
within as long again and the connection is taken for dead (a peer gone without a reset)."""
CLOSE_FLUSH_SECONDS = 1.0
"""How long ``close()`` waits for the outbox to be sent (a call's last events)."""
BROKER_CONNECTION_BUFFER_BYTES = 4 * 1024 * 1024
"""Bytes the broker holds for one connection that reads too slowly; past it, its messages drop."""
BROKER_MAX_CONNECTIONS = 256
"""Connections the broker accepts at once (workers: at most ``MAX_WORKERS``, plus restarts)."""
UNIX_PATH_MAX = 103
"""Bytes of a Unix socket path (sun_path: 108 on Linux, 104 on macOS, with the final NUL)."""

OP_SUB, OP_UNSUB, OP_PUB = 1, 2, 3
_HEADER = struct.Struct("!IBH")  # length, op, channel length
_LENGTH = struct.Struct("!I")
_BODY_HEAD = struct.Struct("!BH")
_MAX_BODY = _BODY_HEAD.size + MAX_CHANNEL_BYTES + MAX_PAYLOAD_BYTES

Handler = Callable[[bytes], None]


class Bus(Protocol):
    dropped: int

    async def start(self) -> None: ...
    def publish(self, channel: str, data: bytes) -> bool: ...
    def subscribe(self, channel: str, handler: Handler) -> Subscription: ...
    async def close(self) -> None: ...


def bus_for(redis_url: str | None, broker_path: str | os.PathLike[str] | None) -> Bus:
    """Redis when there is a URL (every replica), else the supervisor's broker (every worker
    of this instance), else this process alone."""
    if redis_url:
        return RedisBus(redis_url)
    if broker_path:
        return BrokerBus(broker_path)
    return LocalBus()


def broker_path_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """The broker's path a supervisor gave this worker, if any."""
    return env.get(ENV_LIVE_BUS) or None


async def start_broker(multiproc_dir: Path) -> Broker:
    """The supervisor's broker at ``multiproc_dir/live-bus.sock``; when that path is too long
    for a Unix socket, in a new private temporary directory instead (removed by ``close()``).
    Give workers ``str(broker.path)`` in ``ENV_LIVE_BUS``."""
    path = multiproc_dir / BROKER_SOCKET_NAME
    own_dir: Path | None = None
    if len(os.fsencode(path.absolute())) > UNIX_PATH_MAX:
        own_dir = Path(tempfile.mkdtemp(prefix="callbridge-bus-"))
        path = own_dir / BROKER_SOCKET_NAME
    broker = Broker(path, remove_dir=own_dir)
    try:
        await broker.start()
    except BaseException:
        await broker.close()
        raise
    return broker


def check_channel(channel: str) -> bytes:
    """The channel's UTF-8 bytes; ValueError for a name no transport can carry (a bug)."""
    if not channel or len(channel) > MAX_CHANNEL_BYTES:
        raise ValueError(f"a channel name has 1 to {MAX_CHANNEL_BYTES} bytes, not {len(channel)} characters")
    encoded = channel.encode()  # UnicodeEncodeError (a ValueError) for a lone surrogate
    if len(encoded) > MAX_CHANNEL_BYTES:
        raise ValueError(f"a channel name has 1 to {MAX_CHANNEL_BYTES} bytes, not {len(encoded)}")
    return encoded


class Subscription:
    """One handler on one channel; ``close()`` stops its delivery at once."""

    __slots__ = ("_bus", "channel", "closed", "handler")

    def __init__(self, bus: _BusCore | None, channel: str, handler: Handler) -> None:
        self._bus = bus
        self.channel = channel
        self.handler = handler
        self.closed = bus is None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bus is not None:
            self._bus._unsubscribe(self)
            self._bus = None


class _Outbox:
    """Messages waiting for the writer, bounded in count and in bytes."""

    __slots__ = ("_items", "bytes")

    def __init__(self) -> None:
        self._items: deque[tuple[str, bytes]] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, channel: str, data: bytes) -> bool:
        if len(self._items) >= OUTBOX_LIMIT or self.bytes + len(data) > OUTBOX_BYTES_LIMIT:
            return False
        self._items.append((channel, data))
        self.bytes += len(data)
        return True

    def take(self, count: int = WRITE_BATCH, size: int = WRITE_BATCH_BYTES) -> list[tuple[str, bytes]]:
        batch: list[tuple[str, bytes]] = []
        taken = 0
        while self._items and len(batch) < count and (not batch or taken + len(self._items[0][1]) <= size):
            item = self._items.popleft()
            taken += len(item[1])
            batch.append(item)
        self.bytes -= taken
        return batch

    def clear(self) -> int:
        count = len(self._items)
        self._items.clear()
        self.bytes = 0
        return count


class _Backoff:
    """Waits between reconnection attempts: doubling, jittered (workers reconnecting to a
    restarted broker do not all come at once), capped."""

    def __init__(self) -> None:
        self._next = RECONNECT_FIRST_SECONDS

    def reset(self) -> None:
        self._next = RECONNECT_FIRST_SECONDS

    def delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, RECONNECT_MAX_SECONDS)
        return delay * random.uniform(0.5, 1.0)


class _BusCore:
    """Subscriptions, the outbox and delivery: what the three transports share."""

    transport = "core"

    def __init__(self) -> None:
        self.dropped = 0
        self.handler_errors = 0
        self._subs: dict[str, tuple[Subscription, ...]] = {}
        self._outbox = _Outbox()
        self._closed = False
        self._log = get_logger(component="live_bus", transport=self.transport)
        self._limiter = LogLimiter()

    def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """``handler(data)`` for each message on ``channel`` from now on, on the event loop.
        ValueError for a bad channel name, or past ``MAX_CHANNELS`` channels."""
        check_channel(channel)
        if self._closed:
            return Subscription(None, channel, handler)
        sub = Subscription(self, channel, handler)
        subs = self._subs.get(channel)
        if subs is None:
            if len(self._subs) >= MAX_CHANNELS:
                raise ValueError(f"this bus already has {MAX_CHANNELS} channels")
            self._subs[channel] = (sub,)
            self._channels_changed()
        else:
            self._subs[channel] = (*subs, sub)  # a new tuple: a delivery under way keeps its own
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is None:
            return
        rest = tuple(s for s in subs if s is not sub)
        if rest:
            self._subs[sub.channel] = rest
        else:
            del self._subs[sub.channel]
            self._channels_changed()

    def _channels_changed(self) -> None:
        """A channel got its first handler here, or lost its last: the transport follows."""

    def _enqueue(self, channel: str, data: bytes) -> bool:
        check_channel(channel)
        if len(data) > MAX_PAYLOAD_BYTES:
            self.dropped += 1
            self._limiter.warn(self._log, "live_bus_message_too_large", channel=channel, bytes=len(data))
            return False
        if self._closed or not self._outbox.put(channel, data):
            self.dropped += 1
            return False
        return True

    def _deliver(self, channel: str, data: bytes) -> None:
        for sub in self._subs.get(channel, ()):
            if sub.closed:  # closed by a handler before it in this very delivery
                continue
            try:
                sub.handler(data)
            except Exception as exc:
                self.handler_errors += 1
                self._limiter.warn(
                    self._log, "live_bus_handler_failed", channel=channel, error=f"{type(exc).__name__}: {exc}"
                )

    def _close_subscriptions(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.closed = True
                sub._bus = None
        self._subs.clear()


class LocalBus(_BusCore):
    """One process: messages go from the outbox to this process's handlers, each batch in a
    callback of its own (``loop.call_soon``)."""

    transport = "local"

    def __init__(self) -> None:
        super().__init__()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def publish(self, channel: str, data: bytes) -> bool:
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to deliver on: nobody can be listening
                check_channel(channel)
                self.dropped += 1
                return False
        if not self._enqueue(channel, data):
            return False
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._drain)
        return True

    def _drain(self) -> None:
        self._scheduled = False
        # only what was queued before this callback: what handlers publish now comes next time
        for channel, data in self._outbox.take(len(self._outbox), OUTBOX_BYTES_LIMIT):
            self._deliver(channel, data)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.dropped += self._outbox.clear()
        self._close_subscriptions()


class _RemoteBus(_BusCore):
    """A bus with a connection: one writer task drains the outbox; while the connection is
    down, ``publish`` drops at once and a task reconnects with backoff."""

    def __init__(self) -> None:
        super().__init__()
        self._wake = asyncio.Event()  # the writer has work: a message, a channel change, closing
        self._idle = asyncio.Event()  # the writer has sent everything it was given
        self._first_attempt = asyncio.Event()  # the first connection attempt is over, either way
        self._channels_dirty = False
        self._down = False  # known unreachable: publish drops instead of queueing
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    async def start(self) -> None:
        """Start connecting; return once the first attempt is over (connected or not)."""
        if self._started or self._closed:
            return
        self._started = True
        self._tasks = [asyncio.get_running_loop().create_task(c) for c in self._loops()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), 3 * CONNECT_TIMEOUT_SECONDS)

    def _loops(self) -> list[Coroutine[Any, Any, None]]:
        raise NotImplementedError

    def publish(self, channel: str, data: bytes) -> bool:
        if self._down:
            check_channel(channel)
            self.dropped += 1
            return False
        if not self._enqueue(channel, data):
            return False
        self._wake.set()
        return True

    def _channels_changed(self) -> None:
        self._channels_dirty = True
        self._wake.set()

    def _went_down(self, side: str, exc: BaseException) -> None:
        """One warning per outage; what waits in the outbox would be stale by the time the
        connection is back, so it goes (counted)."""
        self.dropped += self._outbox.clear()
        if not self._down:
            self._down = True
            self._limiter.warn(self._log, "live_bus_unavailable", side=side, error=f"{type(exc).__name__}: {exc}")

    def _came_up(self, side: str) -> None:
        if self._down:
            self._down = False
            self._log.info("live_bus_reconnected", side=side)

    async def close(self) -> None:
        """Send what is queued (within ``CLOSE_FLUSH_SECONDS``), then disconnect."""
        if self._closed:
            return
        self._closed = True  # publish drops from now on, so the outbox only empties
        if self._started and not self._down and (self._outbox or not self._idle.is_set()):
            if self._outbox:
                self._idle.clear()  # set again by the writer once it has sent them
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CLOSE_FLUSH_SECONDS)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.dropped += self._outbox.clear()
        self._close_subscriptions()
        await self._disconnect()

    async def _disconnect(self) -> None:
        pass


async def _until_one_ends(*coros: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines together until one of them ends; cancel the others; raise what ended
    it (a connection's reader and writer: either failing ends the connection)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        raise ConnectionError("connection ended")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- Redis ------------------------------------------------------------------------------------


class RedisBus(_RemoteBus):
    """Redis pub/sub: one connection publishes (pipelined batches), one PubSub connection holds
    the subscriptions, a channel being SUBSCRIBEd at its first handler here and UNSUBSCRIBEd
    after its last. Each side reconnects on its own; the subscriptions are made again."""

    transport = "redis"

    def __init__(self, url: str) -> None:
        super().__init__()
        # no retries inside redis-py: a failure comes back here at once, where the bus's own
        # backoff and outage accounting apply
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._sub_wake = asyncio.Event()  # the subscriber side has channels to (un)subscribe
        self._sub_live = False  # a PubSub connection is up
        self._sub_down = False
        self._unconfirmed = 0  # (un)subscriptions sent and not yet answered by Redis
        self._settled = asyncio.Event()  # every channel change is in effect at Redis
        self._settled.set()
        self._pub_first = asyncio.Event()
        self._sub_first = asyncio.Event()

    def _loops(self) -> list[Coroutine[Any, Any, None]]:
        return [self._publishing(), self._subscribing(), self._both_first_attempts()]

    async def _both_first_attempts(self) -> None:
        await self._pub_first.wait()
        await self._sub_first.wait()
        self._first_attempt.set()

    def _channels_changed(self) -> None:
        self._channels_dirty = True
        if self._sub_live:
            self._settled.clear()  # publishes from now on wait until Redis has the change
        self._sub_wake.set()

    async def _publishing(self) -> None:
        backoff = _Backoff()
        connected = False
        while True:
            batch: list[tuple[str, bytes]] = []
            try:
                if not connected:
                    await self._redis.ping()
                    connected = True
                    self._came_up("publish")
                    backoff.reset()
                    self._pub_first.set()
                await self._wait_for_messages()
                if not self._settled.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._settled.wait(), CONNECT_TIMEOUT_SECONDS)
                batch = self._outbox.take()
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel, data in batch:
                        pipe.publish(REDIS_PREFIX + channel, data)
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                connected = False
                self.dropped += len(batch)
                self._went_down("publish", exc)
                self._pub_first.set()
                await asyncio.sleep(backoff.delay())

    async def _wait_for_messages(self) -> None:
        """Until there is something to publish; says so to ``close()`` while there is not."""
        while not self._outbox:
            self._idle.set()
            self._wake.clear()
            await self._wake.wait()
        self._idle.clear()

    async def _subscribing(self) -> None:
        backoff = _Backoff()
        while True:
            pubsub: Any = self._redis.pubsub()  # redis-py leaves PubSub's methods unannotated
            try:
                await asyncio.wait_for(pubsub.connect(), 2 * CONNECT_TIMEOUT_SECONDS)
                backoff.reset()
                if self._sub_down:
                    self._sub_down = False
                    self._log.info("live_bus_reconnected", side="subscribe")
                self._sub_live = True
                self._channels_dirty = True  # a new connection: every channel is subscribed again
                if self._subs:
                    self._settled.clear()
                self._sub_wake.set()
                self._sub_first.set()
                await _until_one_ends(self._sync_channels(pubsub), self._read(pubsub))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._sub_down:
                    self._sub_down = True
                    self._limiter.warn(
                        self._log, "live_bus_unavailable", side="subscribe", error=f"{type(exc).__name__}: {exc}"
                    )
            finally:
                self._sub_live = False
                self._unconfirmed = 0
                self._settled.set()  # nothing to wait for until the connection is back
                self._sub_first.set()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff.delay())

    async def _sync_channels(self, pubsub: Any) -> None:
        """Make Redis's subscriptions on this connection those with a handler here."""
        sent: set[str] = set()
        while True:
            if not self._channels_dirty:
                if self._unconfirmed == 0:
                    self._settled.set()
                self._sub_wake.clear()
                await self._sub_wake.wait()
                continue
            self._channels_dirty = False
            wanted = set(self._subs)
            added, removed = wanted - sent, sent - wanted
            if added:
                self._unconfirmed += len(added)
                await pubsub.subscribe(*(REDIS_PREFIX + c for c in added))
            if removed:
                self._unconfirmed += len(removed)
                await pubsub.unsubscribe(*(REDIS_PREFIX + c for c in removed))
            sent = wanted

    async def _read(self, pubsub: Any) -> None:
        prefix = REDIS_PREFIX.encode()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=IDLE_PING_SECONDS)
            if message is None:
                if pinged:
                    raise TimeoutError("Redis did not answer a PING on the subscription connection")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            kind = message["type"]
            if kind == "message":
                channel = message["channel"]
                if isinstance(channel, bytes) and channel.startswith(prefix):
                    with contextlib.suppress(UnicodeDecodeError):
                        self._deliver(channel[len(prefix) :].decode(), message["data"])
            elif kind in ("subscribe", "unsubscribe"):
                self._unconfirmed = max(0, self._unconfirmed - 1)
                if self._unconfirmed == 0 and not self._channels_dirty:
                    self._settled.set()

    async def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()


# --- broker -----------------------------------------------------------------------------------


def _frame(op: int, channel: bytes, payload: bytes = b"") -> list[bytes]:
    """One frame as parts for ``writelines`` (the payload is not copied). Never an empty part:
    on CPython 3.13.0 an empty part left the socket transport unable to close."""
    head = _HEADER.pack(_BODY_HEAD.size + len(channel) + len(payload), op, len(channel)) + channel
    return [head, payload] if payload else [head]


class MalformedFrame(Exception):
    """A peer broke the wire format; its connection is closed."""


def _parse_body(buffer: bytes | bytearray, start: int, end: int) -> tuple[int, bytes, int]:
    """(op, channel, payload offset) of the frame body ``buffer[start:end]``; MalformedFrame
    if it is not one. Offsets rather than a slice: no copy of the payload, no memoryview
    pinning the broker's buffer."""
    if end - start < _BODY_HEAD.size:
        raise MalformedFrame("frame too short")
    op, channel_length = _BODY_HEAD.unpack_from(buffer, start)
    if op not in (OP_SUB, OP_UNSUB, OP_PUB):
        raise MalformedFrame(f"unknown op {op}")
    channel_at = start + _BODY_HEAD.size
    payload_at = channel_at + channel_length
    if not 0 < channel_length <= MAX_CHANNEL_BYTES or payload_at > end:
        raise MalformedFrame(f"bad channel length {channel_length}")
    channel = bytes(buffer[channel_at:payload_at])
    try:
        channel.decode()
    except UnicodeDecodeError:
        raise MalformedFrame("channel is not UTF-8") from None
    if op != OP_PUB and payload_at != end:
        raise MalformedFrame("payload on a subscription frame")
    return op, channel, payload_at


class BrokerBus(_RemoteBus):
    """A worker's connection to the supervisor's ``Broker``: one Unix socket carries this
    process's subscriptions and messages both ways, so a SUB always reaches the broker before
    a PUB published after it."""

    transport = "broker"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.fspath(path)

    def _loops(self) -> list[Coroutine[Any, Any, None]]:
        return [self._connecting()]

    async def _connecting(self) -> None:
        backoff = _Backoff()
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.path), CONNECT_TIMEOUT_SECONDS
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._went_down("broker", exc)
                self._first_attempt.set()
                await asyncio.sleep(backoff.delay())
                continue
            self._came_up("broker")
            backoff.reset()
            self._first_attempt.set()
            try:
                await _until_one_ends(self._write(writer), self._read(reader))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._went_down("broker", exc)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), CONNECT_TIMEOUT_SECONDS)
                writer.transport.abort()  # in case closing did not finish
            await asyncio.sleep(backoff.delay())

    async def _wait_for_work(self) -> None:
        """Until there is something to send; says so to ``close()`` while there is not."""
        while not self._outbox and not self._channels_dirty:
            self._idle.set()
            self._wake.clear()
            await self._wake.wait()
        self._idle.clear()

    async def _write(self, writer: asyncio.StreamWriter) -> None:
        sent: set[str] = set()
        self._channels_dirty = True  # a new connection: every channel is subscribed again
        while True:
            await self._wait_for_work()
            parts: list[bytes] = []
            if self._channels_dirty:
                self._channels_dirty = False
                wanted = set(self._subs)
                for channel in wanted - sent:
                    parts += _frame(OP_SUB, channel.encode())
                for channel in sent - wanted:
                    parts += _frame(OP_UNSUB, channel.encode())
                sent = wanted
            batch = self._outbox.take()
            for channel, data in batch:
                parts += _frame(OP_PUB, channel.encode(), data)
            writer.writelines(parts)
            try:
                await writer.drain()
            except BaseException:
                self.dropped += len(batch)
                raise

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
            if length > _MAX_BODY:
                raise MalformedFrame(f"frame of {length} bytes")
            body = await reader.readexactly(length)
            op, channel, payload_at = _parse_body(body, 0, len(body))
            if op != OP_PUB:
                raise MalformedFrame("the broker sends only PUB")
            self._deliver(channel.decode(), body[payload_at:])


class _BrokerConnection(asyncio.Protocol):
    """One worker's connection at the broker: parses its frames as they come."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.channels: set[bytes] = set()
        self.dropped = 0
        self._buffer = bytearray()
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.broker._connections) >= BROKER_MAX_CONNECTIONS:
            self._reject(f"more than {BROKER_MAX_CONNECTIONS} connections")
            return
        self.broker._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        buffer = self._buffer
        buffer += data
        at = 0
        try:
            while len(buffer) - at >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buffer, at)
                if length > _MAX_BODY:
                    raise MalformedFrame(f"frame of {length} bytes")
                end = at + _LENGTH.size + length
                if len(buffer) < end:
                    break
                op, channel, _ = _parse_body(buffer, at + _LENGTH.size, end)
                if op == OP_PUB:
                    self.broker._forward(channel, bytes(buffer[at:end]))
                elif op == OP_SUB:
                    if channel not in self.channels and len(self.channels) >= MAX_CHANNELS:
                        raise MalformedFrame(f"more than {MAX_CHANNELS} channels")
                    self.channels.add(channel)
                    self.broker._channels.setdefault(channel, set()).add(self)
                else:
                    self._leave(channel)
                at = end
        except MalformedFrame as exc:
            self._reject(str(exc))
            return
        finally:
            del buffer[:at]

    def _leave(self, channel: bytes) -> None:
        self.channels.discard(channel)
        members = self.broker._channels.get(channel)
        if members is not None:
            members.discard(self)
            if not members:
                del self.broker._channels[channel]

    def _reject(self, reason: str) -> None:
        self.broker.rejected += 1
        self.broker._limiter.warn(self.broker._log, "live_bus_connection_rejected", reason=reason)
        self.close()

    def close(self) -> None:
        self._closed = True
        self._buffer.clear()
        if self.transport is not None:
            self.transport.abort()  # not close(): a peer that stopped reading must not hold it open

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._buffer.clear()
        for channel in list(self.channels):
            self._leave(channel)
        self.broker._connections.discard(self)


class Broker:
    """The supervisor's end of ``BrokerBus``: forwards each PUB to every connection subscribed
    to its channel (the publisher's too). A connection that reads too slowly has messages
    dropped past ``BROKER_CONNECTION_BUFFER_BYTES``; one that breaks the format is closed."""

    def __init__(self, path: str | os.PathLike[str], remove_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.dropped = 0  # messages not forwarded to a slow connection
        self.rejected = 0  # connections closed for a malformed frame or past a limit
        self._remove_dir = remove_dir
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._connections: set[_BrokerConnection] = set()
        self._channels: dict[bytes, set[_BrokerConnection]] = {}
        self._log = get_logger(component="live_bus_broker")
        self._limiter = LogLimiter()

    async def start(self) -> None:
        """Listen on ``path`` (a stale socket there is replaced), readable by this user only."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _BrokerConnection(self), os.fspath(self.path))
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino

    def subscribers(self, channel: str) -> int:
        """Connections subscribed to ``channel`` now."""
        return len(self._channels.get(channel.encode(), ()))

    @property
    def connections(self) -> int:
        return len(self._connections)

    def _forward(self, channel: bytes, frame: bytes) -> None:
        for connection in self._channels.get(channel, ()):
            transport = connection.transport
            if transport is None or transport.is_closing():
                continue
            if transport.get_write_buffer_size() + len(frame) > BROKER_CONNECTION_BUFFER_BYTES:
                connection.dropped += 1
                self.dropped += 1
                self._limiter.warn(self._log, "live_bus_slow_connection", dropped=connection.dropped)
                continue
            transport.write(frame)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in list(self._connections):
            connection.close()
        if server is not None:
            with contextlib.suppress(TimeoutError):  # the connections were aborted: only a bug waits
                await asyncio.wait_for(server.wait_closed(), CONNECT_TIMEOUT_SECONDS)
        self._remove_socket()
        if self._remove_dir is not None:
            with contextlib.suppress(OSError):
                self._remove_dir.rmdir()

    def _remove_socket(self) -> None:
        """Remove our socket file, and not one a newer broker has put at the same path."""
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
                os.unlink(self.path)
