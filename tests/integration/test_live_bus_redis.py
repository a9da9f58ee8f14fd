"""The live-call bus across replicas: RedisBus on a real redis-server, started here on a free
loopback port (and restarted on the same port to see the buses find it again)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as redis
from redis.asyncio.client import PubSub
from structlog.testing import capture_logs

from app.devtools.endpoints import free_port, wait_for_port
from app.live.bus import OUTBOX_LIMIT, REDIS_PREFIX, RedisBus, Subscription

pytestmark = pytest.mark.timeout(30)


class RedisServer:
    """One redis-server on a fixed loopback port, which can be stopped and started again."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc, timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server); .ci/run installs it")
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def wait_for(predicate: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def wait_for_subscribers(url: str, channel: str, count: int, within: float = 10.0) -> None:
    """Until Redis itself counts ``count`` subscribers on the bus channel ``channel``."""
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + within
        while True:
            try:
                ((_, now),) = await client.pubsub_numsub(REDIS_PREFIX + channel)
            except (redis.ConnectionError, OSError):
                now = -1  # still starting
            if now == count:
                return
            assert time.monotonic() < deadline, f"{channel}: {now} subscribers, not {count}"
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()


class Inbox:
    def __init__(self) -> None:
        self.items: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.items.append(data)


def test_two_replicas_exchange_messages_in_order(redis_server: RedisServer) -> None:
    async def test() -> None:
        a, b = RedisBus(redis_server.url), RedisBus(redis_server.url)
        await a.start()
        await b.start()
        try:
            at_a, at_b, a_own = Inbox(), Inbox(), Inbox()
            a.subscribe("to-a", at_a)
            b.subscribe("to-b", at_b)
            a.subscribe("to-b", a_own)  # two handlers of one process: one Redis subscription
            await wait_for_subscribers(redis_server.url, "to-a", 1)
            await wait_for_subscribers(redis_server.url, "to-b", 2)
            sent = [f"m{i}".encode() for i in range(500)]
            for data in sent:
                assert a.publish("to-b", data)
                assert b.publish("to-a", data)
            await wait_for(lambda: len(at_a.items) == len(at_b.items) == len(a_own.items) == 500)
            assert at_a.items == sent and at_b.items == sent and a_own.items == sent
            assert a.dropped == b.dropped == 0
        finally:
            await a.close()
            await b.close()

    asyncio.run(test())


def test_a_message_published_right_after_subscribing_is_received(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SUBSCRIBE and PUBLISH go on two connections; the bus holds a PUBLISH until Redis has
    confirmed the SUBSCRIBEs before it, so neither its own message nor a reply to it can
    overtake the subscription (as with the broker, where both share one socket). Here the
    subscription connection is made slow, so that the PUBLISH would come first otherwise."""
    subscribe = PubSub.subscribe

    async def slow_subscribe(self: PubSub, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.05)
        await subscribe(self, *args, **kwargs)

    monkeypatch.setattr(PubSub, "subscribe", slow_subscribe)

    async def test() -> None:
        a, b = RedisBus(redis_server.url), RedisBus(redis_server.url)
        await a.start()
        await b.start()
        try:
            b.subscribe("request", lambda data: b.publish(data.decode(), b"re: " + data) and None)
            await wait_for_subscribers(redis_server.url, "request", 1)
            own: list[Inbox] = []
            replies: list[Inbox] = []
            for i in range(50):
                own.append(Inbox())
                replies.append(Inbox())
                a.subscribe(f"own-{i}", own[-1])
                a.subscribe(f"reply-{i}", replies[-1])
                assert a.publish(f"own-{i}", b"mine")  # no wait in between
                assert a.publish("request", f"reply-{i}".encode())
            await wait_for(lambda: all(r.items for r in replies + own))
            assert [r.items for r in own] == [[b"mine"]] * 50
            assert [r.items for r in replies] == [[f"re: reply-{i}".encode()] for i in range(50)]
        finally:
            await a.close()
            await b.close()

    asyncio.run(test())


def test_the_last_handler_gone_unsubscribes_at_redis(redis_server: RedisServer) -> None:
    async def test() -> None:
        bus = RedisBus(redis_server.url)
        await bus.start()
        try:
            one, two = Inbox(), Inbox()
            first, second = bus.subscribe("calls", one), bus.subscribe("calls", two)
            await wait_for_subscribers(redis_server.url, "calls", 1)
            first.close()
            assert bus.publish("calls", b"1")
            await wait_for(lambda: two.items == [b"1"])
            assert one.items == []
            await wait_for_subscribers(redis_server.url, "calls", 1)  # the other handler still wants it
            second.close()
            await wait_for_subscribers(redis_server.url, "calls", 0)
        finally:
            await bus.close()

    asyncio.run(test())


def test_subscriptions_come_back_after_redis_restarts(redis_server: RedisServer) -> None:
    async def test() -> None:
        a, b = RedisBus(redis_server.url), RedisBus(redis_server.url)
        await a.start()
        await b.start()
        try:
            inbox = Inbox()
            a.subscribe("calls", inbox)
            await wait_for_subscribers(redis_server.url, "calls", 1)
            assert b.publish("calls", b"before")
            await wait_for(lambda: inbox.items == [b"before"])
            with capture_logs() as logs:
                redis_server.stop()
                await wait_for(lambda: any(e["event"] == "live_bus_unavailable" for e in logs))
                redis_server.start()
                await wait_for_subscribers(redis_server.url, "calls", 1)  # a subscribed again
                # b's publishing connection learns of the restart on its next publish (dropped,
                # counted); the bus then reconnects with backoff and publishing works again
                deadline = time.monotonic() + 10
                while b"after" not in inbox.items:
                    assert time.monotonic() < deadline, "no message got through after the restart"
                    b.publish("calls", b"after")
                    await asyncio.sleep(0.02)
            assert inbox.items[0] == b"before" and set(inbox.items[1:]) == {b"after"}
            assert len([e for e in logs if e["event"] == "live_bus_reconnected"]) >= 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(test())


def test_an_unreachable_redis_raises_nothing_and_drops_what_is_published() -> None:
    async def test() -> None:
        bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
        with capture_logs() as logs:
            await bus.start()
            sub = bus.subscribe("calls", Inbox())
            results = [bus.publish("calls", b"x") for _ in range(OUTBOX_LIMIT + 10)]
            sub.close()
            assert isinstance(bus.subscribe("other", Inbox()), Subscription)
            await bus.close()
        assert not any(results) and bus.dropped == OUTBOX_LIMIT + 10
        warnings = [e for e in logs if e["event"] == "live_bus_unavailable"]
        assert sorted(e["side"] for e in warnings) == ["publish", "subscribe"]  # once each, not per message

    asyncio.run(test())
