"""The agent pump: one WebSocket to the Voice Agent, frames in and out, nothing decided here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from app.agent import messages as agent_msg
from app.core.events import AgentAudio, AgentClosed, AgentConnected, AgentConnectFailed, AgentEvent

MAX_AGENT_MESSAGE = 1 << 20
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        hint = {401: "bad API key", 403: "forbidden", 429: "over the concurrency limit"}.get(status, "")
        return f"HTTP {status} on upgrade" + (f" ({hint})" if hint else "")
    if isinstance(exc, TimeoutError):
        return "timed out opening the connection"
    return f"{type(exc).__name__}: {exc}"


async def open_session(url: str, api_key: str | None, open_timeout: float = 5.0) -> ClientConnection:
    headers = {"Authorization": f"Token {api_key}"} if api_key else {}
    host = urlsplit(url).hostname or ""
    return await connect(
        url,
        additional_headers=headers,
        open_timeout=open_timeout,
        close_timeout=1.0,  # teardown promise: agent socket closed within a second
        max_size=MAX_AGENT_MESSAGE,
        max_queue=64,
        compression=None,  # audio does not compress; deflate would only cost CPU
        proxy=None if host in LOOPBACK_HOSTS else True,
        user_agent_header="callbridge",
    )


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
