"""The agent pump: one WebSocket to the Voice Agent, frames in and out, nothing decided here."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from app.agent import messages as agent_msg
from app.core.events import AgentAudio, AgentClosed, AgentConnected, AgentConnectFailed, AgentEvent
from app.core.options import SOCKET_SEND_BUFFER

MAX_AGENT_MESSAGE = 1 << 20
"""Largest agent message accepted (websockets' ``max_size``). Agent audio comes in chunks of
tens of ms to a few seconds (48 kHz linear16: 96 KB a second); text messages are small. A
larger frame closes the session with 1009 and ends the call as ``agent_closed``."""
AGENT_READ_QUEUE = 64
"""Frames websockets buffers from the agent before it stops reading the socket (its
``max_queue``). The core takes each frame synchronously, so this fills only while the event
loop is busy; worst case 64 x ``MAX_AGENT_MESSAGE`` = 64 MiB, typically 64 x a few KB."""
OPEN_TIMEOUT = 5.0
"""TCP + TLS + upgrade to the agent. Counts against ``CallOptions.agent_ready_timeout``."""
CLOSE_TIMEOUT = 1.0
"""The teardown promise: the agent socket is closed within a second of the call's end."""
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        hint = {401: "bad API key", 403: "forbidden", 429: "over the concurrency limit"}.get(status, "")
        return f"HTTP {status} on upgrade" + (f" ({hint})" if hint else "")
    if isinstance(exc, TimeoutError):
        return "timed out opening the connection"
    return f"{type(exc).__name__}: {exc}"


async def open_session(url: str, api_key: str | None, open_timeout: float = OPEN_TIMEOUT) -> ClientConnection:
    headers = {"Authorization": f"Token {api_key}"} if api_key else {}
    host = urlsplit(url).hostname or ""
    ws = await connect(
        url,
        additional_headers=headers,
        open_timeout=open_timeout,
        close_timeout=CLOSE_TIMEOUT,
        max_size=MAX_AGENT_MESSAGE,
        max_queue=AGENT_READ_QUEUE,
        compression=None,  # audio does not compress; deflate would only cost CPU
        proxy=None if host in LOOPBACK_HOSTS else True,
        user_agent_header="callbridge",
    )
    limit_send_buffer(ws.transport.get_extra_info("socket"))
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
    on_open: Callable[[ClientConnection], None],
) -> None:
    """Connect, then feed every frame from the agent to ``feed`` until the socket closes."""
    try:
        ws = await open_session(url, api_key)
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        feed(AgentConnectFailed(describe_connect_error(exc)))
        return
    try:
        on_open(ws)
        feed(AgentConnected())
        parse = agent_msg.parse
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    feed(AgentAudio(message))
                else:
                    feed(parse(message))
        except ConnectionClosed:
            pass
        feed(AgentClosed(ws.close_code, ws.close_reason or ""))
    finally:
        await asyncio.shield(ws.close())
