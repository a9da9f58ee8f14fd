"""Parsing the agent's server messages defensively."""

from __future__ import annotations

import json

from app.agent import messages as am
from app.core.events import (
    AgentAudioDone,
    AgentConversationText,
    AgentError,
    AgentFunctionCallRequest,
    AgentInfo,
    AgentInvalid,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentUnknown,
    AgentUserStartedSpeaking,
    AgentWarning,
    AgentWelcome,
    FunctionCall,
)


def test_known_messages() -> None:
    assert am.parse('{"type":"Welcome","request_id":"r1"}') == AgentWelcome("r1")
    assert am.parse('{"type":"SettingsApplied"}') == AgentSettingsApplied()
    assert am.parse('{"type":"UserStartedSpeaking"}') == AgentUserStartedSpeaking()
    assert am.parse('{"type":"AgentAudioDone"}') == AgentAudioDone()
    assert am.parse(
        '{"type":"AgentStartedSpeaking","total_latency":1.5,"tts_latency":0.5,"ttt_latency":1}'
    ) == AgentStartedSpeaking(1.5, 0.5, 1.0)
    assert am.parse('{"type":"ConversationText","role":"user","content":"hi"}') == AgentConversationText("user", "hi")
    assert am.parse('{"type":"Warning","code":"W","description":"d"}') == AgentWarning("W", "d")
    assert am.parse('{"type":"Error","code":"E","description":"d"}') == AgentError("E", "d")
    assert isinstance(am.parse('{"type":"History","role":"user","content":"x"}'), AgentInfo)


def test_function_call_request() -> None:
    msg = {
        "type": "FunctionCallRequest",
        "functions": [
            {"id": "1", "name": "f", "arguments": "{}", "client_side": True},
            {"id": "2", "name": "g", "arguments": "{}", "client_side": False},
        ],
    }
    assert am.parse(json.dumps(msg)) == AgentFunctionCallRequest(
        (FunctionCall("1", "f", "{}", True), FunctionCall("2", "g", "{}", False))
    )
    assert isinstance(am.parse('{"type":"FunctionCallRequest","functions":[{"name":"f"}]}'), AgentInvalid)
    assert isinstance(am.parse('{"type":"FunctionCallRequest"}'), AgentInvalid)


def test_garbage_and_unknown() -> None:
    assert isinstance(am.parse("not json"), AgentInvalid)
    assert isinstance(am.parse("[]"), AgentInvalid)
    assert isinstance(am.parse('{"type":5}'), AgentInvalid)
    assert am.parse('{"type":"NewThing"}') == AgentUnknown("NewThing")
    # wrong field types degrade to empty values, never exceptions
    assert am.parse('{"type":"AgentStartedSpeaking","total_latency":"fast"}') == AgentStartedSpeaking(None, None, None)
    assert am.parse('{"type":"ConversationText","role":1,"content":null}') == AgentConversationText("", "")
