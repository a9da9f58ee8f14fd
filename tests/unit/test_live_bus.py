"""The live-call bus without Redis: in one process (LocalBus), and across processes through the
supervisor's broker (Broker + BrokerBus on a real Unix socket; the clients share this test's
loop, which the wire does not know)."""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from app.live import bus as live_bus
from app.live.bus import (
    ENV_LIVE_BUS,
    MAX_CHANNEL_BYTES,
    MAX_PAYLOAD_BYTES,
    OP_PUB,
    OP_SUB,
    OUTBOX_LIMIT,
    Broker,
    BrokerBus,
    LocalBus,
    RedisBus,
    Subscription,
    broker_path_from_env,
    bus_for,
    start_broker,
)

pytestmark = pytest.mark.timeout(30)


async def wait_for(predicate: Callable[[], object], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def frame(op: int, channel: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!IBH", 3 + len(channel) + len(payload), op, len(channel)) + channel + payload


class Inbox:
    """What one handler received."""

    def __init__(self) -> None:
        self.items: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.items.append(data)


# --- LocalBus ---------------------------------------------------------------------------------


def test_local_bus_delivers_in_order_to_every_handler_but_never_inside_publish() -> None:
    async def test() -> None:
        bus = LocalBus()
        await bus.start()
        first, second, other = Inbox(), Inbox(), Inbox()
        bus.subscribe("calls", first)
        bus.subscribe("calls", second)
        bus.subscribe("other", other)
        sent = [str(i).encode() for i in range(100)]
        for data in sent:
            assert bus.publish("calls", data)
        assert first.items == []  # not in publish's caller: on the loop, later
        await wait_for(lambda: len(first.items) == 100 and len(second.items) == 100)
        assert first.items == sent and second.items == sent and other.items == []
        await bus.close()

    asyncio.run(test())


def test_local_bus_a_closed_subscription_gets_nothing_more_even_what_was_already_queued() -> None:
    async def test() -> None:
        bus = LocalBus()
        gone, staying, marker = Inbox(), Inbox(), Inbox()
        sub = bus.subscribe("calls", gone)
        bus.subscribe("calls", staying)
        bus.subscribe("marker", marker)
        bus.publish("calls", b"1")
        sub.close()
        sub.close()  # idempotent
        bus.publish("calls", b"2")
        bus.publish("marker", b"done")
        await wait_for(lambda: marker.items)
        assert gone.items == [] and staying.items == [b"1", b"2"]
        await bus.close()

    asyncio.run(test())


def test_local_bus_a_failing_handler_does_not_stop_the_others() -> None:
    async def test() -> None:
        bus = LocalBus()
        after = Inbox()

        def broken(data: bytes) -> None:
            raise RuntimeError("handler bug")

        bus.subscribe("calls", broken)
        bus.subscribe("calls", after)
        with capture_logs() as logs:
            bus.publish("calls", b"a")
            bus.publish("calls", b"b")
            await wait_for(lambda: len(after.items) == 2)
        assert bus.handler_errors == 2
        assert [e["event"] for e in logs] == ["live_bus_handler_failed"] * 2
        await bus.close()

    asyncio.run(test())


def test_local_bus_outbox_is_bounded_and_drops_are_counted() -> None:
    async def test() -> None:
        bus = LocalBus()
        inbox = Inbox()
        bus.subscribe("calls", inbox)
        results = [bus.publish("calls", b"x") for _ in range(OUTBOX_LIMIT + 7)]
        assert results.count(False) == 7 and bus.dropped == 7
        await wait_for(lambda: len(inbox.items) == OUTBOX_LIMIT)
        assert bus.publish("calls", b"room again")
        assert not bus.publish("calls", b"x" * (MAX_PAYLOAD_BYTES + 1))
        assert bus.dropped == 8
        await wait_for(lambda: inbox.items[-1] == b"room again")
        assert bus.publish("calls", b"queued at close")
        await bus.close()
        assert not bus.publish("calls", b"closed")
        assert bus.dropped == 10 and inbox.items[-1] == b"room again"

    asyncio.run(test())


def test_channel_names_no_transport_can_carry_are_a_programming_error() -> None:
    bus = LocalBus()
    for bad in ("", "x" * (MAX_CHANNEL_BYTES + 1), "é" * (MAX_CHANNEL_BYTES // 2 + 1), "\udc80"):
        with pytest.raises(ValueError):
            bus.subscribe(bad, Inbox())
        with pytest.raises(ValueError):
            bus.publish(bad, b"")
    assert isinstance(bus.subscribe("é" * (MAX_CHANNEL_BYTES // 2), Inbox()), Subscription)


# --- Broker + BrokerBus -----------------------------------------------------------------------


class Instance:
    """A broker and two workers' buses on it."""

    def __init__(self, broker: Broker, a: BrokerBus, b: BrokerBus) -> None:
        self.broker, self.a, self.b = broker, a, b

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()
        await self.broker.close()


async def instance(directory: Path) -> Instance:
    broker = await start_broker(directory)
    a, b = BrokerBus(broker.path), BrokerBus(broker.path)
    await a.start()
    await b.start()
    await wait_for(lambda: broker.connections == 2)
    return Instance(broker, a, b)


def broker_test(tmp_path: Path, body: Callable[[Instance], Awaitable[None]]) -> None:
    async def test() -> None:
        inst = await instance(tmp_path)
        try:
            await body(inst)
        finally:
            await inst.close()

    asyncio.run(test())


def test_messages_cross_between_workers_in_order_the_publisher_included(tmp_path: Path) -> None:
    async def body(inst: Instance) -> None:
        at_a, at_b, b_own = Inbox(), Inbox(), Inbox()
        inst.a.subscribe("to-a", at_a)
        inst.b.subscribe("to-b", at_b)
        inst.b.subscribe("to-a", b_own)
        await wait_for(lambda: inst.broker.subscribers("to-a") == 2 and inst.broker.subscribers("to-b") == 1)
        sent = [f"m{i}".encode() for i in range(500)]
        for data in sent:
            assert inst.a.publish("to-b", data)
            assert inst.b.publish("to-a", data)
        await wait_for(lambda: len(at_a.items) == 500 and len(at_b.items) == 500 and len(b_own.items) == 500)
        assert at_a.items == sent and at_b.items == sent and b_own.items == sent
        assert inst.a.dropped == inst.b.dropped == inst.broker.dropped == 0

    broker_test(tmp_path, body)


def test_a_subscription_is_in_effect_before_anything_published_after_it(tmp_path: Path) -> None:
    """A request published right after subscribing to its reply channel gets its reply."""

    async def body(inst: Instance) -> None:
        inst.b.subscribe("request", lambda data: inst.b.publish("reply", b"re: " + data) and None)
        await wait_for(lambda: inst.broker.subscribers("request") == 1)
        answer = Inbox()
        inst.a.subscribe("reply", answer)
        inst.a.publish("request", b"q")  # no wait between: SUB goes first on the same socket
        await wait_for(lambda: answer.items)
        assert answer.items == [b"re: q"]

    broker_test(tmp_path, body)


def test_unsubscribing_the_last_handler_unsubscribes_the_worker(tmp_path: Path) -> None:
    async def body(inst: Instance) -> None:
        one, two, marker = Inbox(), Inbox(), Inbox()
        first, second = inst.b.subscribe("calls", one), inst.b.subscribe("calls", two)
        inst.b.subscribe("marker", marker)
        await wait_for(lambda: inst.broker.subscribers("calls") == 1 and inst.broker.subscribers("marker") == 1)
        first.close()
        inst.a.publish("calls", b"1")
        inst.a.publish("marker", b"1")
        await wait_for(lambda: marker.items == [b"1"])
        assert one.items == [] and two.items == [b"1"]
        assert inst.broker.subscribers("calls") == 1  # the other handler still wants it
        second.close()
        await wait_for(lambda: inst.broker.subscribers("calls") == 0)
        inst.a.publish("calls", b"2")
        inst.a.publish("marker", b"2")
        await wait_for(lambda: marker.items == [b"1", b"2"])
        assert two.items == [b"1"]

    broker_test(tmp_path, body)


def test_a_full_outbox_drops_and_counts_and_the_rest_arrives(tmp_path: Path) -> None:
    async def body(inst: Instance) -> None:
        inbox = Inbox()
        inst.b.subscribe("calls", inbox)
        await wait_for(lambda: inst.broker.subscribers("calls") == 1)
        # no await in between: the writer cannot run, the outbox fills up
        results = [inst.a.publish("calls", i.to_bytes(4, "big")) for i in range(OUTBOX_LIMIT + 10)]
        assert results.count(False) == 10 and inst.a.dropped == 10
        assert not inst.a.publish("calls", b"x" * (MAX_PAYLOAD_BYTES + 1))
        assert inst.a.dropped == 11
        await wait_for(lambda: len(inbox.items) == OUTBOX_LIMIT)
        assert inbox.items == [i.to_bytes(4, "big") for i in range(OUTBOX_LIMIT)]

    broker_test(tmp_path, body)


def test_a_malformed_frame_closes_that_connection_and_the_broker_serves_the_others(tmp_path: Path) -> None:
    async def body(inst: Instance) -> None:
        inbox = Inbox()
        inst.b.subscribe("calls", inbox)
        await wait_for(lambda: inst.broker.subscribers("calls") == 1)
        bad_frames = [
            frame(9, b"calls"),  # unknown op
            frame(OP_SUB, b""),  # empty channel
            frame(OP_SUB, b"x" * (MAX_CHANNEL_BYTES + 1)),  # channel too long
            frame(OP_SUB, b"\xff\xfe"),  # not UTF-8
            frame(OP_SUB, b"calls", b"payload"),  # a payload where none goes
            struct.pack("!IBH", 3 + 10, OP_PUB, 20) + b"x" * 10,  # channel longer than the frame
            struct.pack("!I", 3 + MAX_CHANNEL_BYTES + MAX_PAYLOAD_BYTES + 1),  # too large, refused up front
            b"\x00\x00\x00\x01\x03",  # shorter than a frame's head
        ]
        for number, bad in enumerate(bad_frames, start=1):
            reader, writer = await asyncio.open_unix_connection(inst.broker.path)
            writer.write(frame(OP_SUB, b"calls") + bad)  # a good frame first: parsed, then the bad one
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the broker
            writer.close()
            await writer.wait_closed()
            assert inst.broker.rejected == number
            await wait_for(lambda: inst.broker.subscribers("calls") == 1)  # its subscription went too
            assert inst.a.publish("calls", str(number).encode())
            await wait_for(lambda number=number: len(inbox.items) == number)  # type: ignore[misc]
        assert inbox.items == [str(n).encode() for n in range(1, len(bad_frames) + 1)]

    broker_test(tmp_path, body)


def test_a_connection_that_does_not_read_costs_the_broker_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 256 * 1024
    monkeypatch.setattr(live_bus, "BROKER_CONNECTION_BUFFER_BYTES", limit)

    async def body(inst: Instance) -> None:
        _, writer = await asyncio.open_unix_connection(inst.broker.path)  # and never reads
        writer.write(frame(OP_SUB, b"calls"))
        await wait_for(lambda: inst.broker.subscribers("calls") == 1)
        payload = b"x" * (64 * 1024)
        for _ in range(200):  # 12.5 MiB: far more than the socket buffers and the bound together
            assert inst.a.publish("calls", payload)
            await wait_for(lambda: not inst.a._outbox)
        await wait_for(lambda: inst.broker.dropped > 0)
        (slow,) = [c for c in inst.broker._connections if c.channels]
        assert slow.transport is not None and slow.transport.get_write_buffer_size() <= limit
        assert slow.dropped == inst.broker.dropped
        writer.close()
        await writer.wait_closed()

    broker_test(tmp_path, body)


def test_workers_reconnect_and_subscribe_again_after_the_broker_restarts(tmp_path: Path) -> None:
    async def test() -> None:
        inst = await instance(tmp_path)
        second: Broker | None = None
        try:
            inbox = Inbox()
            inst.a.subscribe("calls", inbox)
            await wait_for(lambda: inst.broker.subscribers("calls") == 1)
            with capture_logs() as logs:
                await inst.broker.close()
                await wait_for(lambda: not inst.b.publish("calls", b"lost"))  # down: dropped, not raised
                assert inst.b.dropped >= 1
                for _ in range(50):
                    inst.b.publish("calls", b"lost")
                second = await start_broker(tmp_path)
                await wait_for(lambda: second is not None and second.subscribers("calls") == 1)
                await wait_for(lambda: second is not None and second.connections == 2)
            assert inst.b.publish("calls", b"after")
            await wait_for(lambda: inbox.items)
            assert inbox.items == [b"after"]
            unavailable = [e for e in logs if e["event"] == "live_bus_unavailable"]
            assert len(unavailable) == 2  # one per bus for the whole outage, however many retries
            assert len([e for e in logs if e["event"] == "live_bus_reconnected"]) == 2
        finally:
            await inst.close()
            if second is not None:
                await second.close()

    asyncio.run(test())


def test_a_worker_drops_a_broker_that_breaks_the_format_and_connects_again(tmp_path: Path) -> None:
    async def test() -> None:
        path = tmp_path / "fake.sock"
        connections: list[asyncio.StreamWriter] = []

        async def fake_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)
            writer.write(frame(OP_SUB, b"calls"))  # a broker only ever sends PUB

        server = await asyncio.start_unix_server(fake_broker, os.fspath(path))
        bus = BrokerBus(path)
        try:
            await bus.start()
            await wait_for(lambda: len(connections) >= 2)  # dropped it, and came back
        finally:
            await bus.close()
            for writer in connections:
                writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(test())


def test_the_broker_socket_is_private_and_a_long_directory_gets_a_short_one(tmp_path: Path) -> None:
    async def test() -> None:
        broker = await start_broker(tmp_path)
        assert broker.path == tmp_path / "live-bus.sock"
        assert stat.S_IMODE(os.stat(broker.path).st_mode) == 0o600
        long_dir = tmp_path / ("d" * 120)
        long_dir.mkdir()
        other = await start_broker(long_dir)
        assert other.path.parent != long_dir and len(os.fsencode(other.path)) <= live_bus.UNIX_PATH_MAX
        bus = BrokerBus(other.path)
        await bus.start()
        await wait_for(lambda: other.connections == 1)
        await bus.close()
        await other.close()
        assert not other.path.parent.exists()
        await broker.close()
        assert not broker.path.exists()

    asyncio.run(test())


def test_a_bus_left_alone_raises_nothing_and_closes_cleanly(tmp_path: Path) -> None:
    async def test() -> None:
        bus = BrokerBus(tmp_path / "nobody-listens.sock")
        await bus.start()
        assert not bus.publish("calls", b"x") and bus.dropped == 1
        sub = bus.subscribe("calls", Inbox())
        sub.close()
        await bus.close()
        await bus.close()
        assert isinstance(bus.subscribe("calls", Inbox()), Subscription)  # inert after close

    asyncio.run(test())


def test_bus_for_picks_redis_then_the_broker_then_this_process(tmp_path: Path) -> None:
    choices: list[Any] = [
        bus_for("redis://127.0.0.1:1/0", tmp_path / "s"),
        bus_for(None, tmp_path / "s"),
        bus_for(None, None),
        bus_for("", ""),
    ]
    assert [type(c) for c in choices] == [RedisBus, BrokerBus, LocalBus, LocalBus]
    assert broker_path_from_env({ENV_LIVE_BUS: "/x/live-bus.sock"}) == "/x/live-bus.sock"
    assert broker_path_from_env({}) is None

    async def close_all() -> None:
        for c in choices:
            await c.close()

    asyncio.run(close_all())
