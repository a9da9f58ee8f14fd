"""Who answers the REST stand-in's outbound calls, and how: simulated callees, by ``To`` number.

When the bridge places a call (``Calls.create``), Twilio dials a number and whatever answers
it behaves its own way: a person says "hello?" and talks back, a voicemail plays a greeting
and a beep and records, a phone menu waits for keys, a fax whistles, a line is busy or nobody
answers. The stand-in (``app.devtools.twilio_api``) plays Twilio for such a call with
:class:`OutboundDial`: signed status callbacks (initiated, ringing, in-progress, then
completed, or busy / no-answer / failed / canceled), the webhook at answer (or the ``Twiml``
given), the TwiML followed (``<Connect><Stream>`` through the simulated caller's stream
machinery, ``<Play digits>``, ``<Pause>``, ``<Hangup>``, ``<Redirect>``, ``<Dial>``; others are
noted and skipped), the asynchronous AMD callback at the callee's moment, REST hang-ups and
redirects. What the callee went through is kept in a :class:`CalleeResult`.

The documented numbers (``DEFAULT_CALLEES``; tests may register their own callees on the
stand-in instead, ``stand_in.callees["+15551234567"] = Callee(CalleeKind.VOICEMAIL)``):

=============  ============  ===============================================================
+15550100001   person        rings 1 s; "hello?" 0.5 s into the call, a reply each time the
                             bridge's audio has ended (0.4 s quiet + 0.3 s), hangs up at 15 s;
                             AMD ``human`` at 1.5 s
+15550100002   voicemail     rings 1 s; a 3 s greeting from 0.2 s, a 1 kHz beep 3.5-3.9 s, then
                             records what plays for 15 s; AMD ``machine_end_beep`` at 4.0 s
+15550100003   menu          rings 0.5 s; a 1.9 s prompt from 0.3 s, then decodes keys (in-band
                             DTMF) and, 1 s after each burst, says what it got; hangs up at
                             20 s; AMD ``unknown`` at 3 s
+15550100004   fax           rings 0.5 s; 1100 Hz CNG 0.5 s on, 3 s off; hangs up at 10 s; AMD
                             ``fax`` at 1 s
+15550100005   busy          rings 0.5 s, then ``busy``
+15550100006   no_answer     rings ``Timeout`` (at most the stand-in's ``ring_cap_s``, 3 s),
                             then ``no-answer``
+15550100007   late_machine  a voicemail with a 5.2 s greeting: beep 5.7-6.1 s, AMD
                             ``machine_end_beep`` at 6.2 s
+15550100008   no_verdict    a person for whom no AMD callback ever comes
+15550100009   failed        ``failed`` 0.2 s after ``initiated``, without ringing
=============  ============  ===============================================================

``initiated`` goes 0.05 s after the 201 and ``ringing`` 0.1 s after it; ring times count
from then. A call not yet answered that is hung up through the API (``Status=completed`` or
``canceled``) ends ``canceled``. Keys played by ``<Play digits>`` (a REST redirect, which ends
the stream as Twilio's does) or ``SendDigits`` reach a menu as keys; a ``<Connect><Stream>``
after them opens a new stream of the same call.

Times "into the call" run on the callee's own clock: 20 ms per frame of its media stream,
from the stream's start (the webhook's round trip after the answer is not in them), so a
verdict "after the beep" is after the beep in the audio the bridge received.
``MachineDetectionDuration`` is the real time from the answer to the verdict, in ms. With
``MachineDetection=Enable``, machines are ``machine_start`` at 2.5 s; a verdict later than
``MachineDetectionTimeout`` is ``unknown`` at the timeout; with ``SendDigits``, no AMD (as
Twilio); synchronous AMD (no ``AsyncAmd=true``) is not simulated: no verdict is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib
import math
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Coroutine
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Protocol

from websockets.exceptions import WebSocketException

from app.codecs import FRAME_MS, TWILIO_FORMAT, TWILIO_FRAME_BYTES, TWILIO_SAMPLE_RATE, to_linear16
from app.devtools import synth
from app.devtools.simulated_caller import (
    SILENCE,
    CallResult,
    SimulatedCaller,
    SimulationError,
    TimelineEntry,
    describe_update,
)
from app.devtools.speech import SpeechDetector, SpeechEvent
from app.devtools.twilio_api import API_VERSION, CallState, CallUpdate, TwilioApiStandIn

FRAME_S = FRAME_MS / 1000
INITIATED_AFTER_S = 0.05  # after the 201: the API's answer is (nearly always) first
RINGING_AFTER_S = 0.1
FAILED_AFTER_S = 0.2
LEAD_S = 0.2  # a machine's greeting starts this long after it answers
BEEP_GAP_S = 0.3  # between the greeting's end and the beep
BEEP_S = 0.4
BEEP_HZ = 1000
AMD_AFTER_BEEP_S = 0.1  # a DetectMessageEnd machine verdict comes this long after the beep
MACHINE_START_S = 2.5  # with MachineDetection=Enable a machine is known this far into the call
CNG_HZ = 1100
CNG_ON_S = 0.5
CNG_OFF_S = 3.0
MENU_PROMPT_AT_S = 0.3
KEY_S = 0.25  # one key of <Play digits> / SendDigits as Twilio plays it, tone and gap
KEY_WAIT_S = 0.5  # a "w" in them
MAX_DOCUMENTS = 10  # TwiML documents one call may go through (redirects, <Connect action>)
MAX_PAUSE_S = 60.0
UPDATE_QUEUE = 8
AMD_VERDICTS = frozenset(
    {"human", "machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax", "unknown"}
)
GREETING = "hi you have reached the voicemail of sam please leave a message after the tone"


class CalleeKind(enum.StrEnum):
    PERSON = "person"
    VOICEMAIL = "voicemail"
    MENU = "menu"
    FAX = "fax"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    LATE_MACHINE = "late_machine"
    NO_VERDICT = "no_verdict"
    FAILED = "failed"


NUMBERS: dict[CalleeKind, str] = {
    CalleeKind.PERSON: "+15550100001",
    CalleeKind.VOICEMAIL: "+15550100002",
    CalleeKind.MENU: "+15550100003",
    CalleeKind.FAX: "+15550100004",
    CalleeKind.BUSY: "+15550100005",
    CalleeKind.NO_ANSWER: "+15550100006",
    CalleeKind.LATE_MACHINE: "+15550100007",
    CalleeKind.NO_VERDICT: "+15550100008",
    CalleeKind.FAILED: "+15550100009",
}
"""The documented number of each kind of callee."""


@dataclass(frozen=True)
class _KindDefaults:
    ring_s: float
    hang_up_after: float | None  # None: after the recording time (machines)
    answered_by: str | None  # None: no AMD callback ever
    amd_at: float | None  # None: right after the beep (machines)
    greeting_s: float = 0.0
    final_status: str | None = None  # the call is never answered: how it ends


KIND_DEFAULTS: dict[CalleeKind, _KindDefaults] = {
    CalleeKind.PERSON: _KindDefaults(1.0, 15.0, "human", 1.5),
    CalleeKind.VOICEMAIL: _KindDefaults(1.0, None, "machine_end_beep", None, greeting_s=3.0),
    CalleeKind.MENU: _KindDefaults(0.5, 20.0, "unknown", 3.0),
    CalleeKind.FAX: _KindDefaults(0.5, 10.0, "fax", 1.0),
    CalleeKind.BUSY: _KindDefaults(0.5, 0.0, None, None, final_status="busy"),
    CalleeKind.NO_ANSWER: _KindDefaults(math.inf, 0.0, None, None, final_status="no-answer"),
    CalleeKind.LATE_MACHINE: _KindDefaults(1.0, None, "machine_end_beep", None, greeting_s=5.2),
    CalleeKind.NO_VERDICT: _KindDefaults(1.0, 15.0, None, None),
    CalleeKind.FAILED: _KindDefaults(0.0, 0.0, None, None, final_status="failed"),
}


def _samples(seconds: float) -> int:
    return round(seconds * TWILIO_SAMPLE_RATE)


@dataclass(frozen=True)
class CalleePlan:
    """A callee's script with every time resolved (seconds into the call, on its clock)."""

    kind: CalleeKind
    ring_s: float
    final_status: str | None  # None: it answers
    hang_up_after: float
    answered_by: str | None
    amd_at: float
    greeting_s: float
    beep_start: float | None  # machines only
    beep_end: float | None


@dataclass(frozen=True)
class Callee:
    """One callee's script: a kind, and what to change in that kind's defaults (None: keep).

    ``hang_up_after``: seconds into the call when it hangs up (voicemail: default the beep's
    end plus ``max_record_s``); ``answered_by`` / ``amd_at``: the AMD verdict
    (DetectMessageEnd) and when; ``greeting_s``: a machine's greeting. A person says
    ``first_words`` ``answer_pause_s`` into the call, then one of ``replies`` (in turn, each
    once) ``reply_delay_s`` after each time the bridge's audio has ended; a menu says
    ``prompt``, then after each burst of keys (``burst_gap_s`` without a new one) what it got.
    """

    kind: CalleeKind
    ring_s: float | None = None
    hang_up_after: float | None = None
    answered_by: str | None = None
    amd_at: float | None = None
    greeting_s: float | None = None
    max_record_s: float = 15.0
    first_words: str = "hello?"
    answer_pause_s: float = 0.5
    replies: tuple[str, ...] = ("yes speaking", "sure go ahead", "okay thanks bye")
    reply_delay_s: float = 0.3
    prompt: str = "main menu press one or two"
    burst_gap_s: float = 1.0

    def __post_init__(self) -> None:
        if self.answered_by is not None and self.answered_by not in AMD_VERDICTS:
            raise ValueError(f"answered_by must be one of {sorted(AMD_VERDICTS)}, not {self.answered_by!r}")

    @property
    def machine(self) -> bool:
        return self.kind in (CalleeKind.VOICEMAIL, CalleeKind.LATE_MACHINE)

    def plan(self) -> CalleePlan:
        base = KIND_DEFAULTS[self.kind]
        greeting = self.greeting_s if self.greeting_s is not None else base.greeting_s
        beep_start = beep_end = None
        if self.machine:
            before_beep = _samples(LEAD_S) + _samples(greeting) + _samples(BEEP_GAP_S)
            beep_start = before_beep / TWILIO_SAMPLE_RATE
            beep_end = (before_beep + _samples(BEEP_S)) / TWILIO_SAMPLE_RATE
        amd_at = self.amd_at if self.amd_at is not None else base.amd_at
        if amd_at is None:
            amd_at = round((beep_end or 0.0) + AMD_AFTER_BEEP_S, 3)
        hang_up_after = self.hang_up_after if self.hang_up_after is not None else base.hang_up_after
        if hang_up_after is None:
            hang_up_after = round((beep_end or 0.0) + self.max_record_s, 3)
        return CalleePlan(
            kind=self.kind,
            ring_s=self.ring_s if self.ring_s is not None else base.ring_s,
            final_status=base.final_status,
            hang_up_after=hang_up_after,
            answered_by=self.answered_by if self.answered_by is not None else base.answered_by,
            amd_at=amd_at,
            greeting_s=greeting,
            beep_start=beep_start,
            beep_end=beep_end,
        )


DEFAULT_CALLEES: dict[str, Callee] = {number: Callee(kind) for kind, number in NUMBERS.items()}
"""Who answers the documented numbers, unless a test registers its own on the stand-in."""


@dataclass
class PostedCallback:
    """One request the stand-in made to the bridge for an outbound call."""

    kind: str  # "status" | "amd" | "webhook"
    url: str
    params: dict[str, str]
    at: float  # seconds since the call was created
    method: str = "POST"
    http_status: int | None = None  # None while unanswered; 0: nothing answered (refused, timed out)


@dataclass
class CalleeResult:
    """What one outbound call's callee went through. ``ended``: ``bridge_rest_hangup`` (a REST
    ``Status=completed``), ``stream_closed`` (the bridge closed the stream and the TwiML had
    nothing more), ``callee_hangup``, ``busy`` / ``no-answer`` / ``failed`` / ``canceled``
    (never answered), ``twiml_hangup`` (``<Hangup/>``), ``dialed_elsewhere`` (``<Dial>``),
    ``stream_failed`` (the WebSocket could not be opened), ``twiml_ended``,
    ``application_error`` (the webhook failed or its TwiML was not usable) or
    ``stand_in_stopped``."""

    call_sid: str
    kind: CalleeKind
    to: str
    from_: str
    answered_at: float | None = None  # seconds since the call was created
    timeline: list[TimelineEntry] = field(default_factory=list)
    # the bridge's audio as it played (mu-law): in order, without gaps, without what a clear dropped
    heard: bytearray = field(default_factory=bytearray)
    message: bytearray = field(default_factory=bytearray)  # voicemail: what played after the beep
    digits: list[str] = field(default_factory=list)  # menu: keys heard, in order
    digit_bursts: list[str] = field(default_factory=list)  # menu: the keys of each burst
    amd_sent: tuple[str, float] | None = None  # (AnsweredBy, seconds since the call was created)
    callbacks: list[PostedCallback] = field(default_factory=list)
    rest_updates: list[CallUpdate] = field(default_factory=list)
    streams: list[CallResult] = field(default_factory=list)  # one per <Connect><Stream> followed
    ended: str = ""
    final_status: str = ""  # the last CallStatus posted (completed, busy, no-answer, failed, canceled)
    duration_s: int = 0  # CallDuration: from the answer to the end, whole seconds rounded up
    error: str | None = None  # an exception that cut the simulation short (a bug)

    @property
    def statuses(self) -> list[tuple[str, int | None]]:
        """(CallStatus, HTTP status the bridge answered) of each status callback, in order."""
        return [(c.params["CallStatus"], c.http_status) for c in self.callbacks if c.kind == "status"]

    def callbacks_of(self, kind: str) -> list[PostedCallback]:
        return [c for c in self.callbacks if c.kind == kind]

    def transcript(self) -> str:
        return "\n".join(f"[{e.t:7.2f}s] {e.who:<6} {e.text}" for e in self.timeline)


class DigitDetector(Protocol):
    """``app.devtools.dtmf_detect.DtmfDetector``: mu-law in, the keys completed in it out."""

    def feed(self, ulaw: bytes) -> list[str]: ...


def load_dtmf_detector() -> DigitDetector | None:
    """A DTMF detector, or None where ``app.devtools.dtmf_detect`` is not there (yet)."""
    try:
        module = importlib.import_module("app.devtools.dtmf_detect")
    except ImportError:
        return None
    detector: DigitDetector = module.DtmfDetector()
    return detector


# --- audio ----------------------------------------------------------------------------------


def speech(text: str) -> bytes:
    """Speech-like mu-law for ``text`` (``synth``'s tone bursts: deterministic)."""
    return synth.encode(synth.speech_like(text), TWILIO_FORMAT)


def tone(freq: float, seconds: float) -> bytes:
    return synth.encode(synth.tone(freq, seconds), TWILIO_FORMAT)


def silence(seconds: float) -> bytes:
    return SILENCE * _samples(seconds)


def greeting(seconds: float) -> bytes:
    """A voicemail greeting of exactly ``seconds``: whole words while they fit, then quiet."""
    words_cycle = GREETING.split()
    words: list[str] = []
    length = 0
    for i in range(1000):
        word = words_cycle[i % len(words_cycle)]
        added = len(speech(word))
        if length + added > _samples(seconds):
            break
        words.append(word)
        length += added
    audio = speech(" ".join(words)) if words else b""
    return audio[: _samples(seconds)].ljust(_samples(seconds), SILENCE)


# --- the callees' voices --------------------------------------------------------------------


class _Voice:
    """A callee on the line (a ``CallerVoice`` for the simulated caller's stream): what it says
    frame by frame, what it hears. Its clock counts the frames sent: 20 ms each."""

    def __init__(self, dial: OutboundDial) -> None:
        self.dial = dial
        self.callee = dial.callee
        self.plan = dial.plan
        self.result = dial.result
        self.out = bytearray()  # what it is saying, not sent yet: bounded by the script
        self.sent_frames = 0
        self.played_frames = 0
        self.bridge_speech = SpeechDetector()
        self.hung_up = False

    @property
    def t(self) -> float:
        return self.sent_frames * FRAME_S

    def say(self, audio: bytes, what: str) -> None:
        self.out += audio
        self.dial.note("callee", what)

    def next_frame(self) -> bytes | None:
        if self.dial.aborting or self.hung_up:
            return None
        t = self.t
        if t >= self.plan.hang_up_after:
            self.hung_up = True
            self.dial.note("callee", f"hangs up ({t:.1f} s into the call)")
            return None
        self.dial.amd_clock(t)
        self.step(t)
        frame = bytes(self.out[:TWILIO_FRAME_BYTES])
        del self.out[:TWILIO_FRAME_BYTES]
        self.sent_frames += 1
        return frame.ljust(TWILIO_FRAME_BYTES, SILENCE)

    def on_played(self, chunk: bytes) -> None:
        t = self.played_frames * FRAME_S
        self.played_frames += 1
        self.result.heard += chunk
        frame = chunk.ljust(TWILIO_FRAME_BYTES, SILENCE)
        event = self.bridge_speech.feed(to_linear16(frame, "mulaw"))
        if event is SpeechEvent.ONSET:
            self.dial.note("bridge", "audio starts (speech)")
        elif event is SpeechEvent.OFFSET:
            self.dial.note("bridge", "audio ends")
        self.hear(t, chunk, frame, event)

    def step(self, t: float) -> None:
        """What the callee does at ``t`` into the call, before the frame goes."""

    def hear(self, t: float, chunk: bytes, frame: bytes, event: SpeechEvent | None) -> None:
        """The bridge's audio that played from ``t`` (``frame``: padded with silence)."""

    def hear_digits(self, digits: str) -> None:
        """Keys Twilio played to it (``<Play digits>``, ``SendDigits``)."""
        self.dial.note("callee", f"hears keys {digits} (and ignores them)")


class _Person(_Voice):
    def __init__(self, dial: OutboundDial) -> None:
        super().__init__(dial)
        self.greeted = False
        self.replies = list(self.callee.replies)
        self.reply_at: float | None = None

    def step(self, t: float) -> None:
        if not self.greeted and t >= self.callee.answer_pause_s:
            self.greeted = True
            self.say(speech(self.callee.first_words), f"says {self.callee.first_words!r}")
        if self.reply_at is not None and t >= self.reply_at:
            self.reply_at = None
            if self.replies and not self.bridge_speech.in_speech:
                words = self.replies.pop(0)
                self.say(speech(words), f"says {words!r}")

    def hear(self, t: float, chunk: bytes, frame: bytes, event: SpeechEvent | None) -> None:
        if event is SpeechEvent.OFFSET and self.greeted:
            self.reply_at = self.t + self.callee.reply_delay_s


class _Machine(_Voice):
    """A voicemail: greeting, beep, then it records what plays."""

    def __init__(self, dial: OutboundDial) -> None:
        super().__init__(dial)
        self.beep_start = self.plan.beep_start or 0.0
        self.beep_end = self.plan.beep_end or 0.0
        self.stage = 0  # 0 silent, 1 greeting, 2 beep, 3 recording

    def step(self, t: float) -> None:
        if self.stage == 0:
            self.stage = 1
            audio = silence(LEAD_S) + greeting(self.plan.greeting_s) + silence(BEEP_GAP_S) + tone(BEEP_HZ, BEEP_S)
            self.say(audio, f"plays its greeting ({self.plan.greeting_s:.1f} s), then a beep")
        elif self.stage == 1 and t >= self.beep_start:
            self.stage = 2
            self.dial.note("callee", "beep")
        elif self.stage == 2 and t >= self.beep_end:
            self.stage = 3
            self.dial.note("callee", "beep over: recording")

    def hear(self, t: float, chunk: bytes, frame: bytes, event: SpeechEvent | None) -> None:
        if t >= self.beep_end:
            self.result.message += chunk


class _Menu(_Voice):
    def __init__(self, dial: OutboundDial) -> None:
        super().__init__(dial)
        self.detector = load_dtmf_detector()
        self.prompted = False
        self.burst: list[str] = []
        self.last_key_at = 0.0

    def step(self, t: float) -> None:
        if not self.prompted and t >= MENU_PROMPT_AT_S:
            self.prompted = True
            self.say(speech(self.callee.prompt), f"says {self.callee.prompt!r}")
            if self.detector is None:
                self.dial.note("callee", "cannot decode keys: app.devtools.dtmf_detect is missing")
        if self.burst and t - self.last_key_at >= self.callee.burst_gap_s:
            keys = "".join(self.burst)
            self.burst.clear()
            self.result.digit_bursts.append(keys)
            words = "you entered " + " ".join(keys)
            self.say(speech(words), f"says {words!r}")

    def hear(self, t: float, chunk: bytes, frame: bytes, event: SpeechEvent | None) -> None:
        if self.detector is not None:
            for digit in self.detector.feed(frame):
                self.key(digit, "in the audio")

    def hear_digits(self, digits: str) -> None:
        for digit in digits:
            if digit != "w":
                self.key(digit, "played by Twilio")

    def key(self, digit: str, how: str) -> None:
        self.result.digits.append(digit)
        self.burst.append(digit)
        self.last_key_at = self.t
        self.dial.note("callee", f"hears key {digit} ({how})")


class _Fax(_Voice):
    def __init__(self, dial: OutboundDial) -> None:
        super().__init__(dial)
        self.next_cng = 0.0

    def step(self, t: float) -> None:
        if t >= self.next_cng:
            self.next_cng += CNG_ON_S + CNG_OFF_S
            self.say(tone(CNG_HZ, CNG_ON_S), "CNG tone")


VOICES: dict[CalleeKind, type[_Voice]] = {
    CalleeKind.PERSON: _Person,
    CalleeKind.NO_VERDICT: _Person,
    CalleeKind.VOICEMAIL: _Machine,
    CalleeKind.LATE_MACHINE: _Machine,
    CalleeKind.MENU: _Menu,
    CalleeKind.FAX: _Fax,
}


# --- dialling -------------------------------------------------------------------------------


def amd_verdict(plan: CalleePlan, form: dict[str, str]) -> tuple[str, float] | None:
    """(AnsweredBy, seconds into the call) Twilio's AMD gives this callee, or None for none."""
    mode = form.get("MachineDetection", "")
    if mode not in ("Enable", "DetectMessageEnd") or form.get("SendDigits") or plan.answered_by is None:
        return None
    answered_by, at = plan.answered_by, plan.amd_at
    if mode == "Enable" and answered_by.startswith("machine_"):
        answered_by, at = "machine_start", min(at, MACHINE_START_S)
    timeout = _number(form.get("MachineDetectionTimeout"), 30.0, 3.0, 59.0)
    if at > timeout:
        return "unknown", timeout
    return answered_by, at


def _number(value: str | None, default: float, low: float, high: float) -> float:
    try:
        number = float(value) if value else default
    except ValueError:
        number = default
    return min(high, max(low, number)) if math.isfinite(number) else default


class OutboundDial:
    """Twilio's side of one outbound call, on a thread of its own with its own event loop:
    ringing, the callee answering (or not), the TwiML, the stream, the callbacks."""

    def __init__(self, api: TwilioApiStandIn, call: CallState, form: dict[str, str], callee: Callee) -> None:
        self.api = api
        self.call = call
        self.form = form
        self.callee = callee
        self.plan = callee.plan()
        self.result = CalleeResult(call.sid, callee.kind, call.to, call.from_)
        self.created = time.monotonic()
        self.events = set(form.get("StatusCallbackEvent", "").split())
        self.verdict = amd_verdict(self.plan, form)
        self.async_amd = form.get("AsyncAmd", "").lower() == "true"
        self.verdict_sent = False
        self.answered: float | None = None
        self.sequence = 0
        self.aborting = False
        self.hangup: CallUpdate | None = None
        self.redirect: CallUpdate | None = None
        self.leg_updates: asyncio.Queue[CallUpdate] | None = None
        self.voice: _Voice | None = None
        self.doc_url = form.get("Url", "")
        self.last_stream_end: str | None = None
        self.tasks: set[asyncio.Task[Any]] = set()  # callbacks in flight: a few per call
        self.loop = asyncio.new_event_loop()
        self.interrupted = asyncio.Event()  # a REST update or an abort: waits end early
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"callee-{call.sid[:12]}", daemon=True)

    # --- from other threads ----------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def on_update(self, update: CallUpdate) -> None:
        """A REST update of the call the API accepted (on the API's thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the call is over
            self.loop.call_soon_threadsafe(self._take_update, update)

    def abort(self) -> None:
        """The stand-in is stopping: the callee hangs up, no more callbacks."""
        self.aborting = True
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.interrupted.set)

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    # --- on the call's loop ----------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.created

    def note(self, who: str, text: str) -> None:
        self.result.timeline.append(TimelineEntry(round(self.now(), 3), who, text))

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=lambda: self.loop) as runner:
                runner.run(self._main())
        except Exception as exc:  # a bug: keep it where the test looks
            self.result.error = repr(exc)
            self.note("twilio", f"simulation failed: {exc!r}")
        finally:
            self.done.set()

    def _take_update(self, update: CallUpdate) -> None:
        self.result.rest_updates.append(update)
        self.note("twilio", describe_update(update))
        if update.kind == "hangup":
            self.hangup = update
        else:
            self.redirect = update
        if self.leg_updates is not None:  # the stream follows it (stop) as Twilio's does
            with contextlib.suppress(asyncio.QueueFull):
                self.leg_updates.put_nowait(update)
        self.interrupted.set()

    async def pause(self, seconds: float) -> None:
        """Wait, unless a REST update or an abort comes first."""
        if self.hangup or self.redirect or self.aborting or seconds <= 0:
            return
        self.interrupted.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.interrupted.wait(), seconds)

    async def ring(self, seconds: float) -> bool:
        """Ring for ``seconds``; False if the call was hung up (canceled) meanwhile. A redirect
        meanwhile is kept for the answer."""
        deadline = time.monotonic() + seconds
        while not (self.hangup or self.aborting):
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self.interrupted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.interrupted.wait(), left)
        return False

    async def _main(self) -> None:
        plan = self.plan
        self.note("twilio", f"dials {self.call.to} ({plan.kind})")
        await self.pause(INITIATED_AFTER_S)
        await self.status("initiated")
        if plan.final_status == "failed":
            await self.ring(FAILED_AFTER_S)
            return await self.finish("failed" if not self.hangup else "canceled")
        await self.pause(RINGING_AFTER_S)
        if self.hangup or self.aborting:
            return await self.finish("canceled")
        self.api.set_call_status(self.call.sid, "ringing")
        await self.status("ringing")
        timeout = min(_number(self.form.get("Timeout"), 60.0, 1.0, 600.0), self.api.ring_cap_s)
        if plan.final_status == "busy":
            return await self.finish("busy" if await self.ring(min(plan.ring_s, timeout)) else "canceled")
        if plan.final_status is not None or plan.ring_s >= timeout:
            return await self.finish("no-answer" if await self.ring(timeout) else "canceled")
        if not await self.ring(plan.ring_s):
            return await self.finish("canceled")
        await self.answer()

    async def answer(self) -> None:
        self.answered = time.monotonic()
        self.result.answered_at = round(self.now(), 3)
        self.api.set_call_status(self.call.sid, "in-progress")
        self.note("callee", "answers")
        answered = self.status_callback("in-progress")
        if answered is not None:  # Twilio sends it and fetches the TwiML at once
            self.spawn(self.send(answered))
        self.voice = VOICES[self.plan.kind](self)
        if self.form.get("MachineDetection") and not self.async_amd:
            self.note("twilio", "synchronous AMD is not simulated: no verdict will be given")
        if self.form.get("SendDigits"):
            await self.play_digits(self.form["SendDigits"])
        if self.redirect is not None:
            document = await self.follow_redirect()
        elif self.form.get("Twiml"):
            document = self.form["Twiml"]
        else:
            document = await self.fetch(self.doc_url, self.form.get("Method", "POST"))
        ended = "application_error"
        for _ in range(MAX_DOCUMENTS):
            if document is None:
                break
            document, outcome = await self.run_document(document)
            if outcome is not None:
                ended = outcome
                break
        await self.finish("completed", ended)

    async def finish(self, final_status: str, ended: str | None = None) -> None:
        """The call is over: the last status callback, once the others are answered."""
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.aborting:
            ended = "stand_in_stopped"
        self.result.ended = ended or final_status
        if self.answered is not None:
            self.result.duration_s = math.ceil(time.monotonic() - self.answered)
        self.api.set_call_status(self.call.sid, final_status, ended=True)
        self.result.final_status = final_status
        self.note("twilio", f"call over: {self.result.ended}, {final_status}")
        if not self.aborting:
            await self.status(final_status, CallDuration=str(self.result.duration_s))

    # --- callbacks -------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def callback(self, kind: str, url: str, params: dict[str, str], method: str = "POST") -> PostedCallback:
        entry = PostedCallback(kind, url, dict(params), round(self.now(), 3), method.upper())
        self.result.callbacks.append(entry)  # now: the list is in the order they were sent
        return entry

    async def send(self, entry: PostedCallback) -> int:
        status = await asyncio.to_thread(self.api.post_signed, entry.url, entry.params, entry.method)
        entry.http_status = status
        if not 200 <= status < 300:
            self.note("twilio", f"{entry.kind} callback to {entry.url} answered {status or 'nothing'}")
        return status

    async def status(self, call_status: str, **extra: str) -> None:
        entry = self.status_callback(call_status, **extra)
        if entry is not None:
            await self.send(entry)

    def status_callback(self, call_status: str, **extra: str) -> PostedCallback | None:
        """A status callback to send, if asked for (the final one always is, as Twilio's)."""
        url = self.form.get("StatusCallback")
        event = {"initiated": "initiated", "ringing": "ringing", "in-progress": "answered"}.get(call_status)
        if not url or (event is not None and event not in self.events):
            self.note("twilio", f"status {call_status} (no callback asked for)")
            return None
        params = {
            "AccountSid": self.api.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": self.call.sid,
            "CallStatus": call_status,
            "Called": self.call.to,
            "Caller": self.call.from_,
            "CallbackSource": "call-progress-events",
            "Direction": "outbound-api",
            "From": self.call.from_,
            "SequenceNumber": str(self.sequence),
            "Timestamp": formatdate(usegmt=True),
            "To": self.call.to,
            **extra,
        }
        self.sequence += 1
        self.note("twilio", f"status callback: {call_status}")
        return self.callback("status", url, params, self.form.get("StatusCallbackMethod", "POST"))

    def amd_clock(self, t: float) -> None:
        """Called by the voice every frame: the verdict goes when its time has come."""
        if self.verdict is None or self.verdict_sent or t < self.verdict[1] or self.answered is None:
            return
        self.verdict_sent = True
        answered_by = self.verdict[0]
        elapsed_ms = int((time.monotonic() - self.answered) * 1000)
        self.api.set_answered_by(self.call.sid, answered_by)
        url = self.form.get("AsyncAmdStatusCallback")
        if not self.async_amd or not url:
            self.note("twilio", f"AMD: {answered_by} after {elapsed_ms} ms (no callback asked for)")
            return
        self.result.amd_sent = (answered_by, round(self.now(), 3))
        self.note("twilio", f"AMD callback: {answered_by} after {elapsed_ms} ms")
        params = {
            "AccountSid": self.api.account_sid,
            "AnsweredBy": answered_by,
            "CallSid": self.call.sid,
            "MachineDetectionDuration": str(elapsed_ms),
        }
        entry = self.callback("amd", url, params, self.form.get("AsyncAmdStatusCallbackMethod", "POST"))
        self.spawn(self.send(entry))

    async def fetch(self, url: str, method: str = "POST") -> str | None:
        """The TwiML at ``url``, fetched as Twilio does at the answer (a signed POST of the
        call's parameters); None (an application error) unless it answers 200."""
        if method.upper() != "POST":
            self.note("twilio", f"Method={method} is not simulated: POST instead")
        params = {
            "AccountSid": self.api.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": self.call.sid,
            "CallStatus": "in-progress",
            "Called": self.call.to,
            "Caller": self.call.from_,
            "Direction": "outbound-api",
            "From": self.call.from_,
            "To": self.call.to,
        }
        entry = self.callback("webhook", url, params)
        fetcher = self._caller(webhook_url=url, webhook_params=params)
        self.note("twilio", f"webhook: POST {url}")
        status, body = await asyncio.to_thread(fetcher.post_webhook)
        entry.http_status = status
        self.doc_url = url
        if status != 200:
            self.note("twilio", f"webhook answered {status}: application error, the call ends")
            return None
        return body

    def _caller(self, **kwargs: Any) -> SimulatedCaller:
        return SimulatedCaller(
            "",
            self.api.auth_token,
            caller=self.call.from_,
            callee=self.call.to,
            call_sid=self.call.sid,
            account_sid=self.api.account_sid,
            **kwargs,
        )

    # --- TwiML -----------------------------------------------------------------------------

    async def follow_redirect(self) -> str | None:
        update, self.redirect = self.redirect, None
        if update is None:
            return None
        if update.twiml is not None:
            return update.twiml
        return await self.fetch(urllib.parse.urljoin(self.doc_url, update.url or ""), update.form.get("Method", "POST"))

    async def run_document(self, twiml: str) -> tuple[str | None, str | None]:
        """Follow one TwiML document: (the next document, or None) or (None, how it ended)."""
        try:
            root = ET.fromstring(twiml)
        except ET.ParseError as exc:
            self.note("twilio", f"TwiML does not parse ({exc}): application error")
            return None, "application_error"
        if root.tag != "Response":
            self.note("twilio", f"TwiML root is <{root.tag}>, not <Response>: application error")
            return None, "application_error"
        for verb in root:
            if self.aborting:
                return None, "stand_in_stopped"
            if self.hangup is not None:
                return None, "bridge_rest_hangup"
            if self.redirect is not None:
                return await self.follow_redirect(), None
            ended, following = await self.run_verb(verb)
            if ended is not None or following is not None:
                return following, ended
        if self.hangup is not None:
            return None, "bridge_rest_hangup"
        if self.redirect is not None:
            return await self.follow_redirect(), None
        return None, self.last_stream_end or "twiml_ended"

    async def run_verb(self, verb: ET.Element) -> tuple[str | None, str | None]:
        """(how the call ended, the next document): both None to go on with the next verb."""
        tag = verb.tag
        if tag == "Connect":
            ended = await self.stream(verb)
            if ended is not None:
                return ended, None
            if self.hangup is None and self.redirect is None and verb.get("action"):
                url = urllib.parse.urljoin(self.doc_url, verb.get("action", ""))
                following = await self.fetch(url, verb.get("method", "POST"))
                return ("application_error", None) if following is None else (None, following)
        elif tag == "Play" and verb.get("digits"):
            await self.play_digits(verb.get("digits", ""))
        elif tag == "Pause":
            await self.pause(_number(verb.get("length"), 1.0, 0.0, MAX_PAUSE_S))
        elif tag in ("Hangup", "Reject"):
            self.note("twilio", f"<{tag}>: the call ends")
            return "twiml_hangup", None
        elif tag == "Redirect":
            url = urllib.parse.urljoin(self.doc_url, (verb.text or "").strip())
            following = await self.fetch(url, verb.get("method", "POST"))
            return ("application_error", None) if following is None else (None, following)
        elif tag == "Dial":
            self.note("twilio", f"<Dial> {(verb.text or '').strip() or '...'}: the callee is put through elsewhere")
            return "dialed_elsewhere", None
        else:
            self.note("twilio", f"<{tag}> is not simulated: skipped")
        return None, None

    async def play_digits(self, digits: str) -> None:
        """Twilio plays keys to the callee (``<Play digits>``, ``SendDigits``): no stream then."""
        self.note("twilio", f"plays keys {digits}")
        if self.voice is not None:
            self.voice.hear_digits(digits)
        await self.pause(sum(KEY_WAIT_S if d == "w" else KEY_S for d in digits))

    async def stream(self, connect: ET.Element) -> str | None:
        """One ``<Connect><Stream>``, the callee's voice on it: how the call ended, or None when
        the stream ended and the TwiML goes on (the bridge closed it, or it could not open)."""
        if self.voice is None:
            return "application_error"
        twiml = "<Response>" + ET.tostring(connect, encoding="unicode") + "</Response>"
        caller = self._caller(twiml=twiml, voice=self.voice)
        self.leg_updates = asyncio.Queue(UPDATE_QUEUE)
        stream = connect.find("Stream")
        self.note("twilio", f"stream: {stream.get('url', '?') if stream is not None else 'none'}")
        try:
            leg = await caller.run(b"", self.leg_updates)
        except (SimulationError, OSError, TimeoutError, WebSocketException) as exc:
            self.note("twilio", f"stream failed: {exc!r}")
            self.last_stream_end = "stream_failed"
            return None
        finally:
            self.leg_updates = None
        self.result.streams.append(leg)
        self.note("twilio", f"stream over: ended by {leg.ended_by}")
        if self.aborting:
            return "stand_in_stopped"
        if leg.ended_by == "twilio_rest" or self.hangup is not None:
            return "bridge_rest_hangup"
        if leg.ended_by == "caller":
            return "callee_hangup"
        self.last_stream_end = "stream_closed"
        return None
