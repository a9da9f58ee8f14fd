"""The floor for ``callbridge loadtest --floor``: the least a Twilio-to-agent relay can do.

It accepts the Twilio Media Streams socket at the bridge's path, parses each event, decodes
``media``, opens one agent session per call with the Settings the bridge sends for the default
profile (so the local agent behaves the same), holds the caller's audio until
SettingsApplied, then forwards every frame as binary; agent audio goes back as Twilio
``media`` events, one per agent message as the bridge does, and UserStartedSpeaking becomes a
``clear``. The voice webhook answers a fixed ``<Connect><Stream>``, unsigned and unchecked.

It runs on the bridge's libraries, used the plain way their documentation shows (uvicorn
with the bridge's WebSocket settings and ASGI ``receive``/``send`` through Starlette on the
Twilio side, the ``websockets`` client's ``send`` and iteration to the agent), so the
bridge's cost against it is what the bridge adds, less what it saves by going around those
APIs on the hot path (docs/capacity.md). There is nothing else: no validation, metrics,
logging, marks, keepalives, reconnects or state machine. It is a yardstick, not a product:
it trusts its peers completely.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
from collections import deque

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect

from app.agent import messages as agent_msg
from app.agent.client import MAX_AGENT_MESSAGE
from app.codecs import TWILIO_FORMAT
from app.config import DEFAULT_PROFILE, load_profile
from app.devtools.endpoints import LOOPBACK, MEDIA_PATH, VOICE_PATH
from app.serving import WS_MAX_SIZE


def default_settings() -> str:
    """The Settings the bridge sends for the default profile: mu-law 8 kHz both ways."""
    profile = load_profile(DEFAULT_PROFILE)
    return agent_msg.settings(profile.agent_payload(), TWILIO_FORMAT, TWILIO_FORMAT, tags=list(profile.bridge.tags))


class _Call:
    """One call: the Twilio socket, the agent socket, and the caller's audio held until ready."""

    def __init__(self, ws: WebSocket, agent_url: str, settings: str) -> None:
        self.ws = ws
        self.agent_url = agent_url
        self.settings = settings
        self.stream_sid = ""
        self.agent: ClientConnection | None = None
        self.ready = False
        self.held: deque[bytes] = deque()

    async def run(self) -> None:
        await self.ws.accept()
        agent_task: asyncio.Task[None] | None = None
        try:
            while True:
                message = await self.ws.receive()
                text = message.get("text")
                if message["type"] == "websocket.disconnect":
                    return
                if text is None:
                    continue
                event = json.loads(text)
                kind = event["event"]
                if kind == "media":
                    audio = base64.b64decode(event["media"]["payload"])
                    if self.ready and self.agent is not None:
                        await self.agent.send(audio)
                    else:
                        self.held.append(audio)
                elif kind == "start":
                    self.stream_sid = event["start"]["streamSid"]
                    agent_task = asyncio.create_task(self.agent_side())
                elif kind == "stop":
                    return
        finally:
            if self.agent is not None:
                with contextlib.suppress(Exception):
                    await self.agent.close()
            if agent_task is not None:
                agent_task.cancel()
                with contextlib.suppress(BaseException):
                    await agent_task
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def agent_side(self) -> None:
        """Connect, send Settings, release the held audio on SettingsApplied, then relay back."""
        agent = await connect(
            self.agent_url, compression=None, max_size=MAX_AGENT_MESSAGE, proxy=None, user_agent_header="callbridge"
        )
        self.agent = agent
        await agent.send(self.settings)
        prefix = '{"event":"media","streamSid":"' + self.stream_sid + '","media":{"payload":"'
        clear = '{"event":"clear","streamSid":"' + self.stream_sid + '"}'
        async for message in agent:
            if isinstance(message, bytes):
                await self.ws.send_text(prefix + base64.b64encode(message).decode("ascii") + '"}}')
                continue
            kind = json.loads(message).get("type")
            if kind == "UserStartedSpeaking":
                await self.ws.send_text(clear)
            elif kind == "SettingsApplied":
                while self.held:  # audio that arrives meanwhile is held too, so order is kept
                    await agent.send(self.held.popleft())
                self.ready = True


def create_app(agent_url: str) -> Starlette:
    settings = default_settings()

    async def voice(request: Request) -> Response:
        stream = f"ws://{request.url.netloc}{MEDIA_PATH}"
        twiml = (
            f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{stream}"/></Connect></Response>'
        )
        return Response(twiml, media_type="text/xml")

    async def media(ws: WebSocket) -> None:
        await _Call(ws, agent_url, settings).run()

    return Starlette(routes=[Route(VOICE_PATH, voice, methods=["POST"]), WebSocketRoute(MEDIA_PATH, media)])


AGENT_URL_VARIABLE = "MINIMAL_RELAY_AGENT_URL"  # how --workers processes learn --agent-url


def app_from_environment() -> Starlette:
    """The app of one of several worker processes (uvicorn imports it by name)."""
    return create_app(os.environ[AGENT_URL_VARIABLE])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.devtools.minimal_relay", description=__doc__)
    parser.add_argument("--agent-url", required=True, help="the agent's WebSocket URL")
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (uvicorn's own)")
    args = parser.parse_args(argv)
    os.environ[AGENT_URL_VARIABLE] = args.agent_url
    # the bridge's WebSocket settings (app.serving.serve); uvloop and httptools as uvicorn picks
    uvicorn.run(
        "app.devtools.minimal_relay:app_from_environment",
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        ws_max_size=WS_MAX_SIZE,
        ws_per_message_deflate=False,
        access_log=False,
        log_config=None,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
