"""The agent pump: one WebSocket to the Voice Agent, frames in and out, nothing decided here."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from app.agent import messages as agent_msg
from app.agent.framing import BINARY, TEXT, client_frame
from app.core.events import AgentAudio, AgentClosed, AgentConnected, AgentConnectFailed, AgentEvent
from app.core.options import SOCKET_SEND_BUFFER

MAX_AGENT_MESSAGE = 1 << 20
"""Largest agent message accepted (websockets' ``max_size``). Agent audio comes in chunks of
tens of ms to a few seconds (48 kHz linear16: 96 KB a second); text messages are small. A
larger frame closes the session with 1009 and ends the call as ``agent_closed``."""
MAX_FRAGMENTS = 4096
"""Frames one agent message may come in (websockets' own reader has the same cap); more
closes the session with 1009, so a peer sending empty fragments cannot grow memory."""
OPEN_TIMEOUT = 5.0
"""TCP + TLS + upgrade to the agent. Counts against ``CallOptions.agent_ready_timeout``."""
CLOSE_TIMEOUT = 1.0
"""The teardown promise: the agent socket is closed within a second of the call's end."""
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class AgentConnection(ClientConnection):
    """websockets' client connection, with each message handed to the call in the callback
    that parsed it (``deliver_to``) and frames written without a task when the socket takes
    them at once (``try_send``).

    Through ``recv()`` every agent message went through websockets' assembler and woke the
    call's reader task; through ``send()``, an async context manager per caller frame (50 a
    second per call). Those hand-offs were most of what a frame cost the bridge. ``try_send``
    also frames the message itself (``framing.py``: the masking keys without a system call
    each). Handshake, close, pings and flow control stay websockets' own: this only replaces
    where complete data messages go and adds a send that does not wait. A message handled here
    is handled before the next is parsed, so nothing accumulates on the way in (websockets'
    read queue, ``max_queue``, is not used). Only what arrives with the handshake's answer, before the
    call asks for messages (``deliver_to``, called with no wait after the connection opens),
    is kept meanwhile: the Welcome, at most a TCP segment.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._receiver: Callable[[str | bytes], None] | None = None
        self._early: list[str | bytes] = []  # messages before deliver_to (the Welcome)
        self._parts: list[bytes] = []  # a fragmented message so far
        self._text = False
        self._failed = False  # closing after a bad message: nothing more is delivered
        self.receiver_failed: Exception | None = None  # a bug in the receiver: re-raised by run_session

    def deliver_to(self, receiver: Callable[[str | bytes], None]) -> None:
        early, self._early = self._early, []
        self._receiver = receiver
        for message in early:
            self._deliver(message)

    def process_event(self, event: Event) -> None:
        if not isinstance(event, Frame) or event.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            super().process_event(event)  # the handshake response, pings, pongs, close
            return
        if event.opcode is not Opcode.CONT:
            self._text = event.opcode is Opcode.TEXT
        if self._failed:
            return
        if not event.fin or self._parts:
            self._parts.append(bytes(event.data))
            if len(self._parts) > MAX_FRAGMENTS:
                self._fail(1009, "too many fragments")
                return
            if not event.fin:
                return
            data, self._parts = b"".join(self._parts), []
        else:
            data = bytes(event.data)
        if not self._text:
            self._deliver(data)
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:  # as websockets' own reader does: close 1007
            self._fail(1007, "invalid UTF-8")
            return
        self._deliver(text)

    def _fail(self, code: int, reason: str) -> None:
        """Close with ``code``, deliver nothing more, and drop the socket if the agent does not
        close within ``CLOSE_TIMEOUT`` (websockets' own reader does the same in its send context)."""
        self._failed = True
        self.protocol.fail(code, reason)
        self.send_data()
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.transport.abort)

    def _deliver(self, message: str | bytes) -> None:
        if self._receiver is None:
            self._early.append(message)
            return
        if self.receiver_failed is not None:
            return
        try:
            self._receiver(message)
        except Exception as exc:  # in a protocol callback: end the session, report it from its task
            self.receiver_failed = exc
            self.transport.abort()

    def try_send(self, message: bytes | str) -> bool:
        """Write one message now, unless the connection is not open or its write buffer is
        over the high-water mark (then False: send through the writer, which waits)."""
        if self.paused or self.protocol.state is not State.OPEN:
            return False
        payload = message if isinstance(message, bytes) else message.encode()
        frame = client_frame(BINARY if payload is message else TEXT, payload)
        try:
            self.transport.write(frame)  # a whole frame: websockets' own writes never interleave
        except Exception as exc:  # the socket is gone: the session ends as any lost one does
            self.set_connection_exc(exc)
            self.transport.abort()
        return True


def describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        hint = {401: "bad API key", 403: "forbidden", 429: "over the concurrency limit"}.get(status, "")
        return f"HTTP {status} on upgrade" + (f" ({hint})" if hint else "")
    if isinstance(exc, TimeoutError):
        return "timed out opening the connection"
    return f"{type(exc).__name__}: {exc}"


async def open_session(url: str, api_key: str | None, open_timeout: float = OPEN_TIMEOUT) -> AgentConnection:
    headers = {"Authorization": f"Token {api_key}"} if api_key else {}
    host = urlsplit(url).hostname or ""
    ws = await connect(
        url,
        additional_headers=headers,
        open_timeout=open_timeout,
        close_timeout=CLOSE_TIMEOUT,
        max_size=MAX_AGENT_MESSAGE,
        compression=None,  # audio does not compress; deflate would only cost CPU
        proxy=None if host in LOOPBACK_HOSTS else True,
        user_agent_header="callbridge",
        create_connection=AgentConnection,
    )
    assert isinstance(ws, AgentConnection)
    limit_send_buffer(ws.transport.get_extra_info("socket"))
    # the handshake's headers are done with (~2 KiB a call); the request and response stay, as
    # websockets tells a finished handshake by them
    assert ws.request is not None and ws.response is not None
    ws.request.headers = ws.response.headers = Headers()
    return ws


def limit_send_buffer(sock: socket.socket | None) -> None:
    """``SOCKET_SEND_BUFFER`` on a call's socket, so a peer that stops reading is seen soon."""
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by the peer: nothing to limit
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)


async def run_session(
    url: str,
    api_key: str | None,
    feed: Callable[[AgentEvent], None],
    on_open: Callable[[AgentConnection], None],
) -> None:
    """Connect, then feed every message from the agent to ``feed`` (in the connection's
    callback) until the socket closes. A ``feed`` that raised is re-raised here, in the task."""
    try:
        ws = await open_session(url, api_key)
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        feed(AgentConnectFailed(describe_connect_error(exc)))
        return
    parse = agent_msg.parse

    def received(message: str | bytes) -> None:
        feed(AgentAudio(message) if isinstance(message, bytes) else parse(message))

    try:
        on_open(ws)
        feed(AgentConnected())
        ws.deliver_to(received)
        await ws.wait_closed()
        if ws.receiver_failed is not None:
            raise ws.receiver_failed
        feed(AgentClosed(ws.close_code, ws.close_reason or ""))
    finally:
        await asyncio.shield(ws.close())
