"""Outputs of the call state machine: what the pumps must do, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SendToTwilio:
    """A JSON text frame for Twilio (media, mark or clear), already serialised."""

    text: str


@dataclass(frozen=True, slots=True)
class ClearTwilio:
    """Barge-in: discard Twilio-bound media still queued in the bridge, then send ``text``
    (the ``clear`` message) ahead of anything else."""

    text: str


@dataclass(frozen=True, slots=True)
class SendToAgent:
    """Binary audio (``bytes``) or a JSON text message (``str``) for the agent."""

    data: bytes | str


@dataclass(frozen=True, slots=True)
class ConnectAgent:
    pass


@dataclass(frozen=True, slots=True)
class EndCall:
    """Close both sockets and finish the call's tasks."""

    reason: str
    outcome: str  # completed | caller_hangup | agent_error | agent_closed | bridge_error


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # debug | info | warning | error
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BindLogContext:
    """New identifiers for every later log line of the call (stream_sid, request_id)."""

    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class Measure:
    """Record ``value`` on the metric called ``metric`` (see observability/metrics.py)."""

    metric: str
    value: float = 1.0
    label: str = ""


Action = SendToTwilio | ClearTwilio | SendToAgent | ConnectAgent | EndCall | Log | BindLogContext | Measure
