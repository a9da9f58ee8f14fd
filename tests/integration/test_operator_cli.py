"""The commands an operator types, in the situations just past the Quickstart: Twilio out of
reach, a webhook refused, a bad output path, Ctrl-C during a call. Each failure is one
sentence that says what to check, never a traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.endpoints import free_port
from app.devtools.simulated_caller import SimulatedCaller
from app.twilio import rest
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, wait_until

pytestmark = pytest.mark.timeout(60)
ACCOUNT = "AC" + "c" * 32
NUMBER = "+15551234567"


def callbridge(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The real command in a fresh process, as typed in a shell."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=45,
    )


@pytest.fixture
def twilio_down(tmp_path: Path) -> dict[str, str]:
    """Credentials and a PUBLIC_URL, with the Twilio API base on a loopback port nobody listens on."""
    return {
        "TWILIO_API_BASE": f"http://127.0.0.1:{free_port()}",
        "TWILIO_ACCOUNT_SID": ACCOUNT,
        "TWILIO_AUTH_TOKEN": "twilio-token-for-a-dead-api-0123",
        "PUBLIC_URL": f"https://127.0.0.1:{free_port()}",
    }


def test_configure_number_with_twilio_unreachable_is_one_line(tmp_path: Path, twilio_down: dict[str, str]) -> None:
    done = callbridge("twilio", "configure-number", NUMBER, cwd=tmp_path, **twilio_down)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    base = twilio_down["TWILIO_API_BASE"]
    assert lines[0] == (
        f"callbridge: cannot reach the Twilio API at {base}: the connection was refused; "
        "check the firewall and outbound HTTPS access, TWILIO_API_BASE"
    )
    assert twilio_down["TWILIO_AUTH_TOKEN"] not in done.stderr


def test_check_with_twilio_unreachable_still_runs_the_other_checks(tmp_path: Path, twilio_down: dict[str, str]) -> None:
    done = callbridge("twilio", "check", "--number", NUMBER, cwd=tmp_path, **twilio_down)
    assert done.returncode == 1
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "FAIL credentials",
        "ok   public_url_https",
        "FAIL public_url_reachable",
        f"skip number {NUMBER}",
    ], done.stdout
    assert "cannot reach the Twilio API at " + twilio_down["TWILIO_API_BASE"] in lines[0]
    assert "not checked: the Twilio API could not be reached" in lines[3]


def test_a_silent_twilio_api_is_a_timeout_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], twilio_down: dict[str, str]
) -> None:
    # accepts connections (the kernel's backlog) and never answers
    with socket.create_server(("127.0.0.1", 0)) as silent:
        base = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for name, value in {**twilio_down, "TWILIO_API_BASE": base}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(rest, "TIMEOUT_S", 0.5)
        assert main(["twilio", "configure-number", NUMBER, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err == f"callbridge: cannot reach the Twilio API at {base}: no answer within 0.5 s; " + (
        "check the firewall and outbound HTTPS access, TWILIO_API_BASE\n"
    )


def test_simulate_call_refused_names_public_url_and_token(
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # the bridge checks signatures against its PUBLIC_URL, the caller signs the URL it called
    bridge = start_bridge(start_agent().url, public_url="https://bridge.example.com")
    out = tmp_path / "heard.wav"
    args = ["simulate-call", "--url", bridge.base_url, "--fast", "--out", str(out)]
    assert main([*args, "--auth-token", TWILIO_TOKEN]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "HTTP 403" in err and "PUBLIC_URL" in err and "--auth-token" in err
    assert f"signed {bridge.base_url}/twilio/voice with the token given with --auth-token" in err
    assert TWILIO_TOKEN not in err
    assert not out.exists()


def test_simulate_call_signs_with_the_token_serve_reads_from_dotenv(
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # `serve` reads TWILIO_AUTH_TOKEN from .env; simulate-call run in the same directory does too
    bridge = start_bridge(start_agent().url)
    Path(".env").write_text(f"TWILIO_AUTH_TOKEN={TWILIO_TOKEN}\n")
    out = tmp_path / "heard.wav"
    args = ["simulate-call", "--url", bridge.base_url, "--fast", "--tail", "0.5", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert out.exists()
    # and another token in .env is refused with the hint
    Path(".env").write_text("TWILIO_AUTH_TOKEN=another-token-0123456789\n")
    assert main(args) == 1
    assert "TWILIO_AUTH_TOKEN from the environment or .env" in capsys.readouterr().err


def test_simulate_call_checks_the_output_path_before_calling(
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    bridge = start_bridge(start_agent().url)
    missing = tmp_path / "nonexistent" / "x.wav"
    args = ["simulate-call", "--url", bridge.base_url, "--auth-token", TWILIO_TOKEN, "--fast"]
    assert main([*args, "--out", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"callbridge: cannot write --out {missing}: directory {missing.parent} does not exist\n"
    )
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory" in capsys.readouterr().err
    assert bridge.records("call_answered") == []  # no call was placed


def test_emulate_agent_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["emulate-agent", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 127.0.0.1)", "(default: 8765)", "(default: 4.0)", "(default: 10.0)", "(default: info)"):
        assert default in text
    assert "(default: None)" not in text


# --- Ctrl-C during a call --------------------------------------------------------------------

# `python -m app serve` with Python's own Ctrl-C handling even when the test runner was started
# with SIGINT ignored (a background job), as it is in a terminal
SERVE_AS_IN_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = ['callbridge', 'serve']; runpy.run_module('app', run_name='__main__')"
)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path, str]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> tuple[subprocess.Popen[bytes], Path, str]:
        port = free_port()
        err_path = tmp_path / "stderr.txt"
        with err_path.open("wb") as err, (tmp_path / "stdout.txt").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVE_AS_IN_A_TERMINAL],
                cwd=tmp_path,
                env={**os.environ, "PORT": str(port), **env},
                stdout=out,
                stderr=err,
            )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _listening(port), timeout=20), err_path.read_text()
        return proc, err_path, base

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _call_in_background(base: str, outcome: dict[str, Any]) -> threading.Thread:
    pcm = synth.silence(8.0) + synth.speech_like("still on the line") + synth.silence(0.5)
    caller = SimulatedCaller(base, TWILIO_TOKEN, tail=0.5)

    def run() -> None:
        try:
            outcome["result"] = asyncio.run(caller.run(synth.encode(pcm, TWILIO_FORMAT)))
        except Exception as exc:  # the call is cut: the test looks at the bridge, not the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_ctrl_c_says_what_it_waits_for_and_a_second_one_forces_exit_quietly(
    serve_process: Callable[..., tuple[subprocess.Popen[bytes], Path, str]], tmp_path: Path
) -> None:
    proc, err_path, base = serve_process(TWILIO_AUTH_TOKEN=TWILIO_TOKEN, DRAIN_TIMEOUT_SECONDS="45")
    outcome: dict[str, Any] = {}
    thread = _call_in_background(base, outcome)
    try:
        assert wait_until(lambda: b"stream_started" in (tmp_path / "stdout.txt").read_bytes(), timeout=10)
        proc.send_signal(signal.SIGINT)
        said = "callbridge: stopping: no new calls; waiting up to 45 s for 1 call in progress to end; "
        said += "press Ctrl-C again to stop now and cut them"
        assert wait_until(lambda: said in err_path.read_text(), timeout=5), err_path.read_text()
        assert proc.poll() is None  # the call goes on
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
    finally:
        thread.join(20)
    err = err_path.read_text()
    assert started_offline(err.splitlines()) == [
        said,
        "callbridge: stopping now: cutting the 1 call still in progress",
        "callbridge: stopped",
    ]
    assert "Traceback" not in (tmp_path / "stdout.txt").read_text()


def test_ctrl_c_with_no_calls_stops_at_once(
    serve_process: Callable[..., tuple[subprocess.Popen[bytes], Path, str]],
) -> None:
    proc, err_path, _ = serve_process()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    assert started_offline(err_path.read_text().splitlines()) == ["callbridge: stopping (no calls in progress)"]


def started_offline(lines: list[str]) -> list[str]:
    """The lines after the two the offline quickstart starts with (the console's address and its
    token for this run, then where calls placed go), which are checked here."""
    assert lines[0].startswith("callbridge: console at http://127.0.0.1:"), lines
    assert "/console  operator token (this run only): " in lines[0] and len(lines[0].rsplit(" ", 1)[1]) >= 24
    assert lines[1].startswith("callbridge: outbound calls go to simulated callees offline"), lines
    return lines[2:]
