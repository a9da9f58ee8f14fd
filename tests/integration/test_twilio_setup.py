"""`callbridge twilio ...` against a local stand-in for the Twilio REST API, through the
real twilio SDK (only its base URL differs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from app.cli import main
from app.devtools.endpoints import free_port
from app.devtools.twilio_api import TwilioApiStandIn
from tests.conftest import AgentHandle, BridgeHandle

ACCOUNT = "AC" + "a" * 32
TOKEN = "fake-twilio-token-0123456789"
NUMBER = "+15551234567"
NUMBER_SID = "PN" + "b" * 32


@pytest.fixture
def fake_twilio(monkeypatch: pytest.MonkeyPatch) -> Iterator[TwilioApiStandIn]:
    with TwilioApiStandIn(ACCOUNT, TOKEN) as api:
        api.add_number(
            NUMBER,
            sid=NUMBER_SID,
            voice_url="https://old.example.com/voice",
            voice_method="GET",
            status_callback="",
            status_callback_method="POST",
        )
        for name, value in api.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PUBLIC_URL", "https://bridge.example.com")
        yield api


def test_configure_number_dry_run_changes_nothing(
    fake_twilio: TwilioApiStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["twilio", "configure-number", NUMBER, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would change" in out
    assert "voice_url: https://old.example.com/voice -> https://bridge.example.com/twilio/voice" in out
    assert "status_callback: (empty) -> https://bridge.example.com/twilio/status" in out
    assert fake_twilio.number_updates == []


def test_configure_number_updates_then_is_idempotent(
    fake_twilio: TwilioApiStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["twilio", "configure-number", NUMBER]) == 0
    assert fake_twilio.number_updates == [
        {
            "VoiceUrl": "https://bridge.example.com/twilio/voice",
            "VoiceMethod": "POST",
            "StatusCallback": "https://bridge.example.com/twilio/status",
        }
    ]
    capsys.readouterr()
    assert main(["twilio", "configure-number", NUMBER]) == 0
    assert "nothing to change" in capsys.readouterr().out
    assert len(fake_twilio.number_updates) == 1


def test_configure_number_refuses_bad_input(
    fake_twilio: TwilioApiStandIn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
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
    fake_twilio: TwilioApiStandIn,
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
    assert "ok   public_url_reachable" in out
    assert f"FAIL public_url_https: {bridge.base_url}: Twilio needs an https:// URL" in out
    # without credentials or PUBLIC_URL the number is not checked, and the line says why
    monkeypatch.delenv("PUBLIC_URL")
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    assert main(["twilio", "check", "--number", NUMBER]) == 1
    assert f"skip number {NUMBER}: not checked: needs credentials and PUBLIC_URL" in capsys.readouterr().out
