"""The caller's audio on its way to the agent: transcoded if the agent wants another format,
and held in a bounded pre-buffer until the agent session is ready, then delivered in order.

Nothing is lost silently: past the bound the oldest audio is dropped, counted and logged
once. Whether the agent is ready is the call's state (``states.py``), passed in per frame.
"""

from __future__ import annotations

from collections import deque

from app.codecs import TWILIO_FORMAT, Transcoder, frames
from app.core.actions import Action, Log, SendToAgent
from app.core.options import CallOptions
from app.core.stats import CallStats
from app.core.vocabulary import LogLevel, Overflow


class CallerInput:
    __slots__ = ("_buffer", "_buffered", "_frame_bytes", "_limit", "_stats", "_tail", "_to_agent")

    def __init__(self, options: CallOptions, stats: CallStats) -> None:
        self._stats = stats
        self._buffer: deque[bytes] = deque()  # the caller's own mu-law, as it came
        self._buffered = 0
        self._tail = b""  # converted audio the resampler held when the agent session was lost
        self.configure(options)

    def configure(self, options: CallOptions) -> None:
        """The call's profile is known (at the stream token): its agent format and bound. What
        is held is still Twilio's audio, so it does not matter which profile buffered it."""
        self._to_agent = (
            None if options.agent_input == TWILIO_FORMAT else Transcoder(TWILIO_FORMAT, options.agent_input)
        )
        self._limit = options.prebuffer_bytes
        self._frame_bytes = options.agent_frame_bytes

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def push(self, payload: bytes, relay: bool) -> list[Action]:
        """One frame of caller audio (Twilio's mu-law): relayed once the call says the agent
        is ready (``relay``), else held."""
        stats = self._stats
        stats.caller_frames += 1
        stats.caller_bytes += len(payload)
        if not relay:
            return self._hold(payload)
        data = payload if self._to_agent is None else self._to_agent.convert(payload)
        if not data:
            return []  # a partial sample, carried by the transcoder into the next frame
        return [SendToAgent(data)]

    def discard(self, payload: bytes) -> None:
        """A frame counted, not relayed nor held (an answering machine's silence while the agent
        leaves its message)."""
        self._stats.caller_frames += 1
        self._stats.caller_bytes += len(payload)

    def drop_held(self) -> None:
        """What is held is not for the agent after all (a machine's greeting): forgotten."""
        self._buffer.clear()
        self._buffered = 0
        self._tail = b""

    def _hold(self, data: bytes) -> list[Action]:
        self._buffer.append(data)
        self._buffered += len(data)
        dropped = 0
        while self._buffered > self._limit and len(self._buffer) > 1:
            old = self._buffer.popleft()
            self._buffered -= len(old)
            dropped += len(old)
        if not dropped:
            return []
        self._stats.caller_bytes_dropped += dropped
        if self._stats.count_overflow(Overflow.CALLER_PREBUFFER):
            return [
                Log(
                    LogLevel.WARNING,
                    "caller_audio_dropped",
                    {"reason": "agent not ready, pre-buffer full", "limit_bytes": self._limit},
                )
            ]
        return []

    def session_lost(self) -> None:
        """The agent session is gone: what the resampler still holds (up to ~120 ms, see
        ``codecs.Transcoder``) was never sent, so it goes first to the next session."""
        if self._to_agent is not None:
            self._tail += self._to_agent.flush()

    def flush(self) -> list[Action]:
        """The agent is ready: everything held goes out first, in order, in 20 ms frames (so
        the agent queue's size depends only on the pre-buffer's duration, however the caller's
        frames were cut)."""
        held, self._tail = self._tail, b""
        if self._buffer:
            raw = b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            held += raw if self._to_agent is None else self._to_agent.convert(raw)
        return [SendToAgent(frame) for frame in frames(held, self._frame_bytes)] if held else []
