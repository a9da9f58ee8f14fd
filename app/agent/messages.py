"""Deepgram Voice Agent V1 wire format: parse server messages, build client messages.

Audio is binary and never passes through here. Text messages are rare (a few per turn), so
plain ``json`` is fine; fields are checked by hand because the peer is untrusted.
"""

from __future__ import annotations

import json
from typing import Any

from app.codecs import AudioFormat
from app.core.events import (
    AgentAudioDone,
    AgentConversationText,
    AgentError,
    AgentEvent,
    AgentFunctionCallRequest,
    AgentInfo,
    AgentInjectionRefused,
    AgentInvalid,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentThinking,
    AgentUnknown,
    AgentUserStartedSpeaking,
    AgentWarning,
    AgentWelcome,
    FunctionCall,
)

INFO_TYPES = frozenset(
    {
        "PromptUpdated",
        "SpeakUpdated",
        "ThinkUpdated",
        "ListenUpdated",
        "History",
        "LatencyReport",
        "FunctionCallResponse",
        "FunctionCallCancelled",
    }
)


def _s(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _f(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse(text: str) -> AgentEvent:
    try:
        msg = json.loads(text)
    except ValueError:
        return AgentInvalid(f"bad JSON: {text[:80]!r}")
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return AgentInvalid("message without a type")
    kind = msg["type"]
    if kind == "UserStartedSpeaking":
        return AgentUserStartedSpeaking()
    if kind == "AgentAudioDone":
        return AgentAudioDone()
    if kind == "AgentStartedSpeaking":
        return AgentStartedSpeaking(
            total_latency=_f(msg.get("total_latency")),
            tts_latency=_f(msg.get("tts_latency")),
            ttt_latency=_f(msg.get("ttt_latency")),
        )
    if kind == "ConversationText":
        return AgentConversationText(role=_s(msg.get("role")), content=_s(msg.get("content")))
    if kind == "AgentThinking":
        return AgentThinking(content=_s(msg.get("content")))
    if kind == "Welcome":
        return AgentWelcome(request_id=_s(msg.get("request_id")))
    if kind == "SettingsApplied":
        return AgentSettingsApplied()
    if kind == "FunctionCallRequest":
        return _function_call_request(msg)
    if kind == "Warning":
        return AgentWarning(code=_s(msg.get("code")), description=_s(msg.get("description")))
    if kind == "Error":
        return AgentError(code=_s(msg.get("code")), description=_s(msg.get("description")))
    if kind == "InjectionRefused":
        return AgentInjectionRefused(message=_s(msg.get("message"))[:200])
    if kind in INFO_TYPES:
        return AgentInfo(kind, msg)
    return AgentUnknown(kind[:64])


def _function_call_request(msg: dict[str, Any]) -> AgentEvent:
    items = msg.get("functions")
    if not isinstance(items, list):
        return AgentInvalid("FunctionCallRequest without functions")
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return AgentInvalid("FunctionCallRequest item without id")
        calls.append(
            FunctionCall(
                id=item["id"],
                name=_s(item.get("name")),
                arguments=_s(item.get("arguments")),
                client_side=item.get("client_side") is not False,
            )
        )
    return AgentFunctionCallRequest(tuple(calls))


def settings(
    agent: dict[str, Any] | str,
    input_format: AudioFormat,
    output_format: AudioFormat,
    tags: list[str] | None = None,
    mip_opt_out: bool | None = None,
) -> str:
    """The one Settings message of a session; the bridge owns the ``audio`` block."""
    output: dict[str, Any] = {
        "encoding": output_format.encoding,
        "sample_rate": output_format.sample_rate,
        "container": "none",
    }
    msg: dict[str, Any] = {
        "type": "Settings",
        "audio": {
            "input": {"encoding": input_format.encoding, "sample_rate": input_format.sample_rate},
            "output": output,
        },
        "agent": agent,
    }
    if tags:
        msg["tags"] = tags
    if mip_opt_out is not None:
        msg["mip_opt_out"] = mip_opt_out
    return json.dumps(msg, separators=(",", ":"))


KEEP_ALIVE = '{"type":"KeepAlive"}'


def inject_agent_message(message: str) -> str:
    """Have the agent say ``message`` (refused with InjectionRefused while anyone speaks)."""
    return json.dumps({"type": "InjectAgentMessage", "message": message}, separators=(",", ":"))


def inject_user_message(content: str) -> str:
    """Tell the agent something as if the caller had said it (the keypad)."""
    return json.dumps({"type": "InjectUserMessage", "content": content}, separators=(",", ":"))


def update_prompt(prompt: str) -> str:
    """Add ``prompt`` to the agent's instructions (answered by PromptUpdated)."""
    return json.dumps({"type": "UpdatePrompt", "prompt": prompt}, separators=(",", ":"))


def update_speak(speak: dict[str, Any] | list[dict[str, Any]]) -> str:
    """Replace the agent's voice (answered by SpeakUpdated)."""
    return json.dumps({"type": "UpdateSpeak", "speak": speak}, separators=(",", ":"))


def function_call_response(call_id: str, name: str, content: str) -> str:
    return json.dumps(
        {"type": "FunctionCallResponse", "id": call_id, "name": name, "content": content},
        separators=(",", ":"),
    )
