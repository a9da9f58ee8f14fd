"""The two sockets' shortcuts, each against a real peer on loopback: ``AgentConnection`` (the
agent side: messages in the parsing callback, writes without a task) and ``MediaSocket`` (the
Twilio side, inside a real uvicorn). What must hold: every message once, in order (also those
that arrived before the call asked for them, and fragmented ones), the library's own limits and
closes unchanged, and a send that never writes out of order or to a closed socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from app.agent.client import AgentConnection, open_session, run_session
from app.core.events import AgentAudio, AgentClosed, AgentConnected, AgentEvent
from app.serving import WS_MAX_SIZE
from app.twilio.media_socket import MediaSocket, direct_socket
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(30)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


# --- the agent side ------------------------------------------------------------------------


async def agent_peer(script: Any) -> tuple[Any, str, list[Any]]:
    """A WebSocket server running ``script(ws, received)`` per connection."""
    received: list[Any] = []

    async def handler(ws: ServerConnection) -> None:
        await script(ws, received)

    server = await serve(handler, "127.0.0.1", 0, compression=None)
    port = server.sockets[0].getsockname()[1]
    return server, f"ws://127.0.0.1:{port}", received


def test_agent_messages_before_and_after_delivery_in_order_fragments_joined() -> None:
    async def script(ws: ServerConnection, received: list[Any]) -> None:
        await ws.send('{"type":"Welcome"}')  # before the call asks for messages
        await ws.send(b"\x01\x02")
        await asyncio.sleep(0.2)
        await ws.send(['{"type":', '"Frag', 'mented"}'])  # one text message in three frames
        await ws.send([b"\x03", b"\x04\x05"])
        await ws.send("last")
        async for message in ws:
            received.append(message)

    async def main() -> None:
        server, url, received = await agent_peer(script)
        async with server:
            ws = await open_session(url, None)
            assert isinstance(ws, AgentConnection)
            await asyncio.sleep(0.1)  # Welcome and the first audio arrive before deliver_to
            got: list[str | bytes] = []
            ws.deliver_to(got.append)
            assert got == ['{"type":"Welcome"}', b"\x01\x02"]
            await until(lambda: len(got) >= 5)
            assert got[2:] == ['{"type":"Fragmented"}', b"\x03\x04\x05", "last"]
            assert ws.try_send(b"audio") and ws.try_send('{"type":"KeepAlive"}')
            await asyncio.sleep(0.1)
            await ws.close()
            assert not ws.try_send(b"after close")  # nothing is written to a closed socket
            await asyncio.sleep(0.1)
            assert received == [b"audio", '{"type":"KeepAlive"}']

    asyncio.run(main())


def test_agent_text_that_is_not_utf8_closes_1007() -> None:
    async def script(ws: ServerConnection, received: list[Any]) -> None:
        await ws.send(b"\xff\xfe", text=True)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        received.append(ws.close_code)

    async def main() -> None:
        server, url, received = await agent_peer(script)
        async with server:
            events: list[AgentEvent] = []
            await asyncio.wait_for(run_session(url, None, events.append, lambda ws: None), 5)
            assert isinstance(events[0], AgentConnected)
            assert isinstance(events[-1], AgentClosed)  # 1006: websockets ignores input after failing
            assert len(events) == 2  # the bad message itself was not fed
        assert received == [1007]  # what the agent was told

    asyncio.run(main())


def test_agent_receiver_that_raises_ends_the_session_and_reaches_the_task() -> None:
    """A bug in the call's handling, raised in the protocol callback, is re-raised by the
    session's task (where the bridge ends the call loudly), not lost in the event loop."""

    async def script(ws: ServerConnection, received: list[Any]) -> None:
        await ws.send(b"\x00" * 160)
        await ws.send(b"\x00" * 160)
        with pytest.raises(ConnectionClosed):
            await ws.recv()

    async def main() -> None:
        server, url, _ = await agent_peer(script)
        async with server:
            fed: list[AgentEvent] = []

            def feed(event: AgentEvent) -> None:
                fed.append(event)
                if isinstance(event, AgentAudio):
                    raise ValueError("a bug")

            with pytest.raises(ValueError, match="a bug"):
                await asyncio.wait_for(run_session(url, None, feed, lambda ws: None), 5)
            assert [type(e) for e in fed] == [AgentConnected, AgentAudio]  # not fed again after

    asyncio.run(main())


def test_agent_try_send_declines_while_the_write_buffer_is_full() -> None:
    """A peer that stops reading: once the transport pauses writing, ``try_send`` declines
    (the bridge then queues, where the stuck peer is seen) instead of buffering without end."""

    async def script(ws: ServerConnection, received: list[Any]) -> None:
        ws.transport.pause_reading()
        await asyncio.sleep(3)

    async def main() -> None:
        server, url, _ = await agent_peer(script)
        async with server:
            ws = await open_session(url, None)
            ws.deliver_to(lambda message: None)
            written = 0
            while ws.try_send(b"\x00" * 4096):
                written += 1
                if written % 16 == 0:
                    await asyncio.sleep(0)  # let the transport try to flush
                assert written < 10_000, "never stopped taking data"
            assert ws.paused
            ws.transport.abort()

    asyncio.run(main())


# --- the Twilio side -----------------------------------------------------------------------


class Echo:
    """A Starlette endpoint that lets two messages queue, then takes the shortcut and echoes
    each message back through ``try_send``; what it saw is kept for the test."""

    def __init__(self) -> None:
        self.seen: list[str | bytes] = []
        self.disconnect_code: int | None = None
        self.direct: MediaSocket | None = None
        self.accept_after = 0.0  # seconds: a slow app, for a client that does not wait for the 101
        self.queued_first = 2  # messages left in uvicorn's queue before the shortcut is taken

    async def __call__(self, ws: WebSocket) -> None:
        await asyncio.sleep(self.accept_after)
        await ws.accept()
        self.direct = direct = direct_socket(ws.scope)
        assert direct is not None
        await until(lambda: direct.queue.qsize() >= self.queued_first)

        def received(message: str | bytes) -> None:
            self.seen.append(message)
            if isinstance(message, str):
                assert direct.try_send("echo " + message)

        direct.deliver_to(received)
        message = await ws.receive()
        assert message["type"] == "websocket.disconnect"
        self.disconnect_code = message.get("code")


@pytest.fixture
def media_server() -> Iterator[tuple[str, Echo]]:
    echo = Echo()

    async def endpoint(ws: WebSocket) -> None:
        await echo(ws)

    app = Starlette(routes=[WebSocketRoute("/media", endpoint)])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, ws=MediaSocket, ws_max_size=WS_MAX_SIZE, log_config=None, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"ws://127.0.0.1:{port}/media", echo
    server.should_exit = True
    thread.join(10)


def test_media_socket_queued_then_direct_in_order_and_echoed(media_server: tuple[str, Echo]) -> None:
    url, echo = media_server

    async def main() -> list[Any]:
        async with connect(url) as ws:
            await ws.send("one")
            await ws.send("two")  # these two wait in uvicorn's queue until deliver_to
            await asyncio.sleep(0.2)
            await ws.send(b"\x01\x02")
            await ws.send(["thr", "ee"])  # fragmented
            echoes = [await asyncio.wait_for(ws.recv(), 5) for _ in range(3)]
        return echoes

    echoes = asyncio.run(main())
    assert echoes == ["echo one", "echo two", "echo three"]
    wait_until(lambda: echo.disconnect_code is not None, 5.0)
    assert echo.seen == ["one", "two", b"\x01\x02", "three"]
    assert echo.disconnect_code == 1000  # the close still arrives through ASGI
    assert echo.direct is not None and not echo.direct.try_send("after close")


def test_media_socket_text_that_is_not_utf8_closes_1007(media_server: tuple[str, Echo]) -> None:
    url, echo = media_server

    async def main() -> int | None:
        async with connect(url) as ws:
            await ws.send("one")
            await ws.send("two")
            await asyncio.sleep(0.2)
            await ws.send(b"\xff\xfe", text=True)
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            return ws.close_code

    assert asyncio.run(main()) == 1007
    wait_until(lambda: echo.disconnect_code is not None, 5.0)
    assert echo.seen == ["one", "two"]
    assert echo.disconnect_code == 1007


def raw_frame(first_byte: int, payload: bytes, masked: bool = True) -> bytes:
    key = b"\x11\x22\x33\x44"
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        length = bytes([bit | size])
    elif size < 1 << 16:
        length = bytes([bit | 126]) + size.to_bytes(2)
    else:
        length = bytes([bit | 127]) + size.to_bytes(8)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if masked else payload
    return bytes([first_byte]) + length + (key if masked else b"") + body


def raw_client(url: str, before_answer: bytes = b"") -> socket.socket:
    """A WebSocket client by hand: the upgrade, then ``before_answer`` sent at once, before
    the 101 is read (a client that does not wait for the handshake's answer)."""
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(
        b"GET /media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    if before_answer:
        time.sleep(0.05)  # after the request was read, before the app accepts (it waits for 2 messages)
        sock.sendall(before_answer)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


def read_frames(sock: socket.socket, seconds: float = 5.0) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each frame the server sends until it closes the connection."""
    sock.settimeout(seconds)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    frames = []
    while len(data) >= 2:
        size, head = data[1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(data[2:4]), 4
        frames.append((data[0], data[head : head + size]))
        data = data[head + size :]
    return frames


def test_media_socket_frames_by_hand_split_anyhow_pings_and_closes(media_server: tuple[str, Echo]) -> None:
    """Frames cut by the socket itself: two in one write, one across three writes; a ping
    mid-message answered by websockets; the close handshake websockets' own."""
    url, echo = media_server
    sock = raw_client(url)
    sock.sendall(raw_frame(0x81, b"one") + raw_frame(0x81, b"two"))
    time.sleep(0.2)
    long = raw_frame(0x81, b"x" * 300)
    for part in (long[:1], long[1:3], long[3:]):  # the length itself arrives in pieces
        sock.sendall(part)
        time.sleep(0.05)
    sock.sendall(raw_frame(0x01, b"fr") + raw_frame(0x89, b"pi") + raw_frame(0x80, b"ag"))  # ping between fragments
    sock.sendall(raw_frame(0x82, b"\x00\x01"))
    time.sleep(0.2)
    sock.sendall(raw_frame(0x88, (1000).to_bytes(2)))
    frames = read_frames(sock)
    sock.close()
    assert echo.direct is not None and echo.direct._splitting  # the frames were cut by MediaSocket
    assert echo.seen == ["one", "two", "x" * 300, "frag", b"\x00\x01"]
    texts = [payload.decode() for first, payload in frames if first == 0x81]
    assert texts == ["echo one", "echo two", "echo " + "x" * 300, "echo frag"]
    assert (0x8A, b"pi") in frames  # the pong
    assert frames[-1][0] == 0x88 and int.from_bytes(frames[-1][1][:2]) == 1000
    assert wait_until(lambda: echo.disconnect_code == 1000, 5.0)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (raw_frame(0x81, b"unmasked", masked=False), 1002),  # a client must mask
        (raw_frame(0xC1, b"rsv1"), 1002),  # a reserved bit, no extension negotiated
        (raw_frame(0x82, b"\x00" * 70_000), 1009),  # over ws_max_size (64 KiB)
    ],
    ids=["unmasked", "reserved_bit", "oversize"],
)
def test_media_socket_hands_bad_frames_to_websockets_which_closes(
    media_server: tuple[str, Echo], frame: bytes, code: int
) -> None:
    url, echo = media_server
    sock = raw_client(url)
    sock.sendall(raw_frame(0x81, b"one") + raw_frame(0x81, b"two"))
    time.sleep(0.2)
    sock.sendall(frame + raw_frame(0x81, b"never"))
    frames = read_frames(sock)
    sock.close()
    assert frames[-1][0] == 0x88 and int.from_bytes(frames[-1][1][:2]) == code
    assert echo.seen == ["one", "two"]
    assert wait_until(lambda: echo.disconnect_code == code, 5.0)


def test_media_socket_a_client_that_sends_before_the_answer_keeps_websockets_parser(
    media_server: tuple[str, Echo],
) -> None:
    url, echo = media_server
    echo.accept_after = 0.3
    echo.queued_first = 1  # uvicorn stops reading after each queued message: "two" waits for the shortcut
    sock = raw_client(url, before_answer=raw_frame(0x81, b"one") + raw_frame(0x81, b"two")[:3])
    sock.sendall(raw_frame(0x81, b"two")[3:] + raw_frame(0x81, b"three"))
    time.sleep(0.3)
    sock.sendall(raw_frame(0x88, (1000).to_bytes(2)))
    read_frames(sock)
    sock.close()
    assert wait_until(lambda: echo.disconnect_code == 1000, 5.0)
    assert echo.seen == ["one", "two", "three"]
    assert echo.direct is not None and not echo.direct._splitting


def test_agent_message_in_too_many_fragments_closes_1009() -> None:
    """websockets' own reader caps a message at 4096 frames; the shortcut keeps that bound, so
    an agent sending empty fragments cannot grow memory."""

    async def script(ws: ServerConnection, received: list[Any]) -> None:
        await ws.send([b""] * 5000 + [b"end"])
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        received.append(ws.close_code)

    async def main() -> list[Any]:
        server, url, received = await agent_peer(script)
        async with server:
            events: list[AgentEvent] = []
            await asyncio.wait_for(run_session(url, None, events.append, lambda ws: None), 5)
            assert isinstance(events[-1], AgentClosed)
            assert not any(isinstance(e, AgentAudio) for e in events)
        return received

    assert asyncio.run(main()) == [1009]
