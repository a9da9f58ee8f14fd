"""Inputs to the call state machine: parsed events from Twilio, the agent and the clock.

Plain slotted dataclasses: one is built per audio frame, so they must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --- Twilio side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TwilioConnected:
    pass


@dataclass(frozen=True, slots=True)
class TwilioStart:
    stream_sid: str
    call_sid: str
    account_sid: str = ""
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TwilioMedia:
    payload: bytes
    stream_sid: str = ""


@dataclass(frozen=True, slots=True)
class TwilioMark:
    name: str
    stream_sid: str = ""


@dataclass(frozen=True, slots=True)
class TwilioDtmf:
    digit: str
    stream_sid: str = ""


@dataclass(frozen=True, slots=True)
class TwilioStop:
    stream_sid: str = ""


@dataclass(frozen=True, slots=True)
class TwilioClosed:
    """The Twilio socket went away (with or without a ``stop`` first)."""

    code: int | None = None


@dataclass(frozen=True, slots=True)
class TwilioInvalid:
    """A frame from Twilio that could not be used; ``kind`` names why."""

    kind: str
    detail: str = ""


# --- Agent side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentConnected:
    pass


@dataclass(frozen=True, slots=True)
class AgentConnectFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class AgentWelcome:
    request_id: str


@dataclass(frozen=True, slots=True)
class AgentSettingsApplied:
    pass


@dataclass(frozen=True, slots=True)
class AgentAudio:
    data: bytes


@dataclass(frozen=True, slots=True)
class AgentUserStartedSpeaking:
    pass


@dataclass(frozen=True, slots=True)
class AgentStartedSpeaking:
    total_latency: float | None = None
    tts_latency: float | None = None
    ttt_latency: float | None = None


@dataclass(frozen=True, slots=True)
class AgentAudioDone:
    pass


@dataclass(frozen=True, slots=True)
class AgentConversationText:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class AgentThinking:
    content: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    id: str
    name: str
    arguments: str
    client_side: bool


@dataclass(frozen=True, slots=True)
class AgentFunctionCallRequest:
    functions: tuple[FunctionCall, ...]


@dataclass(frozen=True, slots=True)
class AgentWarning:
    code: str
    description: str


@dataclass(frozen=True, slots=True)
class AgentError:
    code: str
    description: str


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """A known, informational agent message (PromptUpdated, History, ...)."""

    type: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AgentUnknown:
    type: str


@dataclass(frozen=True, slots=True)
class AgentInvalid:
    detail: str


@dataclass(frozen=True, slots=True)
class AgentClosed:
    code: int | None = None
    reason: str = ""


# --- The bridge itself -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BridgeStopping:
    """The bridge must end the call for its own reasons (shutdown, a stuck peer)."""

    reason: str
    outcome: str = "bridge_error"


# --- Clock -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    pass


TwilioEvent = (
    TwilioConnected | TwilioStart | TwilioMedia | TwilioMark | TwilioDtmf | TwilioStop | TwilioClosed | TwilioInvalid
)
AgentEvent = (
    AgentConnected
    | AgentConnectFailed
    | AgentWelcome
    | AgentSettingsApplied
    | AgentAudio
    | AgentUserStartedSpeaking
    | AgentStartedSpeaking
    | AgentAudioDone
    | AgentConversationText
    | AgentThinking
    | AgentFunctionCallRequest
    | AgentWarning
    | AgentError
    | AgentInfo
    | AgentUnknown
    | AgentInvalid
    | AgentClosed
)
Event = TwilioEvent | AgentEvent | BridgeStopping | Tick
