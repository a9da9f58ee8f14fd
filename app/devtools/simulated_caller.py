"""Plays Twilio for a whole call against a running bridge, the way Twilio really behaves.

It POSTs the voice webhook with a valid signature, follows the TwiML's ``<Connect><Stream>``,
streams the caller's audio in real time (or as fast as possible), and plays what comes back
like Twilio's media buffer: audio in real time, a ``mark`` returned once the audio before it
has played, ``clear`` dropping the buffer and returning pending marks at once. It can press
keypad keys (``dtmf`` events, as Twilio sends them) and, given a local stand-in of Twilio's REST
API (``app.devtools.twilio_api``), ends the stream when the bridge hangs the call up or
redirects it (a transfer) through that API, as Twilio does. It records what the caller heard,
every frame received, and a timeline of who spoke when, keys pressed and REST updates.

It can also misbehave the ways a real Twilio socket (or something posing as one) can, for the
fault tests (``CallerFault``): close abruptly, stop without closing, stop reading, flood.

The REST stand-in's outbound calls reuse it for their media streams: started from a given
webhook URL and form, or from TwiML already in hand, with a ``CallerVoice`` deciding frame by
frame what the far end says (a simulated callee reacting to what it hears).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from app.codecs import FRAME_MS, TWILIO_FRAME_BYTES, frames, to_linear16
from app.devtools.endpoints import LOCAL_HOSTNAMES, VOICE_PATH
from app.devtools.speech import SpeechDetector, SpeechEvent
from app.devtools.twilio_api import CallUpdate, RestRequest, TwilioApiStandIn
from app.twilio.rest import failure_words

FRAME_S = FRAME_MS / 1000
WEBHOOK_TIMEOUT_S = 10.0
STREAM_OPEN_TIMEOUT_S = 10.0
SILENCE = b"\xff"  # mu-law zero
DTMF_DIGITS = frozenset("0123456789*#ABCD")
KEY_GAP_S = 0.15  # between the digits of one burst of key presses
CALLER_FAULTS = frozenset({"abrupt_close", "stop_without_close", "stop_reading", "flood", "garbage", "stall"})
STOPPED_READING_RCVBUF = 4096  # a caller that stops reading shrinks its socket's receive buffer to this
GARBAGE_FRAMES: tuple[str | bytes, ...] = (
    b"\x00\x01binary",  # Twilio never sends binary frames
    "not json at all",
    '{"event": "surprise", "streamSid": "MZ0"}',
    '{"event": "media", "media": {"payload": "!!!not base64!!!"}}',
    "[1, 2, 3]",
)
"""What a ``garbage`` fault sends, in turn: each is something Twilio never sends."""


@dataclass(frozen=True)
class CallerFault:
    """One misbehaviour of the caller's side, ``at`` seconds after the stream started.

    - abrupt_close: the TCP connection is aborted: no ``stop``, no close frame (a crashed
      Twilio edge, a cut network). ``CallResult.ended_by`` is "caller_abort".
    - stop_without_close: ``stop`` is sent, then the socket is held open, neither read nor
      closed, for ``hold`` seconds; then it is read again to see how the bridge ended it
      (``CallResult.close_code``). ``ended_by`` is "caller".
    - stop_reading: the socket is no longer read (its receive buffer shrunk to a few KB), so
      the bridge's writes back up; the caller goes on sending audio and following the REST API.
    - flood: ``frames`` media frames of ``frame_bytes`` audio each, sent back to back without
      pacing (far faster than real time; more than 160 bytes is oversized for Twilio), on top
      of the real-time audio. They count in ``CallResult.sent``.
    - garbage: ``frames`` frames Twilio never sends (binary, not JSON, unknown events, bad
      base64; ``GARBAGE_FRAMES`` in turn), back to back.
    - stall: nothing more reaches the bridge (no media, marks, keys nor ``stop``) while the
      socket stays open and is still read: a half-open path or a stuck proxy. The call goes on
      at Twilio's end until the bridge ends it (closing the stream, or through the REST API).
    """

    kind: str
    at: float = 1.0
    frames: int = 500
    frame_bytes: int = TWILIO_FRAME_BYTES
    hold: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in CALLER_FAULTS:
            raise ValueError(f"caller fault must be one of {sorted(CALLER_FAULTS)}, not {self.kind!r}")
        if self.at < 0 or self.frames < 1 or self.frame_bytes < 1 or self.hold < 0:
            raise ValueError("caller fault: at and hold must be >= 0, frames and frame_bytes >= 1")


class SimulationError(Exception):
    pass


class BridgeUnreachable(SimulationError):
    """Nothing answered the webhook's POST at all (refused, no such host, timed out)."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"nothing answers at {url} ({why})")
        self.url = url
        self.why = why


class NotConnected(SimulationError):
    """The webhook answered TwiML without ``<Connect><Stream>``: the bridge did not take the call."""

    def __init__(self, twiml: str) -> None:
        super().__init__(f"TwiML has no <Connect><Stream url>: {twiml[:200]}")
        self.twiml = twiml


class StreamNotOpened(SimulationError):
    """The media stream the TwiML names could not be opened (refused upgrade, nothing there)."""


CLOSE_MEANINGS = {
    1001: "going away: the bridge is stopping",
    1006: "the connection dropped without a close frame",
    1008: "refused: a stream token it does not accept (another instance's secret, used or expired), "
    "or no valid start in time",
    1009: "a frame too big",
    1011: "an internal error of the bridge",
    1013: "refused for now: the bridge is full (MAX_CALLS) or made room for other streams",
}
"""What a bridge's close code other than 1000 means for the call (app/core/endings.py)."""


class CallerVoice(Protocol):
    """What a scripted far end says, decided as the call goes, so it can react to what it hears
    (the outbound callees: a person answering, a voicemail recording, a menu decoding keys)."""

    def next_frame(self) -> bytes | None:
        """The next 20 ms to send (160 bytes of mu-law), asked every 20 ms in real time; None
        hangs up (Twilio's ``stop``)."""
        ...

    def on_played(self, chunk: bytes) -> None:
        """The bridge's audio that played in the last 20 ms (shorter, or empty, when its
        buffer ran dry), every 20 ms."""
        ...


@dataclass
class TimelineEntry:
    t: float
    who: str
    text: str


@dataclass
class CallResult:
    call_sid: str
    twiml: str
    stream_url: str
    parameters: dict[str, str]
    sent: bytearray = field(default_factory=bytearray)  # every caller byte streamed, tail included
    received: bytearray = field(default_factory=bytearray)
    heard: bytearray = field(default_factory=bytearray)  # what played, frame by frame, gaps as silence
    played: bytearray = field(default_factory=bytearray)  # what played, gaps (underruns) left out
    timeline: list[TimelineEntry] = field(default_factory=list)
    marks_played: list[str] = field(default_factory=list)
    marks_cleared: list[str] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    speech_onsets: list[float] = field(default_factory=list)  # when the caller started speaking
    bytes_dropped_by_clear: int = 0
    violations: list[str] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    # "caller" (hung up: sent stop), "bridge" (closed the socket), "twilio_rest" (hung up through
    # the REST API: Status=completed), "transfer" (redirected through the REST API) or
    # "caller_abort" (a CallerFault aborted the connection)
    ended_by: str = ""
    keys_pressed: list[tuple[float, str]] = field(default_factory=list)  # (seconds into the stream, digit)
    rest_updates: list[CallUpdate] = field(default_factory=list)  # updates of this call the API accepted
    rest_requests: list[RestRequest] = field(default_factory=list)  # every REST request about this call
    watched: str = ""  # the load test's operator watching this call: what it received, in words
    redirected_to: str | None = None  # the TwiML (or URL) a redirect/transfer sent the call to
    webhook_s: float = 0.0  # POST to TwiML
    connect_s: float = 0.0  # WebSocket open
    first_media_s: float | None = None  # from `start` to the first agent audio received
    sent_at: list[tuple[int, float]] = field(default_factory=list)  # (len(sent) after a frame, time.monotonic())
    received_at: list[tuple[int, float]] = field(default_factory=list)  # (len(received) after a media, time)
    fault_at: float | None = None  # time.monotonic() when the fault began
    # what Twilio went on to when the bridge closed the stream of a call nobody had hung up or
    # redirected: the TwiML after </Connect> ("" when there is none, and the call just ends)
    after_stream: str | None = None

    def transcript(self) -> str:
        return "\n".join(f"[{e.t:7.2f}s] {e.who:<6} {e.text}" for e in self.timeline)

    def failure(self) -> str | None:
        """Why this call did not go through, in words, or None when it did: the bridge closed the
        stream with a code other than 1000 (it refused the stream, or cut the call), or closed it
        and Twilio would have gone on to the fallback after ``<Connect>``, or no agent audio ever
        came back before the caller hung up or the bridge closed the stream (a hang-up or a
        transfer through the REST API is the bridge handling the call: it went through)."""
        if self.ended_by == "bridge" and self.close_code not in (None, 1000):
            meaning = CLOSE_MEANINGS.get(self.close_code, "not a normal end")
            return f"the bridge closed the stream with code {self.close_code} ({meaning})"
        if self.ended_by == "bridge" and self.after_stream:
            return f"the bridge ended the stream and Twilio would have gone on to the fallback: {self.after_stream}"
        if not self.received and self.ended_by in ("caller", "bridge"):
            return "no agent audio came back at all (the bridge's log says why: the agent did not answer?)"
        return None


def parse_keys(spec: str) -> tuple[float, str]:
    """``SECONDS:DIGITS`` (e.g. ``3:1234#``) as (seconds, digits); ValueError when malformed."""
    seconds, sep, digits = spec.partition(":")
    try:
        at = float(seconds)
    except ValueError:
        at = -1.0
    if not sep or not math.isfinite(at) or at < 0:
        raise ValueError(f"expected SECONDS:DIGITS such as 3:1234#, not {spec!r}")
    check_digits(digits)
    return at, digits


def check_digits(digits: str) -> None:
    bad = sorted(set(digits) - DTMF_DIGITS)
    if not digits or bad:
        raise ValueError(f"keys must be among 0-9 * # A-D, not {digits!r}")


def dial_target(twiml: str) -> str | None:
    """The number or SIP URI a ``<Dial>`` in ``twiml`` calls, if any."""
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError:
        return None
    dial = root.find(".//Dial")
    if dial is None:
        return None
    nouns = [n.text.strip() for n in dial if n.tag in ("Number", "Sip", "Client") and n.text and n.text.strip()]
    if nouns:
        return ", ".join(nouns)
    return dial.text.strip() if dial.text and dial.text.strip() else None


def describe_update(update: CallUpdate) -> str:
    if update.kind == "hangup":
        return f"REST update: hang up (Status={update.form.get('Status', '')})"
    if update.twiml is not None:
        target = dial_target(update.twiml)
        return f"REST update: transfer to {target}" if target else f"REST update: redirect to {update.twiml[:120]}"
    return f"REST update: redirect to {update.url}"


def parse_twiml(twiml: str) -> tuple[str, dict[str, str]]:
    root = ET.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise NotConnected(twiml)
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return stream.get("url", ""), params


def after_connect(twiml: str) -> str:
    """The verbs after ``<Connect>``, which Twilio runs when the stream ends on the server's
    side without the call having been hung up or given new TwiML ("" when there are none)."""
    root = ET.fromstring(twiml)
    verbs = list(root)
    tags = [verb.tag for verb in verbs]
    rest = verbs[tags.index("Connect") + 1 :] if "Connect" in tags else []
    return "".join(ET.tostring(verb, encoding="unicode") for verb in rest)


class Player:
    """Twilio's outbound buffer: audio plays at 8000 bytes/s, marks fire in order."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.marks: deque[tuple[int, str]] = deque()  # (position in enqueued bytes, name)
        self.enqueued = 0
        self.played = 0

    def add_media(self, audio: bytes) -> None:
        self.pending += audio
        self.enqueued += len(audio)

    def add_mark(self, name: str) -> None:
        self.marks.append((self.enqueued, name))

    @property
    def idle(self) -> bool:
        return not self.pending and not self.marks

    def tick(self) -> tuple[bytes, list[str]]:
        chunk = bytes(self.pending[:TWILIO_FRAME_BYTES])
        del self.pending[:TWILIO_FRAME_BYTES]
        self.played += len(chunk)
        due = []
        while self.marks and self.marks[0][0] <= self.played:
            due.append(self.marks.popleft()[1])
        return chunk, due

    def clear(self) -> tuple[int, list[str]]:
        dropped = len(self.pending)
        self.pending.clear()
        self.played = self.enqueued
        names = [name for _, name in self.marks]
        self.marks.clear()
        return dropped, names


class SimulatedCaller:
    def __init__(
        self,
        base_url: str,
        auth_token: str,
        *,
        caller: str = "+15550000001",
        callee: str = "+15550000002",
        fast: bool = False,
        tail: float = 3.0,
        max_tail: float = 30.0,
        sign_upgrade: bool = True,
        keys: Sequence[tuple[float, str]] = (),
        key_gap: float = KEY_GAP_S,
        twilio_api: TwilioApiStandIn | None = None,
        fault: CallerFault | None = None,
        start_delay: float = 0.0,
        webhook_url: str | None = None,
        webhook_params: dict[str, str] | None = None,
        twiml: str | None = None,
        call_sid: str | None = None,
        account_sid: str | None = None,
        voice: CallerVoice | None = None,
        await_agent: bool = False,
    ) -> None:
        """``keys``: (seconds after the stream starts, digits) bursts of key presses, each digit
        ``key_gap`` seconds after the previous one; the caller stays on the line until they are
        pressed. ``twilio_api``: a running REST stand-in where this call is registered (with the
        stand-in's account SID), so the bridge can hang it up or transfer it through the API.
        ``fault``: a misbehaviour of the caller's side (see ``CallerFault``). ``start_delay``:
        seconds between the upgrade and ``connected``/``start``, as a network round trip puts
        between the bridge's 101 and Twilio's first message.

        For calls that do not start as an inbound call to ``base_url``'s voice webhook (the REST
        stand-in's outbound calls): ``webhook_url`` (the whole URL, query string included, that
        the webhook goes to and is signed over) and ``webhook_params`` (its form, as given);
        ``twiml``: no webhook at all, this TwiML is followed; ``call_sid`` / ``account_sid``:
        the call's, instead of made-up ones; ``voice``: what is sent is decided frame by frame
        by it (``audio``, ``fast`` and the tail are then unused), and it hears what plays.

        ``await_agent``: the tail counts as quiet only once some agent audio has come (waiting up
        to ``max_tail``), so an agent slow to answer (a loaded machine, a real Deepgram) is waited
        for, not taken for a call that failed; ``callbridge simulate-call`` judges calls so."""
        for _, digits in keys:
            check_digits(digits)
        self.base_url = base_url.rstrip("/")
        self.validator = RequestValidator(auth_token)
        self.caller = caller
        self.callee = callee
        self.fast = fast
        self.tail = tail
        self.max_tail = max_tail
        self.await_agent = await_agent
        self.sign_upgrade = sign_upgrade
        self.keys = sorted(keys)
        self.key_gap = key_gap
        self.twilio_api = twilio_api
        self.fault = fault
        self.start_delay = start_delay
        self.webhook_url = webhook_url
        self.webhook_form = dict(webhook_params) if webhook_params is not None else None
        self.twiml = twiml
        self.voice = voice
        self.call_sid = call_sid or "CA" + uuid.uuid4().hex
        self.stream_sid = "MZ" + uuid.uuid4().hex
        if account_sid is not None:
            self.account_sid = account_sid
        else:
            self.account_sid = twilio_api.account_sid if twilio_api is not None else "AC" + uuid.uuid4().hex
        self.webhook_s = 0.0

    # --- the webhook -------------------------------------------------------------------------

    def webhook_params(self) -> dict[str, str]:
        if self.webhook_form is not None:
            return dict(self.webhook_form)
        return {
            "CallSid": self.call_sid,
            "AccountSid": self.account_sid,
            "From": self.caller,
            "To": self.callee,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
        }

    def post_webhook(self, params: dict[str, str] | None = None, signature: str | None = None) -> tuple[int, str]:
        """Blocking POST, as Twilio sends it; returns (status, body)."""
        url = self.webhook_url or f"{self.base_url}{VOICE_PATH}"
        params = self.webhook_params() if params is None else params
        if signature is None:
            signature = self.validator.compute_signature(url, params)
        request = urllib.request.Request(
            url,
            data=urllib.parse.urlencode(params).encode(),
            headers={"X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"},
            method="POST",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        began = time.monotonic()
        try:
            with opener.open(request, timeout=WEBHOOK_TIMEOUT_S) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode(errors="replace")
        finally:
            self.webhook_s = time.monotonic() - began

    async def answer_webhook(self) -> tuple[int, str]:
        """``post_webhook`` off the loop; ``BridgeUnreachable`` when nothing answered at all."""
        try:
            return await asyncio.to_thread(self.post_webhook)
        except urllib.error.URLError as exc:  # not an HTTPError: post_webhook returns those
            url = self.webhook_url or self.base_url
            raise BridgeUnreachable(url, failure_words(exc, urlsplit(url).hostname or "", WEBHOOK_TIMEOUT_S)) from exc

    # --- the stream --------------------------------------------------------------------------

    async def open_stream(self, url: str) -> ClientConnection:
        headers = {}
        if self.sign_upgrade:
            headers["X-Twilio-Signature"] = self.validator.compute_signature(url, {})
        host = urlsplit(url).hostname or ""
        return await connect(
            url,
            additional_headers=headers,
            compression=None,
            proxy=None if host in LOCAL_HOSTNAMES else True,
            open_timeout=STREAM_OPEN_TIMEOUT_S,
            close_timeout=2,
        )

    def start_message(self, parameters: dict[str, str]) -> str:
        return json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )

    async def run(self, audio: bytes, updates: asyncio.Queue[CallUpdate] | None = None) -> CallResult:
        """The whole call. ``updates``: REST updates of the call (hang-up, redirect) to follow,
        fed by whoever owns the call at the REST stand-in; without it, the call is registered
        with ``twilio_api`` (if any) and follows that."""
        given = updates is not None
        updates = updates if updates is not None else asyncio.Queue()
        if self.twilio_api is not None and not given:
            loop = asyncio.get_running_loop()

            def notify(update: CallUpdate) -> None:  # on the stand-in's thread
                with contextlib.suppress(RuntimeError):  # the loop is gone: the call is over
                    loop.call_soon_threadsafe(updates.put_nowait, update)

            self.twilio_api.register_call(self.call_sid, notify, from_=self.caller, to=self.callee)
        try:
            if self.twiml is not None:
                body = self.twiml
            else:
                status, body = await self.answer_webhook()
                if status != 200:
                    raise SimulationError(f"webhook answered HTTP {status}: {first_line(body)}")
            url, parameters = parse_twiml(body)
            result = CallResult(self.call_sid, body, url, parameters)
            result.webhook_s = self.webhook_s
            began = time.monotonic()
            try:
                ws = await self.open_stream(url)
            except InvalidStatus as exc:
                raise StreamNotOpened(
                    f"the media stream {url} refused the upgrade: HTTP {exc.response.status_code}"
                ) from exc
            except (OSError, TimeoutError, WebSocketException) as exc:
                why = failure_words(exc, urlsplit(url).hostname or "", STREAM_OPEN_TIMEOUT_S)
                raise StreamNotOpened(f"the media stream {url} could not be opened: {why}") from exc
            result.connect_s = time.monotonic() - began
            try:
                await _Stream(self, ws, result, updates).run(audio, parameters)
            finally:
                await ws.close()
                if result.close_code is None:
                    result.close_code = ws.close_code
        finally:
            if self.twilio_api is not None and not given:
                self.twilio_api.end_call(self.call_sid)  # over: later updates answer 20404
        if self.twilio_api is not None:
            result.rest_requests = self.twilio_api.requests_for(self.call_sid)
        return result


class _Stream:
    def __init__(
        self, caller: SimulatedCaller, ws: ClientConnection, result: CallResult, updates: asyncio.Queue[CallUpdate]
    ) -> None:
        self.caller = caller
        self.ws = ws
        self.result = result
        self.updates = updates
        self.player = Player()
        self.t0 = time.monotonic()
        self.seq = 1
        self.send_lock = asyncio.Lock()  # sequence numbers go out in order
        self.stopped = False  # `stop` sent: nothing more goes out
        self.keys_done = not caller.keys
        self.agent_talking_since: float | None = None
        # the local agent's detector, on what the caller sends: "starts speaking" is when it reacts
        self.caller_speech = SpeechDetector()
        self.reading_paused = False  # a stop_reading or stop_without_close fault holds the socket unread
        self.aborted = False  # an abrupt_close fault dropped the connection
        self.stalled = False  # a stall fault: nothing more goes out, though the socket is open
        self.frames_sent = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, who: str, text: str) -> None:
        self.result.timeline.append(TimelineEntry(round(self.now(), 3), who, text))

    async def send_json(self, msg: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(msg))

    async def send_event(self, event: str, body: dict[str, Any]) -> None:
        """One numbered event, as Twilio numbers them; nothing after `stop`."""
        async with self.send_lock:
            if self.stopped or self.stalled:
                return
            self.seq += 1
            self.stopped = event == "stop"
            msg = {"event": event, "sequenceNumber": str(self.seq), "streamSid": self.caller.stream_sid, **body}
            await self.ws.send(json.dumps(msg))

    async def send_stop(self) -> None:
        await self.send_event(
            "stop", {"stop": {"accountSid": self.caller.account_sid, "callSid": self.caller.call_sid}}
        )

    async def run(self, audio: bytes, parameters: dict[str, str]) -> None:
        if self.caller.start_delay:
            await asyncio.sleep(self.caller.start_delay)
        await self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.ws.send(self.caller.start_message(parameters))
        self.t0 = time.monotonic()
        self.note("twilio", "stream started")
        receiver = asyncio.create_task(self.receive())
        player = asyncio.create_task(self.play())
        sender = asyncio.create_task(self.send_audio(audio))
        keypad = asyncio.create_task(self.press_keys())
        rest = asyncio.create_task(self.follow_rest())
        waited = {receiver, sender, rest}
        fault = None
        ends_call = False  # the fault is the end of the call (abrupt close, stop without close)
        if self.caller.fault is not None:
            fault = asyncio.create_task(self.misbehave(self.caller.fault))
            if self.caller.fault.kind in ("abrupt_close", "stop_without_close"):
                ends_call = True
                waited = {fault}
        done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if self.reading_paused and not self.ws.transport.is_closing():
            self.ws.transport.resume_reading()  # let the closing handshake through
        # the caller hung up only if it got to send `stop`; a send failing means the bridge closed
        hung_up = (sender in done and sender.exception() is None) or (ends_call and not self.aborted)
        update = rest.result() if rest in done and rest.exception() is None else None
        if update is None and not self.updates.empty():  # accepted by the API as the bridge closed
            update = self.updates.get_nowait()
            self.on_update(update)
        if update is None and self.result.rest_updates:  # taken, and the bridge closed before our stop went
            update = self.result.rest_updates[-1]
        tasks = (receiver, player, sender, keypad, rest) + ((fault,) if fault is not None else ())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await task
        if self.aborted:
            self.result.ended_by = "caller_abort"
        elif update is not None:
            self.result.ended_by = "twilio_rest" if update.kind == "hangup" else "transfer"
        else:
            self.result.ended_by = "caller" if hung_up else "bridge"
        self.note("twilio", f"call ended by {self.result.ended_by}")
        if self.result.ended_by == "bridge":
            self.result.after_stream = after_connect(self.result.twiml)
            if self.result.after_stream:
                self.note("twilio", f"the stream is over: Twilio goes on to {self.result.after_stream}")

    def on_update(self, update: CallUpdate) -> None:
        self.result.rest_updates.append(update)
        if update.kind == "redirect":
            self.result.redirected_to = update.twiml if update.twiml is not None else update.url
        self.note("twilio", describe_update(update))

    # --- faults ------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop consuming the socket, with a small kernel buffer so the bridge's side fills soon."""
        transport = self.ws.transport
        if transport.is_closing():  # the bridge closed it first: nothing left to not read
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STOPPED_READING_RCVBUF)
        transport.pause_reading()
        self.reading_paused = True

    async def misbehave(self, fault: CallerFault) -> None:
        await asyncio.sleep(max(0.0, fault.at - self.now()))
        self.result.fault_at = time.monotonic()
        self.note("caller", f"fault: {fault.kind}")
        if fault.kind == "abrupt_close":
            self.aborted = self.stopped = True  # nothing more goes out
            self.ws.transport.abort()
        elif fault.kind == "stop_without_close":
            await self.send_stop()
            self.pause_reading()
            await asyncio.sleep(fault.hold)
            if self.reading_paused and not self.ws.transport.is_closing():
                self.ws.transport.resume_reading()
            self.reading_paused = False
            with contextlib.suppress(TimeoutError):  # how did the bridge end it meanwhile?
                await asyncio.wait_for(self.ws.wait_closed(), 2.0)
            self.result.close_code = self.ws.close_code
        elif fault.kind == "stop_reading":
            self.pause_reading()
        elif fault.kind == "stall":
            self.stalled = True
        elif fault.kind == "flood":
            for _ in range(fault.frames):  # silence: the flood is not a turn the agent answers
                await self.send_frame(SILENCE * fault.frame_bytes, self.frames_sent)
        else:
            for i in range(fault.frames):
                frame = GARBAGE_FRAMES[i % len(GARBAGE_FRAMES)]
                async with self.send_lock:
                    if self.stopped:
                        return
                    await self.ws.send(frame)
        self.note("caller", f"fault: {fault.kind} done")

    async def follow_rest(self) -> CallUpdate:
        """Like Twilio when the call is hung up or redirected through the API: the stream stops."""
        update = await self.updates.get()
        self.on_update(update)
        await self.send_stop()
        return update

    async def press_keys(self) -> None:
        try:
            for at, digits in self.caller.keys:
                await asyncio.sleep(max(0.0, at - self.now()))
                self.note("caller", f"presses {' '.join(digits)}")
                for i, digit in enumerate(digits):
                    await asyncio.sleep(max(0.0, at + i * self.caller.key_gap - self.now()))
                    await self.send_event("dtmf", {"dtmf": {"track": "inbound_track", "digit": digit}})
                    self.result.keys_pressed.append((round(self.now(), 3), digit))
        finally:
            self.keys_done = True

    async def send_audio(self, audio: bytes) -> None:
        if self.caller.voice is not None:
            await self.send_voice(self.caller.voice)
            return
        chunks = frames(audio)
        for i, frame in enumerate(chunks):
            await self.send_frame(frame, i)
            if self.caller.fast:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(max(0.0, (i + 1) * FRAME_S - self.now()))
        # Twilio keeps streaming (silence) while the line is open: wait for the agent's reply
        i = len(chunks)
        tail_start = self.now()
        while True:
            waited = self.now() - tail_start
            heard_agent = bool(self.result.received) or not self.caller.await_agent
            quiet = self.player.idle and self.keys_done and heard_agent
            if waited >= self.caller.max_tail or (waited >= self.caller.tail and quiet):
                break
            await self.send_frame(SILENCE * TWILIO_FRAME_BYTES, i)
            i += 1
            await asyncio.sleep(max(0.0, tail_start + (i - len(chunks) + 1) * FRAME_S - self.now()))
        await self.send_stop()

    async def send_voice(self, voice: CallerVoice) -> None:
        """Real time, whatever the voice says, until it hangs up."""
        i = 0
        while (frame := voice.next_frame()) is not None:
            await self.send_frame(frame, i)
            i += 1
            await asyncio.sleep(max(0.0, i * FRAME_S - self.now()))
        await self.send_stop()

    async def send_frame(self, frame: bytes, index: int) -> None:
        await self.send_event(
            "media",
            {
                "media": {
                    "track": "inbound",
                    "chunk": str(index + 1),
                    "timestamp": str(index * 20),
                    "payload": base64.b64encode(frame).decode(),
                },
            },
        )
        if self.stopped or self.stalled:
            return
        self.frames_sent += 1
        self.result.sent += frame
        self.result.sent_at.append((len(self.result.sent), time.monotonic()))
        self.track_caller(frame)

    def track_caller(self, frame: bytes) -> None:
        event = self.caller_speech.feed(to_linear16(frame, "mulaw"))
        if event is SpeechEvent.ONSET:
            self.result.speech_onsets.append(self.now())
            self.note("caller", "starts speaking")
        elif event is SpeechEvent.OFFSET:
            self.note("caller", "stops speaking")

    async def play(self) -> None:
        tick = 0
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, tick * FRAME_S - self.now()))
            chunk, due = self.player.tick()
            self.result.heard += chunk + SILENCE * (TWILIO_FRAME_BYTES - len(chunk))
            self.result.played += chunk
            if self.caller.voice is not None:
                self.caller.voice.on_played(chunk)
            if chunk and self.agent_talking_since is None:
                self.agent_talking_since = self.now()
                self.note("agent", "audio starts playing")
            elif not chunk and self.agent_talking_since is not None:
                self.note("agent", f"audio finished ({self.now() - self.agent_talking_since:.2f} s heard)")
                self.agent_talking_since = None
            for name in due:
                self.result.marks_played.append(name)
                await self.send_mark(name)

    async def send_mark(self, name: str) -> None:
        await self.send_event("mark", {"mark": {"name": name}})

    async def receive(self) -> None:
        async for raw in self.ws:
            if isinstance(raw, bytes):
                self.result.violations.append("binary frame (Twilio error 31950)")
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                self.result.violations.append(f"bad JSON (31951): {raw[:60]}")
                continue
            self.result.messages.append(msg)
            problem = self.check_shape(msg)
            if problem:
                self.result.violations.append(problem)
                continue
            event = msg["event"]
            if event == "media":
                audio = base64.b64decode(msg["media"]["payload"])
                if self.result.first_media_s is None:
                    self.result.first_media_s = self.now()
                self.result.received += audio
                self.result.received_at.append((len(self.result.received), time.monotonic()))
                self.player.add_media(audio)
            elif event == "mark":
                self.player.add_mark(msg["mark"]["name"])
            elif event == "clear":
                dropped, names = self.player.clear()
                self.result.clears.append(self.now())
                self.result.bytes_dropped_by_clear += dropped
                self.note("twilio", f"clear: {dropped / 8000:.2f} s of agent audio dropped")
                if self.agent_talking_since is not None:
                    self.note("agent", f"audio cut off ({self.now() - self.agent_talking_since:.2f} s heard)")
                    self.agent_talking_since = None
                for name in names:
                    self.result.marks_cleared.append(name)
                    await self.send_mark(name)

    def check_shape(self, msg: Any) -> str | None:
        """Exactly the documented fields, as Twilio enforces (else error 31951/31924)."""
        if not isinstance(msg, dict):
            return "not a JSON object"
        event = msg.get("event")
        sid_ok = msg.get("streamSid") == self.caller.stream_sid
        if event == "media":
            media = msg.get("media")
            ok = (
                set(msg) == {"event", "streamSid", "media"}
                and isinstance(media, dict)
                and set(media) == {"payload"}
                and isinstance(media["payload"], str)
            )
            if ok and isinstance(media, dict):
                try:
                    base64.b64decode(media["payload"], validate=True)
                except ValueError:
                    ok = False
        elif event == "mark":
            mark = msg.get("mark")
            ok = (
                set(msg) == {"event", "streamSid", "mark"}
                and isinstance(mark, dict)
                and set(mark) == {"name"}
                and isinstance(mark["name"], str)
            )
        elif event == "clear":
            ok = set(msg) == {"event", "streamSid"}
        else:
            return f"unknown event {event!r} (31924)"
        if not ok:
            return f"malformed {event} message (31951): {json.dumps(msg)[:120]}"
        if not sid_ok:
            return f"wrong streamSid in {event} (31951)"
        return None


def first_line(body: str, limit: int = 120) -> str:
    """The first non-blank line of a response body, cut to ``limit``: an error page from
    something that is not callbridge stays one line."""
    line = next((line.strip() for line in body.splitlines() if line.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."
