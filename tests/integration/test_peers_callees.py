"""The REST stand-in's outbound calls and their simulated callees, without the bridge: a tiny
fake bridge on loopback answers the webhook with ``<Connect><Stream>``, takes the media
WebSocket, checks the signature of every callback Twilio's stand-in sends it, and acts as a
test scripts it (plays audio, hangs up through the REST API, closes the stream)."""

from __future__ import annotations

import asyncio
import base64
import importlib
import importlib.util
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest.api.v2010.account.call import CallInstance
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from app.codecs import frames, rms_linear16, to_linear16
from app.devtools.callees import NUMBERS, Callee, CalleeKind, CalleeResult, amd_verdict, speech
from app.devtools.speech import SpeechDetector, SpeechEvent
from app.devtools.twilio_api import TwilioApiStandIn
from app.twilio.rest import make_client
from tests.conftest import LoopThread, wait_until

pytestmark = pytest.mark.timeout(60)
ACCOUNT = "AC" + "d" * 32
TOKEN = "callee-stand-in-token-0123456789"
FROM = "+15557654321"
EVENTS = ["initiated", "ringing", "answered", "completed"]


@dataclass
class Hit:
    """One request the fake bridge received."""

    at: float
    path: str  # with the query string
    form: dict[str, str]
    signed: bool  # X-Twilio-Signature valid over the exact URL and form


class Session:
    """One media stream at the fake bridge, as its script sees it."""

    def __init__(self, bridge: FakeBridge, ws: ServerConnection, start: dict[str, Any]) -> None:
        self.bridge = bridge
        self.ws = ws
        self.start = start["start"]
        self.stream_sid: str = start["streamSid"]
        self.call_sid: str = self.start["callSid"]
        self.started = time.monotonic()
        self.inbound = bytearray()
        self.marks: list[str] = []
        self.seen: dict[str, float] = {}  # what the script noted, for the test to check

    async def send_audio(self, audio: bytes, mark: str) -> None:
        """All at once, as a bridge relaying an agent does; Twilio plays it in real time."""
        for chunk in frames(audio):
            payload = base64.b64encode(chunk).decode()
            await self.ws.send(
                json.dumps({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})
            )
        await self.ws.send(json.dumps({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": mark}}))

    async def until(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {within} s")
            await asyncio.sleep(0.01)

    async def speech_from(self, offset: int, within: float = 10.0) -> float:
        """Wait for the callee to start speaking in what it sent from byte ``offset`` on; the
        seconds into the stream where it did."""
        detector = SpeechDetector()
        position = offset
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            while position + 160 <= len(self.inbound):
                if (
                    detector.feed(to_linear16(bytes(self.inbound[position : position + 160]), "mulaw"))
                    is SpeechEvent.ONSET
                ):
                    return position / 8000
                position += 160
            await asyncio.sleep(0.01)
        raise AssertionError(f"the callee did not speak within {within} s")

    async def hang_up(self) -> None:
        client = self.bridge.stand_in.client()
        await asyncio.to_thread(lambda: client.calls(self.call_sid).update(status="completed"))


Script = Callable[[Session], Coroutine[Any, Any, None]]


class FakeBridge:
    """The webhook (TwiML to its own WebSocket, with a ``<Parameter>``), the status and AMD
    callbacks (signatures checked), and the media WebSocket, whose ``start`` runs ``script``."""

    def __init__(self, stand_in: TwilioApiStandIn) -> None:
        self.stand_in = stand_in
        self.validator = RequestValidator(TOKEN)
        self.script: Script | None = None
        self.hits: list[Hit] = []
        self.sessions: list[Session] = []
        self.messages: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.loop = LoopThread()
        self.ws_server: Server = self.loop.run(self.listen())
        self.ws_url = f"ws://127.0.0.1:{self.ws_server.sockets[0].getsockname()[1]}/twilio/media"
        bridge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = dict(urllib.parse.parse_qsl(raw))
                url = f"http://127.0.0.1:{bridge.http.server_address[1]}{self.path}"
                signed = bridge.validator.validate(url, form, self.headers.get("X-Twilio-Signature", ""))
                bridge.hits.append(Hit(time.monotonic(), self.path, form, signed))
                body = bridge.twiml().encode() if self.path.startswith("/twilio/voice") else b""
                self.send_response(200 if signed else 403)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    async def listen(self) -> Server:
        return await serve(self.handle, "127.0.0.1", 0)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}{path}"

    def twiml(self) -> str:
        return (
            f'<Response><Connect><Stream url="{self.ws_url}"><Parameter name="x" value="y"/>'
            "</Stream></Connect></Response>"
        )

    def of(self, path: str, call_sid: str) -> list[Hit]:
        return [h for h in self.hits if h.path.startswith(path) and h.form.get("CallSid") == call_sid]

    async def handle(self, ws: ServerConnection) -> None:
        task: asyncio.Task[None] | None = None
        session: Session | None = None
        try:
            async for raw in ws:
                msg = json.loads(raw)
                self.messages.append(msg)
                if msg["event"] == "start":
                    session = Session(self, ws, msg)
                    self.sessions.append(session)
                    if self.script is not None:
                        task = asyncio.create_task(self.script(session))
                        task.add_done_callback(self.done)
                elif msg["event"] == "media" and session is not None:
                    session.inbound += base64.b64decode(msg["media"]["payload"])
                elif msg["event"] == "mark" and session is not None:
                    session.marks.append(msg["mark"]["name"])
        except ConnectionClosed:
            pass
        if task is not None and not task.done():
            task.cancel()

    def done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception() or RuntimeError())

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.ws_server.close()
        self.loop.run(self.ws_server.wait_closed())
        self.loop.close()


@pytest.fixture
def stand_in() -> Iterator[TwilioApiStandIn]:
    with TwilioApiStandIn(ACCOUNT, TOKEN) as api:
        yield api


@pytest.fixture
def bridge(stand_in: TwilioApiStandIn) -> Iterator[FakeBridge]:
    fake = FakeBridge(stand_in)
    yield fake
    fake.close()


def place(stand_in: TwilioApiStandIn, bridge: FakeBridge, to: str, *, amd: bool = True, **extra: Any) -> CallInstance:
    """As the bridge places a call through the SDK."""
    params: dict[str, Any] = {
        "to": to,
        "from_": FROM,
        "url": bridge.url("/twilio/voice?outbound=ob-1"),
        "method": "POST",
        "status_callback": bridge.url("/twilio/status"),
        "status_callback_event": EVENTS,
        "status_callback_method": "POST",
        "timeout": 30,
    }
    if amd:
        params |= {
            "machine_detection": "DetectMessageEnd",
            "async_amd": "true",
            "async_amd_status_callback": bridge.url("/twilio/amd"),
            "async_amd_status_callback_method": "POST",
            "machine_detection_timeout": 30,
        }
    params.update(extra)
    if "twiml" in extra:
        del params["url"], params["method"]
    call: CallInstance = stand_in.client().calls.create(**params)
    return call


def check_callbacks(bridge: FakeBridge, result: CalleeResult, statuses: list[str]) -> None:
    """The status callbacks came in this order, all signed and answered, with Twilio's fields."""
    assert result.statuses == [(s, 200) for s in statuses], result.transcript()
    hits = bridge.of("/twilio/status", result.call_sid)
    assert [h.form["CallStatus"] for h in hits] == statuses
    for hit in hits:
        assert hit.signed
        assert {k: hit.form[k] for k in ("AccountSid", "From", "To", "Direction")} == {
            "AccountSid": ACCOUNT,
            "From": FROM,
            "To": result.to,
            "Direction": "outbound-api",
        }
    assert hits[-1].form["CallDuration"] == str(result.duration_s)
    assert [int(h.form["SequenceNumber"]) for h in hits] == list(range(len(hits)))
    assert all(h.signed for h in bridge.hits)


def amd_of(bridge: FakeBridge, call_sid: str) -> list[dict[str, str]]:
    return [h.form for h in bridge.of("/twilio/amd", call_sid)]


# --- answered calls ---------------------------------------------------------------------------


def test_a_person_answers_says_hello_replies_and_is_hung_up_on(stand_in: TwilioApiStandIn, bridge: FakeBridge) -> None:
    agent = speech("hi this is the agent calling about your order")

    async def script(session: Session) -> None:
        await session.send_audio(agent, "greeting")
        await session.until(lambda: "greeting" in session.marks)  # it has played
        played_at = len(session.inbound)
        session.seen["reply"] = await session.speech_from(played_at)
        await asyncio.sleep(0.3)
        await session.hang_up()

    bridge.script = script
    call = place(stand_in, bridge, NUMBERS[CalleeKind.PERSON])
    assert (call.status, call.direction, call.to, call._from) == ("queued", "outbound-api", "+15550100001", FROM)
    assert call.sid.startswith("CA") and len(call.sid) == 34
    result = stand_in.wait_outbound(call.sid, 20)
    assert bridge.errors == []
    assert result.ended == "bridge_rest_hangup" and result.kind is CalleeKind.PERSON, result.transcript()
    check_callbacks(bridge, result, ["initiated", "ringing", "in-progress", "completed"])
    assert result.answered_at is not None and 1.0 < result.answered_at < 1.6
    # the webhook: signed over the URL with its query string, the call's parameters
    (webhook,) = bridge.of("/twilio/voice", call.sid)
    assert webhook.path == "/twilio/voice?outbound=ob-1" and webhook.signed
    assert (webhook.form["Direction"], webhook.form["CallStatus"], webhook.form["To"]) == (
        "outbound-api",
        "in-progress",
        NUMBERS[CalleeKind.PERSON],
    )
    # the stream: the same CallSid, the <Parameter>s; what played is what the bridge sent
    (session,) = bridge.sessions
    assert session.call_sid == call.sid and session.start["customParameters"] == {"x": "y"}
    assert bytes(result.heard) == agent
    assert bridge.messages[-1]["event"] == "stop"
    # "hello?" half a second in, then a reply once the agent's audio had ended
    assert 0.5 <= (hello := onset(session.inbound)) < 0.7, hello
    assert session.seen["reply"] > len(agent) / 8000 + 0.5
    assert "says 'yes speaking'" in result.transcript()
    # AMD: human, about 1.5 s after the answer
    (amd,) = amd_of(bridge, call.sid)
    assert amd["AnsweredBy"] == "human" and amd["AccountSid"] == ACCOUNT
    assert 1400 <= int(amd["MachineDetectionDuration"]) < 2200
    assert result.amd_sent is not None and result.amd_sent[0] == "human"
    fetched = stand_in.client().calls(call.sid).fetch()
    assert (fetched.status, fetched.answered_by, fetched.direction) == ("completed", "human", "outbound-api")
    (create,) = [r for r in stand_in.requests if r.path.endswith("/Calls.json")]
    assert create.status == 201 and create.form["StatusCallbackEvent"] == " ".join(EVENTS)


def onset(audio: bytearray) -> float:
    """Seconds into ``audio`` where speech starts (-1: never)."""
    detector = SpeechDetector()
    for i, chunk in enumerate(frames(bytes(audio))):
        if detector.feed(to_linear16(chunk, "mulaw")) is SpeechEvent.ONSET:
            return (i - detector.onset_frames + 1) * 0.02
    return -1.0


def test_a_voicemail_records_exactly_what_plays_after_the_beep(stand_in: TwilioApiStandIn, bridge: FakeBridge) -> None:
    message = speech("hello this is a message please call us back")
    early = speech("hi there")  # over the greeting: not recorded
    during = speech("x")[:1200]  # 0.15 s during the beep (3.5-3.9 s): not recorded either

    async def script(session: Session) -> None:
        await session.send_audio(early, "early")
        await session.until(lambda: len(session.inbound) >= int(3.55 * 8000))
        await session.send_audio(during, "during")
        await session.until(lambda: bool(amd_of(bridge, session.call_sid)))
        session.seen["verdict"] = len(session.inbound)
        await session.send_audio(message, "message")
        await session.until(lambda: "message" in session.marks)
        await session.hang_up()

    bridge.script = script
    call = place(stand_in, bridge, NUMBERS[CalleeKind.VOICEMAIL])
    result = stand_in.wait_outbound(call.sid, 20)
    assert bridge.errors == [] and result.ended == "bridge_rest_hangup", result.transcript()
    check_callbacks(bridge, result, ["initiated", "ringing", "in-progress", "completed"])
    (amd,) = amd_of(bridge, call.sid)
    assert amd["AnsweredBy"] == "machine_end_beep"
    assert 3900 <= int(amd["MachineDetectionDuration"]) < 4800
    (session,) = bridge.sessions
    assert session.seen["verdict"] >= 3.9 * 8000  # the beep had reached the bridge
    beep = session.inbound[int(3.55 * 8000) : int(3.85 * 8000)]
    assert rms_linear16(to_linear16(bytes(beep), "mulaw")) > 3000
    assert bytes(result.message) == message
    assert bytes(result.heard) == early + during + message
    assert "beep over: recording" in result.transcript()


def test_a_fax_whistles_and_is_classed_fax(stand_in: TwilioApiStandIn, bridge: FakeBridge) -> None:
    async def script(session: Session) -> None:
        await session.until(lambda: bool(amd_of(bridge, session.call_sid)))
        await session.hang_up()

    bridge.script = script
    call = place(stand_in, bridge, NUMBERS[CalleeKind.FAX])
    result = stand_in.wait_outbound(call.sid, 20)
    assert bridge.errors == [] and result.ended == "bridge_rest_hangup", result.transcript()
    check_callbacks(bridge, result, ["initiated", "ringing", "in-progress", "completed"])
    (amd,) = amd_of(bridge, call.sid)
    assert amd["AnsweredBy"] == "fax" and 950 <= int(amd["MachineDetectionDuration"]) < 1700
    (session,) = bridge.sessions
    loud = to_linear16(bytes(session.inbound[400:3600]), "mulaw")
    quiet = bytes(session.inbound[4400:7600])
    assert rms_linear16(loud) > 3000 and quiet == b"\xff" * len(quiet)


def test_no_verdict_for_a_person_and_the_bridge_closing_the_stream(
    stand_in: TwilioApiStandIn, bridge: FakeBridge
) -> None:
    async def script(session: Session) -> None:
        await session.speech_from(0)  # "hello?"
        await asyncio.sleep(2.0)  # well past when a verdict would have come
        await session.ws.close()

    bridge.script = script
    call = place(stand_in, bridge, NUMBERS[CalleeKind.NO_VERDICT])
    result = stand_in.wait_outbound(call.sid, 20)
    assert bridge.errors == [] and result.ended == "stream_closed", result.transcript()
    check_callbacks(bridge, result, ["initiated", "ringing", "in-progress", "completed"])
    assert amd_of(bridge, call.sid) == [] and result.amd_sent is None
    assert result.streams[0].ended_by == "bridge"


def test_twiml_instead_of_a_url_no_amd_and_the_callee_hanging_up(
    stand_in: TwilioApiStandIn, bridge: FakeBridge
) -> None:
    number = "+15551234567"
    stand_in.callees[number] = Callee(CalleeKind.PERSON, hang_up_after=1.5, ring_s=0.2)
    call = place(stand_in, bridge, number, amd=False, twiml=bridge.twiml())
    result = stand_in.wait_outbound(call.sid, 20)
    assert result.ended == "callee_hangup" and result.duration_s == 2, result.transcript()
    check_callbacks(bridge, result, ["initiated", "ringing", "in-progress", "completed"])
    assert bridge.of("/twilio/voice", call.sid) == [] and amd_of(bridge, call.sid) == []
    assert bridge.sessions[0].start["customParameters"] == {"x": "y"}
    assert bridge.messages[-1]["event"] == "stop"
    with pytest.raises(TwilioRestException) as info:  # over: like Twilio, updates find nothing live
        stand_in.client().calls(call.sid).update(status="completed")
    assert info.value.code == 20404


def test_keys_out_through_a_redirect_to_play_digits_then_a_new_stream(
    stand_in: TwilioApiStandIn, bridge: FakeBridge
) -> None:
    """What a bridge does to press keys on a phone menu: the REST update's TwiML plays them
    (which ends the stream, as Twilio's does) and connects a new stream to the same call."""
    redirect = (
        f'<Response><Play digits="1w2#"/><Connect><Stream url="{bridge.ws_url}">'
        '<Parameter name="leg" value="2"/></Stream></Connect></Response>'
    )

    async def script(session: Session) -> None:
        client = stand_in.client()
        if len(bridge.sessions) == 1:
            await session.until(lambda: len(session.inbound) >= int(2.4 * 8000))  # the prompt is over
            await asyncio.to_thread(lambda: client.calls(session.call_sid).update(twiml=redirect))
        else:
            session.seen["answer"] = await session.speech_from(0)  # "you entered 1 2 #"
            await session.hang_up()

    bridge.script = script
    call = place(stand_in, bridge, NUMBERS[CalleeKind.MENU], amd=False)
    result = stand_in.wait_outbound(call.sid, 20)
    assert bridge.errors == [] and result.ended == "bridge_rest_hangup", result.transcript()
    check_callbacks(bridge, result, ["initiated", "ringing", "in-progress", "completed"])
    assert result.digits == ["1", "2", "#"] and result.digit_bursts == ["12#"]
    assert [leg.ended_by for leg in result.streams] == ["transfer", "twilio_rest"]
    first, second = bridge.sessions
    assert first.call_sid == second.call_sid == call.sid and first.stream_sid != second.stream_sid
    assert second.start["customParameters"] == {"leg": "2"}
    stops = [m for m in bridge.messages if m["event"] == "stop"]
    assert [m["streamSid"] for m in stops] == [first.stream_sid, second.stream_sid]
    assert "plays keys 1w2#" in result.transcript()


def test_amd_verdicts_by_mode_timeout_and_callee() -> None:
    """Which verdict Twilio's AMD gives when, without placing calls."""
    detect = {"MachineDetection": "DetectMessageEnd", "AsyncAmd": "true"}
    late = Callee(CalleeKind.LATE_MACHINE).plan()
    assert (late.beep_start, late.beep_end, late.amd_at) == (5.7, 6.1, 6.2)
    assert amd_verdict(late, detect) == ("machine_end_beep", 6.2)
    assert amd_verdict(late, detect | {"MachineDetection": "Enable"}) == ("machine_start", 2.5)
    assert amd_verdict(late, detect | {"MachineDetectionTimeout": "5"}) == ("unknown", 5.0)
    assert amd_verdict(late, detect | {"SendDigits": "1"}) is None
    assert amd_verdict(late, {}) is None
    assert amd_verdict(Callee(CalleeKind.NO_VERDICT).plan(), detect) is None
    assert amd_verdict(Callee(CalleeKind.PERSON, amd_at=2.0).plan(), detect) == ("human", 2.0)
    voicemail = Callee(CalleeKind.VOICEMAIL).plan()
    assert (voicemail.beep_end, voicemail.hang_up_after) == (3.9, 18.9)
    with pytest.raises(ValueError, match="answered_by"):
        Callee(CalleeKind.PERSON, answered_by="robot")


# --- calls never answered ---------------------------------------------------------------------


def test_busy_no_answer_failed_and_canceled(stand_in: TwilioApiStandIn, bridge: FakeBridge) -> None:
    stand_in.callees["+15551230000"] = Callee(CalleeKind.PERSON, ring_s=2.0)
    began = time.monotonic()
    busy = place(stand_in, bridge, NUMBERS[CalleeKind.BUSY])
    capped = place(stand_in, bridge, NUMBERS[CalleeKind.NO_ANSWER])  # Timeout 30: capped at 3 s
    short = place(stand_in, bridge, NUMBERS[CalleeKind.NO_ANSWER], timeout=1)
    failed = place(stand_in, bridge, NUMBERS[CalleeKind.FAILED])
    canceled = place(stand_in, bridge, "+15551230000")
    assert wait_until(lambda: stand_in.calls[canceled.sid].status == "ringing", 3)
    stand_in.client().calls(canceled.sid).update(status="canceled")

    result = stand_in.wait_outbound(busy.sid, 10)
    check_callbacks(bridge, result, ["initiated", "ringing", "busy"])
    assert (result.ended, result.duration_s, result.answered_at) == ("busy", 0, None)
    assert stand_in.client().calls(busy.sid).fetch().status == "busy"

    for call, rang in ((short, 1.0), (capped, stand_in.ring_cap_s)):
        result = stand_in.wait_outbound(call.sid, 10)
        check_callbacks(bridge, result, ["initiated", "ringing", "no-answer"])
        ringing, over = bridge.of("/twilio/status", call.sid)[1:]
        assert rang - 0.05 < over.at - ringing.at < rang + 0.5

    result = stand_in.wait_outbound(failed.sid, 10)
    check_callbacks(bridge, result, ["initiated", "failed"])

    result = stand_in.wait_outbound(canceled.sid, 10)
    check_callbacks(bridge, result, ["initiated", "ringing", "canceled"])
    assert result.ended == "canceled" and result.answered_at is None
    assert bridge.sessions == [] and [h for h in bridge.hits if h.path.startswith("/twilio/voice")] == []
    assert time.monotonic() - began < 5


def test_bad_requests_are_refused_like_twilio(stand_in: TwilioApiStandIn, bridge: FakeBridge) -> None:
    for to in ("5551234567", "+0123", "sip:someone@example.com", "+1555abc4567"):
        with pytest.raises(TwilioRestException) as info:
            place(stand_in, bridge, to)
        assert (info.value.status, info.value.code) == (400, 21211), to
        assert "To" in info.value.msg
    with pytest.raises(TwilioRestException) as info:
        make_client(ACCOUNT, "not-the-token-000000", stand_in.base_url).calls.create(
            to=NUMBERS[CalleeKind.PERSON], from_=FROM, url=bridge.url("/twilio/voice")
        )
    assert (info.value.status, info.value.code) == (401, 20003)
    with pytest.raises(TwilioRestException) as info:
        stand_in.client().calls.create(to=NUMBERS[CalleeKind.PERSON], from_=FROM)
    assert (info.value.status, info.value.code) == (400, 21205)
    assert [r.status for r in stand_in.requests] == [400, 400, 400, 400, 401, 400]
    assert stand_in.outbound == {} and stand_in.calls == {} and bridge.hits == []


# --- the menu, once the DTMF modules exist ----------------------------------------------------

DTMF_READY = all(importlib.util.find_spec(m) is not None for m in ("app.devtools.dtmf_detect", "app.core.dtmf"))


@pytest.mark.skipif(not DTMF_READY, reason="app.devtools.dtmf_detect / app.core.dtmf are not written yet")
def test_a_menu_decodes_keys_sent_as_audio(stand_in: TwilioApiStandIn, bridge: FakeBridge) -> None:
    dtmf = importlib.import_module("app.core.dtmf")

    async def script(session: Session) -> None:
        await session.until(lambda: len(session.inbound) >= int(2.6 * 8000))  # the prompt is over
        await session.send_audio(dtmf.dtmf_ulaw("12#"), "keys")
        await session.until(lambda: "keys" in session.marks)
        await session.speech_from(len(session.inbound))  # "you entered 1 2 #"
        await session.hang_up()

    bridge.script = script
    call = place(stand_in, bridge, NUMBERS[CalleeKind.MENU])
    result = stand_in.wait_outbound(call.sid, 20)
    assert bridge.errors == [] and result.ended == "bridge_rest_hangup", result.transcript()
    assert result.digits == ["1", "2", "#"] and result.digit_bursts == ["12#"]
    (amd,) = amd_of(bridge, call.sid)
    assert amd["AnsweredBy"] == "unknown"
