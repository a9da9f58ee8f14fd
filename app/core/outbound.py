"""A call the bridge placed: who answered, and how the agent meets them.

The agent must not speak into an empty line, nor over a machine's greeting. So a call placed
with ``POST /api/calls`` waits (``AWAITING_ANSWER``, see ``states.py``) with the callee's audio
held, until one of these, whichever comes first:

- the callee's first words are over ("Hello?": speech, then ``CALLEE_QUIET_SECONDS`` of quiet,
  by the same cheap detector as ``response_timer``; quiet counted in the callee's frames, so a
  pause in their delivery is not taken for the end of a machine's greeting);
- Twilio's answering-machine detection says ``human`` or ``unknown``;
- it says nothing within its timeout (plus ``AMD_GRACE_SECONDS``); or, without AMD, the callee
  says nothing for ``SILENT_CALLEE_SECONDS``.

Then the agent session opens with the profile's greeting, and the callee's held words reach
the agent once the greeting has been sent (so they cannot cut it short). A machine verdict
(``machine_end_*``: after its greeting and beep) opens the session without the greeting, the
agent is given the voicemail message (``InjectAgentMessage``) and the call is completed once
its mark came back; a verdict that comes late, while the agent already talks, cuts that short
(``clear``) and switches to the message. ``fax``: hung up at once.
"""

from __future__ import annotations

from typing import Any

from app.codecs import FRAME_MS
from app.core.options import (
    AMD_GRACE_SECONDS,
    CALLEE_QUIET_SECONDS,
    GREETING_HOLD_SECONDS,
    SILENT_CALLEE_SECONDS,
    OutboundSpec,
)
from app.core.response_timer import LOUD_SAMPLES, QUIET_BYTES, TURN_MIN_FRAMES

QUIET_FRAMES = round(CALLEE_QUIET_SECONDS * 1000 / FRAME_MS)
"""``CALLEE_QUIET_SECONDS`` as quiet frames received (30 of 20 ms)."""

MACHINE = frozenset({"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other"})
PERSON = frozenset({"human", "unknown"})
FAX = "fax"


class Outbound:
    __slots__ = (
        "_quiet_frames",
        "_speech_frames",
        "amd_ms",
        "answered_at",
        "answered_by",
        "greeting_hold_until",
        "message_sent",
        "muted",
        "spec",
        "voicemail",
        "voicemail_left",
    )

    def __init__(self, spec: OutboundSpec, answered_at: float) -> None:
        self.spec = spec
        self.answered_at = answered_at  # the stream's start: the callee picked up
        self.answered_by = ""  # AMD's verdict, once it came
        self.amd_ms: int | None = None
        self.voicemail = False  # a machine: the agent leaves the message, the callee's audio is not relayed
        self.voicemail_left = False  # the message played through (its mark came back)
        self.message_sent = False  # the message went to the agent (InjectAgentMessage)
        self.muted = False  # a late verdict: the agent's reply to the machine is dropped until the message
        self.greeting_hold_until: float | None = None  # the callee's audio is held until the greeting is sent
        self._speech_frames = 0
        self._quiet_frames = 0  # received since the latest speech frame

    def callee_frame(self, payload: bytes) -> None:
        """Before anyone is greeted: is the callee saying something?"""
        if len(payload.translate(None, QUIET_BYTES)) >= LOUD_SAMPLES:
            self._speech_frames += 1
            self._quiet_frames = 0
        else:
            self._quiet_frames += 1

    def due(self, now: float) -> str | None:
        """In ``AWAITING_ANSWER``: why it is time to greet a person now, or None."""
        if self._speech_frames >= TURN_MIN_FRAMES and self._quiet_frames >= QUIET_FRAMES:
            return "the callee spoke"
        waited = now - self.answered_at
        if self.spec.amd and waited >= self.spec.amd_timeout + AMD_GRACE_SECONDS:
            return "no answering-machine verdict in time: a person"
        if not self.spec.amd and self._speech_frames == 0 and waited >= SILENT_CALLEE_SECONDS:
            return "the callee said nothing"
        return None

    def verdict(self, answered_by: str, amd_ms: int | None) -> bool:
        """Record Twilio's verdict; False if one came already (the first one counts)."""
        if self.answered_by:
            return False
        self.answered_by = answered_by[:32]
        self.amd_ms = amd_ms
        return True

    def hold_greeting(self, now: float) -> None:
        self.greeting_hold_until = now + GREETING_HOLD_SECONDS

    def holding(self, now: float) -> bool:
        """The callee's audio is held while the greeting is sent (bounded)."""
        until = self.greeting_hold_until
        return until is not None and now < until

    def record(self) -> dict[str, Any]:
        return {
            "direction": "outbound",
            "answered_by": self.answered_by or None,
            "amd_ms": self.amd_ms,
            "voicemail_left": self.voicemail_left,
        }
