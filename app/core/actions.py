"""Outputs of the call state machine: what the pumps must do, in the order given.

The three Twilio-bound kinds (``SendMedia``, ``SendMark``, ``ClearTwilio``) are also the items
of the pump's Twilio outbox, so barge-in can drop queued media and marks by type, without
reading any JSON back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.core.vocabulary import LiveEventType, LogLevel, MetricName, Outcome, RejectReason

# --- Twilio outbox items -----------------------------------------------------------------


@dataclass(slots=True)  # per frame: not frozen, frozen init costs twice as much (measured)
class SendMedia:
    """A serialised Twilio ``media`` frame carrying ``audio_bytes`` of mu-law."""

    text: str
    audio_bytes: int


@dataclass(frozen=True, slots=True)
class SendMark:
    """A serialised Twilio ``mark``: Twilio returns it once the audio before it has played."""

    text: str
    name: str


@dataclass(frozen=True, slots=True)
class ClearTwilio:
    """Barge-in: drop Twilio-bound media and marks still queued in the bridge, then send
    ``text`` (the ``clear`` message) ahead of anything else."""

    text: str


TwilioOut = SendMedia | SendMark | ClearTwilio

# --- agent -------------------------------------------------------------------------------


@dataclass(slots=True)  # per frame: not frozen, frozen init costs twice as much (measured)
class SendToAgent:
    """Binary audio (``bytes``) or a JSON text message (``str``) for the agent."""

    data: bytes | str


@dataclass(frozen=True, slots=True)
class ConnectAgent:
    """Open the agent session; the pump feeds AgentConnected/AgentConnectFailed and the rest."""


@dataclass(frozen=True, slots=True)
class RunFunction:
    """Run an operator tool: POST ``payload`` (JSON) to ``url``, signed; answer with
    FunctionDone. The core keeps the deadline; ``timeout`` only frees the request."""

    id: str
    name: str
    url: str
    payload: dict[str, Any]
    timeout: float


# --- the call ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HangUpCall:
    """End the phone call through Twilio's REST API (``Status=completed``); answer with
    CallUpdated. Without REST credentials, closing the stream ends the call instead."""

    call_sid: str


@dataclass(frozen=True, slots=True)
class StartRecording:
    """The caller consented: have Twilio record the call, both channels, through its REST
    API, reporting to ``status_callback_url`` if set; answer with RecordingStarted or
    RecordingFailed."""

    call_sid: str
    status_callback_url: str


@dataclass(frozen=True, slots=True)
class RedirectCall:
    """Replace the live call's TwiML with ``twiml`` (a transfer's ``<Dial>``, or the fallback's
    ``<Say>``) through Twilio's REST API; answer with CallUpdated or CallUpdateFailed."""

    call_sid: str
    twiml: str


@dataclass(frozen=True, slots=True)
class RedeemStreamToken:
    """Check and use up the one-time stream token; the pump answers with StreamTokenAccepted
    or StreamTokenRefused."""

    token: str
    call_sid: str
    profile: str = ""  # the profile named in start's parameters, bound into the token


@dataclass(frozen=True, slots=True)
class EndCall:
    """Close both sockets (Twilio's with ``twilio_close_code``) and finish the call's tasks.

    ``outcome`` is an ``Outcome`` for a call that was accepted (it gets a call record) and a
    ``RejectReason`` for a stream refused before that (it gets none)."""

    outcome: Outcome | RejectReason
    reason: str
    twilio_close_code: int


# --- observability -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Log:
    level: LogLevel
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BindLogContext:
    """New identifiers for every later log line of the call (stream_sid, request_id)."""

    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class Measure:
    """Record ``value`` on ``metric`` (see observability/metrics.py); ``label`` where it has one."""

    metric: MetricName
    value: float = 1.0
    label: str = ""


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell whoever watches the live call (the console) that this happened: per turn or state
    change, never per frame. The pump drops it when nobody can watch (no live API)."""

    type: LiveEventType
    fields: dict[str, Any] = field(default_factory=dict)


Action = (
    SendMedia
    | SendMark
    | ClearTwilio
    | SendToAgent
    | ConnectAgent
    | RunFunction
    | HangUpCall
    | RedirectCall
    | StartRecording
    | RedeemStreamToken
    | EndCall
    | Log
    | BindLogContext
    | Measure
    | Notify
)
