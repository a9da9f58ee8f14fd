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

MAX_LIVE_EVENTS = 500
"""Events a live call keeps for a console that opens it late (the latest ones): a state change,
a few per turn, so a long call's start is what goes first. The call record has the totals."""

EventSink = Callable[[str, str], None]  # (type, the event as JSON)
AudioSink = Callable[[str, str], None]  # (track, base64 mu-law)


class LiveCall:
    __slots__ = ("_summary", "audio_sinks", "event_sinks", "events", "last_type", "listening", "stream_started")

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

    def summary(self) -> dict[str, Any]:
        """The fields of ``GET /api/calls`` for this call, as of now."""
        return self._summary()

    def event(self, kind: str, fields: dict[str, Any], now: float) -> None:
        event = {"type": kind, "at": round(max(0.0, now - self.stream_started), 3), **fields}
        text = json.dumps(event, separators=(",", ":"))
        self.events.append(text)
        self.last_type = kind
        for sink in list(self.event_sinks):
            sink(kind, text)

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
        encoded = base64.b64encode(payload).decode("ascii")
        for sink in list(self.audio_sinks):
            sink("caller", encoded)

    def agent_media(self, twilio_text: str) -> None:
        """A Twilio ``media`` message the bridge sent (``app.twilio.messages.media``): its
        payload is already the base64 the listener wants, so it is cut out, not re-encoded."""
        start = twilio_text.find('"payload":"')
        if start < 0:
            return
        encoded = twilio_text[start + 11 : -3]
        for sink in list(self.audio_sinks):
            sink("agent", encoded)


def iso_utc(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"
