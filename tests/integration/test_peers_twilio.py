"""The Twilio side of the test peers: the REST stand-in through the real twilio SDK, and the
simulated caller's keypad and REST-driven endings, against a tiny stand-in bridge on loopback
that records every frame the caller sends."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from twilio.base.exceptions import TwilioRestException
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from app.cli import main
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.endpoints import free_port
from app.devtools.simulated_caller import SimulatedCaller, dial_target, parse_keys
from app.devtools.twilio_api import CallUpdate, TwilioApiStandIn
from app.twilio.rest import make_client
from tests.conftest import LoopThread

pytestmark = pytest.mark.timeout(30)
ACCOUNT = "AC" + "c" * 32
TOKEN = "stand-in-token-0123456789"
TRANSFER = "<Response><Dial>+15551230001</Dial></Response>"


@pytest.fixture
def api() -> Iterator[TwilioApiStandIn]:
    with TwilioApiStandIn(ACCOUNT, TOKEN) as stand_in:
        yield stand_in


# --- the REST stand-in through the SDK --------------------------------------------------------


def test_hang_up_through_the_sdk_then_20404(api: TwilioApiStandIn) -> None:
    told: list[CallUpdate] = []
    api.register_call("CA1", told.append, from_="+15550001111", to="+15550002222")
    call = api.client().calls("CA1").update(status="completed")
    assert (call.sid, call.status, call.to, call._from) == ("CA1", "completed", "+15550002222", "+15550001111")
    assert [(u.call_sid, u.kind, u.form) for u in told] == [("CA1", "hangup", {"Status": "completed"})]
    (request,) = api.requests
    assert (request.method, request.path, request.form, request.status) == (
        "POST",
        f"/2010-04-01/Accounts/{ACCOUNT}/Calls/CA1.json",
        {"Status": "completed"},
        200,
    )
    assert request.call_sid == "CA1" and request.at <= time.monotonic()
    # the call is over: Twilio answers 20404, and nobody is told anything
    for sid in ("CA1", "CAunknown"):
        with pytest.raises(TwilioRestException) as info:
            api.client().calls(sid).update(status="completed")
        assert (info.value.code, info.value.status) == (20404, 404)
    assert len(told) == 1
    assert [r.status for r in api.call_updates()] == [200, 404, 404]
    assert [r.status for r in api.call_updates("CA1")] == [200, 404]


def test_transfer_twiml_is_recorded_and_the_call_stays_up(api: TwilioApiStandIn) -> None:
    told: list[CallUpdate] = []
    api.register_call("CA2", told.append)
    call = api.client().calls("CA2").update(twiml=TRANSFER)
    assert call.status == "in-progress"
    assert [(u.kind, u.twiml) for u in told] == [("redirect", TRANSFER)]
    assert api.calls["CA2"].twiml == TRANSFER
    assert api.requests_for("CA2")[0].form == {"Twiml": TRANSFER}
    assert api.client().calls("CA2").fetch().status == "in-progress"


def test_wrong_credentials_and_scripted_failures(api: TwilioApiStandIn) -> None:
    api.register_call("CA3")
    with pytest.raises(TwilioRestException) as info:
        make_client(ACCOUNT, "not-the-token-000000", api.base_url).calls("CA3").update(status="completed")
    assert (info.value.status, info.value.code) == (401, 20003)
    api.fail_call_updates = (500, 20500, "Internal Server Error")
    with pytest.raises(TwilioRestException) as info:
        api.client().calls("CA3").update(status="completed")
    assert (info.value.status, info.value.code) == (500, 20500)
    assert api.calls["CA3"].status == "in-progress"  # a failed update changes nothing
    assert [r.status for r in api.requests] == [401, 500]


# --- a stand-in bridge that records what the simulated caller sends ---------------------------


class Bridge:
    """Answers the voice webhook with TwiML to its own WebSocket, records every frame, and can
    act through the REST API some time after `start`."""

    def __init__(self, act: Callable[[dict[str, Any]], None] | None = None, after: float = 0.3) -> None:
        self.act, self.after = act, after
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.loop = LoopThread()
        self.ws_port = 0
        self.server = self.loop.run(self.listen())
        self.ws_port = self.server.sockets[0].getsockname()[1]
        twiml = (
            f'<Response><Connect><Stream url="ws://127.0.0.1:{self.ws_port}/twilio/media">'
            '<Parameter name="token" value="t"/></Stream></Connect></Response>'
        ).encode()

        class Webhook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(twiml)))
                self.end_headers()
                self.wfile.write(twiml)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}"

    async def listen(self) -> Server:
        return await serve(self.handle, "127.0.0.1", 0)

    async def handle(self, ws: ServerConnection) -> None:
        actions = []
        try:
            async for raw in ws:
                msg = json.loads(raw)
                self.frames.append((time.monotonic(), msg))
                if msg["event"] == "start" and self.act is not None:
                    act = self.act
                    actions.append(asyncio.create_task(self.later(act, msg)))
        except ConnectionClosed:
            pass
        for task in actions:
            await task

    async def later(self, act: Callable[[dict[str, Any]], None], start: dict[str, Any]) -> None:
        await asyncio.sleep(self.after)
        await asyncio.to_thread(act, start)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.frames if m["event"] == kind]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.server.close()
        self.loop.run(self.server.wait_closed())
        self.loop.close()


@pytest.fixture
def make_bridge() -> Iterator[Callable[..., Bridge]]:
    made: list[Bridge] = []

    def make(*args: Any, **kwargs: Any) -> Bridge:
        made.append(Bridge(*args, **kwargs))
        return made[-1]

    yield make
    for bridge in made:
        bridge.close()


def speech(seconds: float = 0.4) -> bytes:
    return synth.encode(synth.speech_like("hello") + synth.silence(seconds), TWILIO_FORMAT)


def test_keys_are_pressed_as_twilio_sends_dtmf(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge()
    caller = SimulatedCaller(bridge.base_url, TOKEN, fast=True, tail=0.2, keys=[(0.6, "12#"), (0.2, "9")])
    result = asyncio.run(caller.run(speech(0.1)))
    assert result.ended_by == "caller"
    dtmf = [(t, m) for t, m in bridge.frames if m["event"] == "dtmf"]
    assert [m for _, m in dtmf] == [
        {
            "event": "dtmf",
            "sequenceNumber": m["sequenceNumber"],
            "streamSid": caller.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
        for (_, m), digit in zip(dtmf, "912#", strict=True)
    ]
    # one numbering for every event after `start` (which is 1), in the order sent
    numbered = [m for _, m in bridge.frames if m["event"] != "connected"]
    assert [int(m["sequenceNumber"]) for m in numbered] == list(range(1, len(numbered) + 1))
    assert numbered[-1]["event"] == "stop"
    # pressed at their times (the call stays up for them), 150 ms apart within a burst
    start_at = next(t for t, m in bridge.frames if m["event"] == "start")
    times = [t - start_at for t, _ in dtmf]
    assert 0.15 < times[0] < 0.45 and 0.55 < times[1] < 0.85
    assert all(0.1 < b - a < 0.3 for a, b in itertools.pairwise(times[1:]))
    assert [d for _, d in result.keys_pressed] == list("912#")
    assert "presses 1 2 #" in result.transcript() and "presses 9" in result.transcript()


def test_bad_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="0-9"):
        SimulatedCaller("http://127.0.0.1:1", TOKEN, keys=[(1.0, "12x")])
    assert parse_keys("3:1234#") == (3.0, "1234#")
    assert parse_keys("0.5:*AD") == (0.5, "*AD")
    for bad in ("3", "-1:1", "x:1", "3:", "nan:1", "inf:1", "2:e"):
        with pytest.raises(ValueError):
            parse_keys(bad)


def test_the_bridge_hangs_up_through_rest(api: TwilioApiStandIn, make_bridge: Callable[..., Bridge]) -> None:
    def hang_up(start: dict[str, Any]) -> None:
        assert start["start"]["accountSid"] == ACCOUNT
        api.client().calls(start["start"]["callSid"]).update(status="completed")

    bridge = make_bridge(hang_up)
    caller = SimulatedCaller(bridge.base_url, TOKEN, tail=10, max_tail=10, twilio_api=api)
    began = time.monotonic()
    result = asyncio.run(caller.run(speech()))
    assert time.monotonic() - began < 3  # ended by the REST update, not by the 10 s tail
    assert result.ended_by == "twilio_rest" and result.close_code == 1000
    assert bridge.frames[-1][1]["event"] == "stop"  # stop, then nothing: the socket closed
    assert len(bridge.events("stop")) == 1
    assert [(r.method, r.form, r.status) for r in result.rest_requests] == [("POST", {"Status": "completed"}, 200)]
    assert [u.kind for u in result.rest_updates] == ["hangup"] and result.redirected_to is None
    assert "REST update: hang up (Status=completed)" in result.transcript()
    assert "call ended by twilio_rest" in result.transcript()
    with pytest.raises(TwilioRestException) as info:  # the call is over
        api.client().calls(caller.call_sid).update(status="completed")
    assert info.value.code == 20404


def test_the_bridge_transfers_through_rest(api: TwilioApiStandIn, make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(lambda start: api.client().calls(start["start"]["callSid"]).update(twiml=TRANSFER))
    caller = SimulatedCaller(bridge.base_url, TOKEN, tail=10, max_tail=10, twilio_api=api)
    result = asyncio.run(caller.run(speech()))
    assert result.ended_by == "transfer"
    assert result.redirected_to == TRANSFER
    assert bridge.frames[-1][1]["event"] == "stop"
    assert "REST update: transfer to +15551230001" in result.transcript()
    assert api.calls[caller.call_sid].status == "completed"  # the caller's side of it is over
    assert dial_target("<Response><Dial><Sip>sip:desk@example.com</Sip></Dial></Response>") == "sip:desk@example.com"
    assert dial_target("<Response><Hangup/></Response>") is None


def test_a_caller_that_hangs_up_first_leaves_a_404(api: TwilioApiStandIn, make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge()
    caller = SimulatedCaller(bridge.base_url, TOKEN, fast=True, tail=0.1, twilio_api=api)
    result = asyncio.run(caller.run(speech(0.1)))
    assert result.ended_by == "caller" and result.rest_updates == []
    with pytest.raises(TwilioRestException) as info:
        api.client().calls(caller.call_sid).update(status="completed")
    assert info.value.code == 20404


def test_simulate_call_cli_presses_keys_and_shows_the_rest_hang_up(
    make_bridge: Callable[..., Bridge], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()

    def hang_up(start: dict[str, Any]) -> None:
        client = make_client(start["start"]["accountSid"], TOKEN, f"http://127.0.0.1:{port}")
        client.calls(start["start"]["callSid"]).update(status="completed")

    bridge = make_bridge(hang_up, after=1.0)
    code = main(
        [
            "simulate-call",
            "--url",
            bridge.base_url,
            "--out",
            str(tmp_path / "heard.wav"),
            "--auth-token",
            TOKEN,
            "--press",
            "0.3:42#",
            "--twilio-api-port",
            str(port),
            "--account-sid",
            ACCOUNT,
            "--tail",
            "10",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert [m["dtmf"]["digit"] for m in bridge.events("dtmf")] == ["4", "2", "#"]
    assert "caller presses 4 2 #" in out
    assert "REST update: hang up (Status=completed)" in out
    assert "call ended by twilio_rest" in out
    assert f"twilio REST: POST /2010-04-01/Accounts/{ACCOUNT}/Calls/" in out and "Status=completed -> 200" in out
