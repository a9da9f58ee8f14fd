"""How a call ends, said three ways: in words for the log and the record (``end_reason``),
as who ended it (``ended_by``), and as the close code of Twilio's socket (``close_code``).
Each is exhaustive over its vocabulary, so a new outcome cannot be forgotten here."""

from __future__ import annotations

from typing import assert_never

from app.core.events import (
    AgentClosed,
    AgentConnectFailed,
    AgentError,
    AgentReadyDeadlinePassed,
    BridgeFailed,
    BridgeShuttingDown,
    CallGone,
    Event,
    MediaDeadlinePassed,
    OutboxFull,
    StartDeadlinePassed,
    StreamEvicted,
    StreamOverCapacity,
    StreamTokenRefused,
    TwilioBadStart,
    TwilioClosed,
    TwilioFrameTooLarge,
    TwilioStop,
)
from app.core.vocabulary import FallbackReason, HangupReason, Outcome, RejectReason

NORMAL_CLOSURE = 1000
GOING_AWAY = 1001  # this process is stopping
POLICY_VIOLATION = 1008  # a stream refused for what the peer sent
MESSAGE_TOO_BIG = 1009  # the server refused a frame over its size limit (and closed with this)
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013


def close_code(end: Outcome | RejectReason) -> int:
    """The WebSocket close code Twilio's socket gets for each way a call or stream ends."""
    match end:
        case (
            Outcome.CALLER_HANGUP
            | Outcome.AGENT_ERROR
            | Outcome.COMPLETED
            | Outcome.TRANSFERRED
            | Outcome.FALLBACK
            | Outcome.STREAM_LOST
        ):
            return NORMAL_CLOSURE  # a dead stream: the close is a courtesy to whatever is left
        case Outcome.OVERSIZE_FRAME:
            return MESSAGE_TOO_BIG
        case Outcome.BRIDGE_ERROR | RejectReason.INTERNAL_ERROR:
            return INTERNAL_ERROR
        case Outcome.BRIDGE_SHUTDOWN | RejectReason.SHUTTING_DOWN:
            return GOING_AWAY
        case RejectReason.NO_START | RejectReason.BAD_START | RejectReason.BAD_TOKEN | RejectReason.BAD_SIGNATURE:
            return POLICY_VIOLATION
        case RejectReason.OVER_CAPACITY | RejectReason.EVICTED:
            return TRY_AGAIN_LATER
        case _:
            assert_never(end)


def ended_by(outcome: Outcome, hangup: HangupReason | None = None, operator: bool = False) -> str:
    """Who ended the call, for the record: the caller, the agent, an operator or the bridge."""
    match outcome:
        case Outcome.COMPLETED | Outcome.TRANSFERRED if operator:
            return "operator"  # hung up or transferred from the console
        case Outcome.CALLER_HANGUP:
            return "caller"
        case Outcome.COMPLETED if hangup is not HangupReason.END_CALL:
            return "bridge"  # the caller went silent, or the time limit
        case Outcome.AGENT_ERROR | Outcome.COMPLETED | Outcome.TRANSFERRED | Outcome.FALLBACK:
            return "agent"
        case Outcome.BRIDGE_ERROR | Outcome.BRIDGE_SHUTDOWN:
            return "bridge"
        case Outcome.STREAM_LOST | Outcome.OVERSIZE_FRAME:
            return "twilio"  # the stream died or broke the protocol: neither party chose to end
        case _:
            assert_never(outcome)


CANNOT_HEAL_CODES = frozenset({"INVALID_SETTINGS", "UNPARSABLE_CLIENT_MESSAGE", "PROMPT_TOO_LONG"})
"""Agent errors a new session with the same Settings would meet again."""


def cannot_heal(failure: Event) -> bool:
    """A failure no reconnect can fix: bad settings, or the key refused (401/403)."""
    match failure:
        case AgentError(code=code):
            return code in CANNOT_HEAL_CODES
        case AgentConnectFailed(reason=reason):
            return reason.startswith(("HTTP 401", "HTTP 403"))
        case _:
            return False


def fallback_reason(event: Event) -> FallbackReason:
    """Why the agent could not take the call, from the event that said so."""
    match event:
        case AgentConnectFailed(reason=reason) if reason.startswith("HTTP "):
            return FallbackReason.AGENT_REFUSED
        case AgentConnectFailed():
            return FallbackReason.AGENT_UNREACHABLE
        case AgentReadyDeadlinePassed():
            return FallbackReason.AGENT_NOT_READY
        case _:
            return FallbackReason.AGENT_FAILED


def end_reason(event: Event) -> str:
    """The end of the call in words, for the log and the record."""
    match event:
        case TwilioStop():
            return "caller hung up (stop)"
        case TwilioClosed(code=code):
            return f"twilio socket closed (code {code})"
        case TwilioFrameTooLarge():
            return "twilio sent a frame over the size limit: socket closed (1009)"
        case MediaDeadlinePassed():
            return "no media from twilio in time: the stream is dead"
        case CallGone(detail=detail):
            return f"the call was already over ({detail})"
        case StreamOverCapacity():
            return "not admitted here and the instance is at MAX_CALLS"
        case StreamEvicted():
            return "no stream token yet, and newer sockets needed the place"
        case TwilioBadStart(detail=detail):
            return f"unusable start message: {detail}"
        case StreamTokenRefused(reason=reason):
            return f"stream token refused: {reason}"
        case StartDeadlinePassed():
            return "no start message in time"
        case AgentConnectFailed(reason=reason):
            return f"agent connection failed: {reason}"
        case AgentReadyDeadlinePassed():
            return "agent session not ready in time"
        case AgentError(code=code):
            return f"agent error {code}"
        case AgentClosed():
            return "agent closed the session"
        case BridgeFailed(reason=reason):
            return reason
        case OutboxFull(which=which):
            return f"{which.value} overflow: peer not reading"
        case BridgeShuttingDown():
            return "bridge shutting down"
        case _:
            return type(event).__name__
