"""Recording with consent (profile ``bridge.recording``; off by default).

The greeting announces the recording (``config.py`` puts the announcement first in it). With
implied consent the call is recorded once the announcement has played through: a caller who
talked over it may not have heard it, so nothing is recorded. With explicit consent the call
is recorded only once the caller presses the consent key or says yes, from the start of the
call until ``consent_window`` seconds after the announcement; no consent, no recording.

Twilio does the recording (both channels, through the REST API), so the operator's recordings
stay with their other recordings; the call record stamps how and when consent was given.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from app.core.actions import Action, Log, Measure, StartRecording
from app.core.options import RecordingSpec
from app.core.vocabulary import Consent, ConsentMode, LogLevel, MetricName, RecordingResult

NEGATIONS = frozenset({"no", "not", "don't", "dont", "nope", "never", "without"})
"""Words that turn a yes into a no ("yes, no, I don't agree"): any of them, and it is no consent."""

_WORD = re.compile(r"[a-z']+")


class RecordingState(StrEnum):
    ANNOUNCING = "announcing"  # the greeting (with the announcement) has not finished playing
    AWAITING_CONSENT = "awaiting_consent"  # explicit: announced, the window is open
    REQUESTED = "requested"  # consent given, Twilio asked
    RECORDING = "recording"
    NOT_RECORDING = "not_recording"  # no consent, or Twilio refused: final


class Recording:
    """One call's consent and recording. Every input is cheap when recording is off."""

    __slots__ = ("_call_sid", "_spec", "_window_ends", "consent", "consent_at", "detail", "sid", "state")

    def __init__(self, spec: RecordingSpec | None) -> None:
        self._spec = spec
        self._call_sid = ""
        self._window_ends: float | None = None
        self.state = RecordingState.ANNOUNCING if spec is not None else RecordingState.NOT_RECORDING
        self.consent: Consent | None = None
        self.consent_at: float | None = None  # seconds into the call
        self.sid = ""
        self.detail = ""

    @property
    def waiting(self) -> bool:
        """Still deciding: the announcement or the caller's answer is awaited."""
        return self.state in (RecordingState.ANNOUNCING, RecordingState.AWAITING_CONSENT)

    def bind(self, call_sid: str) -> None:
        self._call_sid = call_sid

    def announced(self, interrupted: bool, now: float, started_at: float) -> list[Action]:
        """The greeting, which carries the announcement, has played (or was cut short)."""
        spec = self._spec
        if spec is None or self.state is not RecordingState.ANNOUNCING:
            return []
        if spec.consent is ConsentMode.IMPLIED:
            if interrupted:
                return self._no_consent("the caller talked over the announcement")
            return self._consented(Consent.IMPLIED, now, started_at)
        self.state = RecordingState.AWAITING_CONSENT
        self._window_ends = now + spec.consent_window
        return []

    def key(self, digit: str, now: float, started_at: float) -> tuple[list[Action], bool]:
        """A key press; True if it was the consent key (it then goes no further: not to the agent)."""
        spec = self._spec
        if spec is None or spec.consent is not ConsentMode.EXPLICIT or not self.waiting or digit != spec.consent_key:
            return [], False
        return self._consented(Consent.KEY, now, started_at), True

    def said(self, text: str, now: float, started_at: float) -> list[Action]:
        """What the caller said (Deepgram's transcript): a yes, without a no, is consent."""
        spec = self._spec
        if spec is None or spec.consent is not ConsentMode.EXPLICIT or not self.waiting:
            return []
        words = set(_WORD.findall(text.lower()))
        if words & NEGATIONS or not words & set(spec.consent_words):
            return []
        return self._consented(Consent.SPEECH, now, started_at)

    def tick(self, now: float) -> list[Action]:
        if self.state is RecordingState.AWAITING_CONSENT and self._window_ends is not None and now >= self._window_ends:
            return self._no_consent("no consent within the window")
        return []

    def started(self, sid: str) -> list[Action]:
        self.state, self.sid = RecordingState.RECORDING, sid
        return [
            Log(LogLevel.INFO, "recording_started", {"recording_sid": sid}),
            Measure(MetricName.RECORDINGS, 1, RecordingResult.STARTED.value),
        ]

    def failed(self, detail: str) -> list[Action]:
        self.state, self.detail = RecordingState.NOT_RECORDING, detail
        return [
            Log(LogLevel.ERROR, "recording_failed", {"detail": detail}),
            Measure(MetricName.RECORDINGS, 1, RecordingResult.FAILED.value),
        ]

    def record(self) -> dict[str, Any] | None:
        """The call record's ``recording`` (None when the profile does not record)."""
        if self._spec is None:
            return None
        out: dict[str, Any] = {
            "consent_mode": self._spec.consent.value,
            "consent": (self.consent or Consent.NONE).value,
            "state": self.state.value,
        }
        if self.consent_at is not None:
            out["consent_at_s"] = self.consent_at
        if self.sid:
            out["recording_sid"] = self.sid
        if self.detail:
            out["detail"] = self.detail
        return out

    def _consented(self, how: Consent, now: float, started_at: float) -> list[Action]:
        assert self._spec is not None
        self.state, self.consent = RecordingState.REQUESTED, how
        self.consent_at = round(now - started_at, 3)
        return [
            Log(LogLevel.INFO, "recording_consent", {"consent": how.value, "at_s": self.consent_at}),
            StartRecording(self._call_sid, self._spec.status_callback_url),
        ]

    def _no_consent(self, why: str) -> list[Action]:
        self.state, self.consent, self.detail = RecordingState.NOT_RECORDING, Consent.NONE, why
        return [
            Log(LogLevel.INFO, "recording_not_started", {"reason": why}),
            Measure(MetricName.RECORDINGS, 1, RecordingResult.NO_CONSENT.value),
        ]
