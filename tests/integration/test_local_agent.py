"""The local agent follows the real service's rules, so tests against it mean something."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.agent import messages as agent_msg
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.local_agent import LocalAgentConfig
from tests.conformance.sdk_oracle import validate_server_message
from tests.conftest import AgentHandle, wait_until

pytestmark = pytest.mark.timeout(30)
SETTINGS = agent_msg.settings(
    {
        "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
        "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}},
        "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
    },
    TWILIO_FORMAT,
    TWILIO_FORMAT,
)


async def exchange(url: str, sends: list[str | bytes], wait: float = 0.5, **kw: Any) -> list[dict[str, Any]]:
    """Send frames, then collect JSON replies until the socket closes or ``wait`` passes."""
    got: list[dict[str, Any]] = []
    async with connect(url, proxy=None, **kw) as ws:
        first = json.loads(await ws.recv())
        got.append(first)
        for frame in sends:
            await ws.send(frame)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while (left := deadline - loop.time()) > 0:
                msg = await asyncio.wait_for(ws.recv(), left)
                if isinstance(msg, str):
                    got.append(json.loads(msg))
        except (TimeoutError, ConnectionClosed):
            pass
    for msg in got:
        validate_server_message(msg)
    return got


def types_of(msgs: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in msgs]


def test_welcome_then_settings_applied(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent()
    msgs = asyncio.run(exchange(agent.url, [SETTINGS]))
    assert types_of(msgs) == ["Welcome", "SettingsApplied"]
    assert msgs[0]["request_id"] == agent.agent.sessions[0].request_id


def test_audio_before_settings_is_an_error(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent()
    msgs = asyncio.run(exchange(agent.url, [b"\xff" * 160]))
    assert msgs[-1]["code"] == "NON_SETTINGS_MESSAGE_BEFORE_SETTINGS"
    assert wait_until(lambda: agent.agent.sessions[0].closed)


def test_second_settings_is_an_error(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent()
    msgs = asyncio.run(exchange(agent.url, [SETTINGS, SETTINGS]))
    assert types_of(msgs) == ["Welcome", "SettingsApplied", "Error"]
    assert msgs[-1]["code"] == "SETTINGS_ALREADY_APPLIED"


def test_unparsable_and_invalid_settings(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent()
    msgs = asyncio.run(exchange(agent.url, ["{nope", SETTINGS.replace('"mulaw"', '"mp3"', 1)]))
    assert [m.get("code") for m in msgs[1:]] == ["UNPARSABLE_CLIENT_MESSAGE", "INVALID_SETTINGS"]


def test_idle_client_times_out(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(idle_timeout=0.4))
    msgs = asyncio.run(exchange(agent.url, [SETTINGS], wait=2.0))
    assert msgs[-1]["code"] == "CLIENT_MESSAGE_TIMEOUT"
    assert wait_until(lambda: agent.agent.sessions[0].closed)


def test_keepalive_keeps_session_alive(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(idle_timeout=0.5))

    async def run() -> list[str]:
        async with connect(agent.url, proxy=None) as ws:
            await ws.recv()
            await ws.send(SETTINGS)
            await ws.recv()
            for _ in range(5):
                await asyncio.sleep(0.25)
                await ws.send(agent_msg.KEEP_ALIVE)
            return [m.get("code", "") for m in agent.agent.sessions[0].sent]

    assert "CLIENT_MESSAGE_TIMEOUT" not in asyncio.run(run())
    assert wait_until(lambda: agent.agent.sessions[0].keepalives == 5)


def test_key_required_when_configured(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(require_key="right-key"))
    with pytest.raises(InvalidStatus) as info:
        asyncio.run(exchange(agent.url, []))
    assert info.value.response.status_code == 401
    msgs = asyncio.run(exchange(agent.url, [], additional_headers={"Authorization": "Token right-key"}))
    assert types_of(msgs) == ["Welcome"]


def test_detects_speech_and_echoes_it(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(speak_rate=0))
    speech = synth.encode(synth.speech_like("hello there") + synth.silence(0.6), TWILIO_FORMAT)
    frames = [speech[i : i + 160] for i in range(0, len(speech), 160)]
    msgs = asyncio.run(exchange(agent.url, [SETTINGS, *frames], wait=1.0))
    assert types_of(msgs)[2:] == [
        "UserStartedSpeaking",
        "ConversationText",
        "AgentStartedSpeaking",
        "AgentAudioDone",
        "ConversationText",
    ]
    assert msgs[3]["role"] == "user" and msgs[-1]["role"] == "assistant"
    session = agent.agent.sessions[0]
    assert session.utterances == 1
    assert 0.5 < len(session.audio_out) / 8000 < 1.0  # about the length of "hello there"
