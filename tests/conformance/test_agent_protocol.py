"""Every JSON message the bridge sends the agent validates with deepgram-sdk's models, and
every message the local agent sends parses with the SDK's server-event models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from app.agent import messages as agent_msg
from app.codecs import TWILIO_FORMAT, AudioFormat
from app.config import Settings, resolve
from app.core.actions import SendToAgent
from app.core.call import Call
from app.core.events import AgentConnected, AgentWelcome, StreamTokenAccepted, TwilioStart
from app.core.options import CallOptions
from app.devtools import synth
from app.devtools.local_agent import LocalAgentConfig, ScriptStep
from app.devtools.simulated_caller import SimulatedCaller
from tests.conformance.sdk_oracle import validate_client_message, validate_server_message
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, wait_until


def settings_from(options: CallOptions) -> dict[str, Any]:
    call = Call(options, now=0.0)
    call.handle(TwilioStart("MZ" + "0" * 32, "CA" + "0" * 32), 0.0)
    call.handle(StreamTokenAccepted(), 0.0)
    call.handle(AgentConnected(), 0.0)
    sends = [a for a in call.handle(AgentWelcome("r"), 0.0) if isinstance(a, SendToAgent)]
    assert len(sends) == 1 and isinstance(sends[0].data, str)
    msg: dict[str, Any] = json.loads(sends[0].data)
    return msg


def test_settings_from_default_profile_validates() -> None:
    options = resolve(Settings(_env_file=None)).call_options()  # type: ignore[call-arg]
    msg = settings_from(options)
    model = validate_client_message(msg)
    assert model.audio.input.encoding == "mulaw"  # type: ignore[attr-defined]
    assert isinstance(msg["audio"]["input"]["sample_rate"], int)  # 8000, never 8000.0
    assert msg["audio"]["output"] == {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}


@pytest.mark.parametrize(
    "agent",
    [
        "stored-agent-config-id",
        {
            "language": "en",
            "listen": {"provider": {"type": "deepgram", "model": "nova-3", "keyterms": ["callbridge"]}},
            "think": {
                "provider": {"type": "open_ai", "model": "gpt-4o-mini", "temperature": 0.2},
                "prompt": "Be brief.",
                "functions": [
                    {
                        "name": "lookup",
                        "description": "find an order",
                        "parameters": {"type": "object", "properties": {"id": {"type": "string"}}},
                    }
                ],
            },
            "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
            "greeting": "Hi",
        },
    ],
)
def test_settings_with_other_formats_and_agents_validate(agent: Any) -> None:
    options = CallOptions(
        agent=agent,
        agent_input=AudioFormat("linear16", 16000),
        agent_output=AudioFormat("linear16", 24000),
        tags=("callbridge", "test"),
    )
    validate_client_message(settings_from(options))


def test_keepalive_and_function_call_response_validate() -> None:
    validate_client_message(json.loads(agent_msg.KEEP_ALIVE))
    validate_client_message(json.loads(agent_msg.function_call_response("id-1", "lookup", '{"ok":true}')))


def test_oracle_rejects_mistakes() -> None:
    good = json.loads(agent_msg.settings("agent-id", TWILIO_FORMAT, TWILIO_FORMAT))
    validate_client_message(good)
    typo = json.loads(json.dumps(good))
    typo["audio"]["input"]["samplerate"] = 8000
    with pytest.raises(AssertionError, match="samplerate"):
        validate_client_message(typo)
    wrong_enum = json.loads(json.dumps(good))
    wrong_enum["audio"]["output"]["encoding"] = "wav"
    with pytest.raises(AssertionError, match="wav"):
        validate_client_message(wrong_enum)
    floaty = json.loads(json.dumps(good))
    floaty["audio"]["input"]["sample_rate"] = 8000.5
    with pytest.raises(Exception, match="int"):
        validate_client_message(floaty)


@pytest.mark.timeout(60)
def test_whole_call_messages_conform_both_directions(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    script = [
        ScriptStep(on="settings_applied", do="warning", code="PROMPT_TOO_LONG"),
        ScriptStep(on="utterance", n=1, do="function_call", name="lookup", arguments='{"id":"42"}'),
    ]
    agent = start_agent(LocalAgentConfig(script=script))
    bridge = start_bridge(agent.url)
    pcm = synth.speech_like("order forty two") + synth.silence(0.6)
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN, fast=True, tail=1.0)
    result = asyncio.run(caller.run(synth.encode(pcm, TWILIO_FORMAT)))
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert session.messages, "the bridge sent the agent no JSON at all"
    for msg in session.messages:  # what the bridge sent
        validate_client_message(msg)
    assert [m["type"] for m in session.messages].count("Settings") == 1
    sent_types = set()
    for msg in session.sent:  # what the local agent sent
        validate_server_message(msg)
        sent_types.add(msg["type"])
    assert {
        "Welcome",
        "SettingsApplied",
        "UserStartedSpeaking",
        "ConversationText",
        "AgentStartedSpeaking",
        "AgentAudioDone",
        "FunctionCallRequest",
        "Warning",
    } <= sent_types

    # and every frame the bridge sent Twilio has exactly the documented fields
    assert result.violations == []
    shapes = {
        "media": {"event", "streamSid", "media"},
        "mark": {"event", "streamSid", "mark"},
        "clear": {"event", "streamSid"},
    }
    for msg in result.messages:
        assert set(msg) == shapes[msg["event"]]
        assert msg["streamSid"] == caller.stream_sid
        if msg["event"] == "media":
            assert set(msg["media"]) == {"payload"}
        if msg["event"] == "mark":
            assert set(msg["mark"]) == {"name"}
    assert {m["event"] for m in result.messages} == {"media", "mark", "clear"}
