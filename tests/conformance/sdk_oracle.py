"""Strict validation of Voice Agent messages against deepgram-sdk's generated models.

The SDK's models accept unknown fields (extra="allow") and open enums (Literal | Any), which
would let a typo through. This walks the validated model and fails on both.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from deepgram.agent.v1 import types as dg
from pydantic import BaseModel

CLIENT_MODELS: dict[str, type[BaseModel]] = {
    "Settings": dg.AgentV1Settings,
    "KeepAlive": dg.AgentV1KeepAlive,
    "FunctionCallResponse": dg.AgentV1SendFunctionCallResponse,
    "UpdatePrompt": dg.AgentV1UpdatePrompt,
    "UpdateSpeak": dg.AgentV1UpdateSpeak,
    "UpdateThink": dg.AgentV1UpdateThink,
    "InjectUserMessage": dg.AgentV1InjectUserMessage,
    "InjectAgentMessage": dg.AgentV1InjectAgentMessage,
}

SERVER_MODELS: dict[str, type[BaseModel]] = {
    "Welcome": dg.AgentV1Welcome,
    "SettingsApplied": dg.AgentV1SettingsApplied,
    "ConversationText": dg.AgentV1ConversationText,
    "UserStartedSpeaking": dg.AgentV1UserStartedSpeaking,
    "AgentThinking": dg.AgentV1AgentThinking,
    "FunctionCallRequest": dg.AgentV1FunctionCallRequest,
    "FunctionCallResponse": dg.AgentV1ReceiveFunctionCallResponse,
    "AgentStartedSpeaking": dg.AgentV1AgentStartedSpeaking,
    "AgentAudioDone": dg.AgentV1AgentAudioDone,
    "Error": dg.AgentV1Error,
    "Warning": dg.AgentV1Warning,
    "PromptUpdated": dg.AgentV1PromptUpdated,
    "SpeakUpdated": dg.AgentV1SpeakUpdated,
    "ThinkUpdated": dg.AgentV1ThinkUpdated,
    "ListenUpdated": dg.AgentV1ListenUpdated,
    "InjectionRefused": dg.AgentV1InjectionRefused,
    "LatencyReport": dg.AgentV1LatencyReport,
}


def _open_enum_values(annotation: Any) -> tuple[Any, ...] | None:
    """For ``Union[Literal[...], Any]`` (the SDK's open enums) the documented values."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(annotation)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if literals and any(a is Any for a in args):
        return tuple(v for lit in literals for v in typing.get_args(lit))
    return None


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def assert_strict(value: Any, path: str = "$") -> None:
    if isinstance(value, BaseModel):
        extra = value.model_extra or {}
        assert not extra, f"{path}: fields unknown to the SDK schema: {sorted(extra)}"
        for name, info in type(value).model_fields.items():
            child = getattr(value, name)
            if child is None:
                continue
            allowed = _open_enum_values(_unwrap_optional(info.annotation))
            if allowed is not None:
                assert child in allowed, f"{path}.{name}: {child!r} is not one of {allowed}"
            assert_strict(child, f"{path}.{name}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            assert_strict(item, f"{path}[{i}]")


def validate_client_message(msg: dict[str, Any]) -> BaseModel:
    model = CLIENT_MODELS[msg["type"]].model_validate(msg)
    assert_strict(model)
    return model


def validate_server_message(msg: dict[str, Any]) -> BaseModel:
    model = SERVER_MODELS[msg["type"]].model_validate(msg)
    assert_strict(model)
    return model
