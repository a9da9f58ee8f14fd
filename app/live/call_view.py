"""One live call as an operator sees it: its events so far (bounded), whoever follows them,
and whoever listens to its audio.

The pump (``app.bridge.CallSession``) owns one of these per accepted call when the live API
is on. Everything here runs on the call's event loop and never waits: a follower or listener
that cannot keep up loses messages (counted), the call never slows down for it.
"""

from __future__ import annotations

import base64
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from app.observability.log_limit import LogLimiter
from app.observability.logging import get_logger

MAX_LIVE_EVENTS = 500
"""Events a live call keeps for a console that opens it late (the latest ones): a state change,
a few per turn, so a long call's start is what goes first. The call record has the totals."""

log = get_logger(component="live")
_LOG_LIMIT = LogLimiter()  # a failing watcher is logged within this bound, for every call of the process

EventSink = Callable[[str, str], None]  # (type, the event as JSON)
AudioSink = Callable[[str, str], None]  # (track, base64 mu-law)


class LiveCall:
    __slots__ = (
        "_summary",
        "audio_sinks",
        "closed",
        "end_callbacks",
        "event_sinks",
        "events",
        "last_type",
        "listening",
        "stream_started",
    )

    def __init__(self, summary: Callable[[], dict[str, Any]], stream_started: float) -> None:
        self._summary = summary
        self.stream_started = stream_started  # the pump's clock at the stream's start
        # kept as the JSON the API sends (an SSE ``data:`` line): a third of a dict's memory, and
        # serialised once however many follow the call
        self.events: deque[str] = deque(maxlen=MAX_LIVE_EVENTS)
        self.last_type = ""
        self.event_sinks: list[EventSink] = []
        self.audio_sinks: list[AudioSink] = []
        self.listening = False  # someone listens: the pump taps the audio (checked per frame)
        self.closed = False  # the call is over and gone from the registry
        self.end_callbacks: list[Callable[[], None]] = []  # followers and listeners to wake at the close

    def summary(self) -> dict[str, Any]:
        """The fields of ``GET /api/calls`` for this call, as of now."""
        return self._summary()

    def event(self, kind: str, fields: dict[str, Any], now: float) -> None:
        event = {"type": kind, "at": round(max(0.0, now - self.stream_started), 3), **fields}
        text = json.dumps(event, separators=(",", ":"))
        self.events.append(text)
        self.last_type = kind
        for sink in list(self.event_sinks):
            try:
                sink(kind, text)
            except Exception as exc:  # a watcher's bug must never reach the call's pump
                self._drop(self.event_sinks, sink, exc)

    def events_so_far(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.events]

    def follow(self, sink: EventSink) -> Callable[[], None]:
        """``sink`` gets the events so far, then each new one; returns how to stop."""
        for text in list(self.events):
            sink(json.loads(text)["type"], text)
        self.event_sinks.append(sink)
        return lambda: self.event_sinks.remove(sink) if sink in self.event_sinks else None

    def listen(self, sink: AudioSink) -> Callable[[], None]:
        """``sink`` gets each audio frame of both tracks from now on; returns how to stop."""
        self.audio_sinks.append(sink)
        self.listening = True

        def stop() -> None:
            if sink in self.audio_sinks:
                self.audio_sinks.remove(sink)
            self.listening = bool(self.audio_sinks)

        return stop

    def caller_audio(self, payload: bytes) -> None:
        self._audio("caller", base64.b64encode(payload).decode("ascii"))

    def _audio(self, track: str, encoded: str) -> None:
        for sink in list(self.audio_sinks):
            try:
                sink(track, encoded)
            except Exception as exc:  # a listener's bug must never reach the call's pump
                self._drop(self.audio_sinks, sink, exc)
        self.listening = bool(self.audio_sinks)

    def close(self) -> None:
        """The call is gone: whoever still follows or listens is woken to finish."""
        self.closed = True
        for wake in list(self.end_callbacks):
            try:
                wake()
            except Exception as exc:
                _LOG_LIMIT.warn(log, "live_watcher_failed", detail=f"{type(exc).__name__}: {exc}"[:200])
        self.end_callbacks.clear()
        self.event_sinks.clear()
        self.audio_sinks.clear()
        self.listening = False

    @staticmethod
    def _drop(sinks: list[Any], sink: Any, exc: Exception) -> None:
        if sink in sinks:
            sinks.remove(sink)
        _LOG_LIMIT.warn(log, "live_watcher_failed", detail=f"{type(exc).__name__}: {exc}"[:200])

    def agent_media(self, twilio_text: str) -> None:
        """A Twilio ``media`` message the bridge sent (``app.twilio.messages.media``): its
        payload is already the base64 the listener wants, so it is cut out, not re-encoded."""
        start = twilio_text.find('"payload":"')
        if start < 0:
            return
        self._audio("agent", twilio_text[start + 11 : -3])


def iso_utc(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"
