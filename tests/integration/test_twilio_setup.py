"""`callbridge twilio ...` against a local stand-in for the Twilio REST API, through the
real twilio SDK (only its base URL differs)."""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.cli import main
from app.devtools.endpoints import free_port
from tests.conftest import AgentHandle, BridgeHandle

ACCOUNT = "AC" + "a" * 32
TOKEN = "fake-twilio-token-0123456789"
NUMBER = "+15551234567"
NUMBER_SID = "PN" + "b" * 32


class FakeTwilio(BaseHTTPRequestHandler):
    numbers: dict[str, dict[str, Any]] = {}
    updates: list[dict[str, str]] = []

    def _authorized(self) -> bool:
        expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self._send(401, {"code": 20003, "message": "Authenticate", "status": 401})
            return False
        return True

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if not self._authorized():
            return
        url = urllib.parse.urlsplit(self.path)
        base = f"/2010-04-01/Accounts/{ACCOUNT}"
        if url.path == base + ".json":
            self._send(200, {"sid": ACCOUNT, "status": "active", "friendly_name": "test"})
        elif url.path == base + "/IncomingPhoneNumbers.json":
            wanted = urllib.parse.parse_qs(url.query).get("PhoneNumber", [""])[0]
            found = [n for n in self.numbers.values() if n["phone_number"] == wanted]
            self._send(
                200,
                {
                    "incoming_phone_numbers": found,
                    "next_page_uri": None,
                    "page": 0,
                    "page_size": 2,
                    "first_page_uri": url.path,
                    "previous_page_uri": None,
                    "uri": url.path,
                    "start": 0,
                    "end": len(found),
                },
            )
        else:
            self._send(404, {"code": 20404, "message": "not found", "status": 404})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        sid = self.path.rsplit("/", 1)[-1].removesuffix(".json")
        form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
        type(self).updates.append(form)
        number = self.numbers[sid]
        mapping = {
            "VoiceUrl": "voice_url",
            "VoiceMethod": "voice_method",
            "StatusCallback": "status_callback",
            "StatusCallbackMethod": "status_callback_method",
        }
        for key, value in form.items():
            number[mapping[key]] = value
        self._send(200, number)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_twilio(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeTwilio]]:
    handler = type(
        "Fake",
        (FakeTwilio,),
        {
            "updates": [],
            "numbers": {
                NUMBER_SID: {
                    "sid": NUMBER_SID,
                    "account_sid": ACCOUNT,
                    "phone_number": NUMBER,
                    "voice_url": "https://old.example.com/voice",
                    "voice_method": "GET",
                    "status_callback": "",
                    "status_callback_method": "POST",
                }
            },
        },
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TWILIO_API_BASE", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("PUBLIC_URL", "https://bridge.example.com")
    yield handler
    server.shutdown()
    server.server_close()


def test_configure_number_dry_run_changes_nothing(
    fake_twilio: type[FakeTwilio], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["twilio", "configure-number", NUMBER, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would change" in out
    assert "voice_url: https://old.example.com/voice -> https://bridge.example.com/twilio/voice" in out
    assert "status_callback: (empty) -> https://bridge.example.com/twilio/status" in out
    assert fake_twilio.updates == []


def test_configure_number_updates_then_is_idempotent(
    fake_twilio: type[FakeTwilio], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["twilio", "configure-number", NUMBER]) == 0
    assert fake_twilio.updates == [
        {
            "VoiceUrl": "https://bridge.example.com/twilio/voice",
            "VoiceMethod": "POST",
            "StatusCallback": "https://bridge.example.com/twilio/status",
        }
    ]
    capsys.readouterr()
    assert main(["twilio", "configure-number", NUMBER]) == 0
    assert "nothing to change" in capsys.readouterr().out
    assert len(fake_twilio.updates) == 1


def test_configure_number_refuses_bad_input(
    fake_twilio: type[FakeTwilio], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["twilio", "configure-number", "5551234567"]) == 1
    assert "E.164" in capsys.readouterr().err
    assert main(["twilio", "configure-number", "+15550000000"]) == 1
    assert "not a phone number of this Twilio account" in capsys.readouterr().err
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "wrong-token-000000")
    assert main(["twilio", "configure-number", NUMBER]) == 1
    assert "401" in capsys.readouterr().err
    monkeypatch.setenv("PUBLIC_URL", "http://bridge.example.com")
    assert main(["twilio", "configure-number", NUMBER]) == 1
    assert "https" in capsys.readouterr().err


def test_check_reports_each_problem(
    fake_twilio: type[FakeTwilio],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
) -> None:
    # nothing listens at this https PUBLIC_URL: check must say so
    monkeypatch.setenv("PUBLIC_URL", f"https://127.0.0.1:{free_port()}")
    assert main(["twilio", "check", "--number", NUMBER]) == 1
    out = capsys.readouterr().out
    assert "ok   credentials: account " + ACCOUNT + " is active" in out
    assert "ok   public_url_https" in out
    assert "FAIL public_url_reachable" in out
    assert f"FAIL number {NUMBER}: differs: voice_url, voice_method, status_callback" in out
    # a reachable bridge (plain http on loopback): reachable, but not https
    bridge = start_bridge(start_agent().url)
    monkeypatch.setenv("PUBLIC_URL", bridge.base_url)
    assert main(["twilio", "check"]) == 1
    out = capsys.readouterr().out
    assert "ok   public_url_reachable" in out and "FAIL public_url_https" in out
