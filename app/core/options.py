"""Per-call settings and every limit of a call, each with what it depends on and what it costs.

A limit that depends on a setting is derived from it here (``CallOptions.agent_queue_limit``),
never written down twice, so any profile the config accepts works: a 60 s pre-buffer gets an
agent queue that can take its flush.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.codecs import FRAME_MS, TWILIO_FORMAT, AudioFormat

FRAMES_PER_SECOND = 1000 // FRAME_MS  # Twilio sends one 20 ms media frame at a time

TICK_SECONDS = 0.5
"""How often the pump feeds ``Tick``: the resolution of every deadline below (start, agent
ready, keep-alive) and of the metric flushes. Costs one wake-up per call per tick."""

AGENT_BACKLOG_SECONDS = 30.0
"""Live caller audio the agent may leave unread before the call is ended as stuck
(``Overflow.AGENT_QUEUE``): far beyond any network hiccup, short of growing without bound."""

TWILIO_QUEUE_LIMIT = 4000
"""Twilio-bound items (media, marks, clear) queued in the bridge. The agent sends speech
faster than real time, in bursts of a whole utterance; Twilio reads at socket speed, so the
queue is normally near empty and fills only when Twilio stops reading. The items' audio is
bounded apart, by ``TWILIO_QUEUE_AUDIO_BYTES``; this bounds their count (~150 bytes of
overhead each, so 0.6 MB at most)."""

TWILIO_QUEUE_AUDIO_SECONDS = 120.0
TWILIO_QUEUE_AUDIO_BYTES = TWILIO_FORMAT.bytes_for(TWILIO_QUEUE_AUDIO_SECONDS)
"""Agent audio queued for Twilio, in mu-law bytes (what Twilio gets, whatever the agent's
format): two minutes, longer than any one answer, so only a Twilio that stopped reading
reaches it (``Overflow.TWILIO_QUEUE``). As base64 text that is 1.3 MB per call at most,
however large the agent's chunks are."""

MAX_OUTSTANDING_MARKS = 256
"""Marks sent to Twilio and not yet returned, and marks cleared by barge-in that Twilio has
not returned yet: one per agent utterance. A Twilio that never returns marks cannot grow
these sets past this; the oldest is forgotten (its mark then counts as unknown)."""

MAX_LOGGED_UNKNOWN_AGENT_TYPES = 32
"""Distinct unknown agent message types logged per call (each once); the rest are ignored
silently so a peer inventing types cannot flood the log."""


@dataclass(frozen=True)
class CallOptions:
    """Per-call settings, derived from the agent profile and the service config."""

    agent: dict[str, Any] | str
    agent_input: AudioFormat = TWILIO_FORMAT
    agent_output: AudioFormat = TWILIO_FORMAT
    tags: tuple[str, ...] = ()
    start_timeout: float = 10.0
    """Socket accepted to a usable ``start``. Twilio sends ``connected`` and ``start`` at once;
    a socket that stays silent this long is not Twilio, and costs no agent session."""
    keepalive_after: float = 5.0
    """Quiet time before a KeepAlive: the agent closes after 10 s without a message
    (CLIENT_MESSAGE_TIMEOUT), and ticks come every ``TICK_SECONDS``."""
    agent_ready_timeout: float = 10.0
    """Stream start to SettingsApplied. Meanwhile the caller's audio is pre-buffered."""
    max_prebuffer_seconds: float = 10.0
    """Caller audio kept while the agent is not ready; beyond it the oldest is dropped and
    counted. Memory: seconds x agent input bytes per second (80 KB/s for mu-law 8 kHz, 96 KB/s
    for linear16 48 kHz), so the profile's maximum of 60 s costs at most 5.8 MB per call."""
    log_transcripts: bool = False

    @property
    def prebuffer_bytes(self) -> int:
        return self.agent_input.bytes_for(self.max_prebuffer_seconds)

    @property
    def agent_frame_bytes(self) -> int:
        """One 20 ms frame in the agent's input format: the unit the pre-buffer is flushed in."""
        return self.agent_input.bytes_for(FRAME_MS / 1000)

    @property
    def agent_queue_limit(self) -> int:
        """Items the agent send queue must hold: the whole pre-buffer flushed at once when the
        agent becomes ready (in 20 ms frames, the last one partial, plus the frame that
        overflowed the bound), then the live backlog, plus a few control messages (Settings,
        KeepAlive, function responses). An item is one 20 ms frame in the agent's input
        format plus ~100 bytes of overhead: the 60 s + 30 s maximum is 4.5k items, 1.2 MB for
        mu-law 8 kHz and 9 MB for linear16 48 kHz, per call, only while the agent is stuck."""
        flush = -(-self.prebuffer_bytes // self.agent_frame_bytes) + 2
        return flush + int(AGENT_BACKLOG_SECONDS * FRAMES_PER_SECOND) + 16
