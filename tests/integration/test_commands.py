"""The commands tell the truth: a second `serve` on a served address is refused in one line
(one process or workers) while the first goes on serving; `simulate-call` fails when the call
did not go through and dials the number asked; `.env.example` copied as it is runs the offline
quickstart; `twilio check` says in words why PUBLIC_URL is not reachable. Real processes and
sockets on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import app
from app.cli import main
from app.devtools.endpoints import free_port
from app.devtools.simulated_caller import SimulatedCaller
from app.twilio import rest
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, get, start_serve, stop_serve, wait_until

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]
SALES = "+15551230001"


def taken_line(port: int, pid: int) -> str:
    return (
        f"callbridge: cannot listen on 127.0.0.1:{port}: another `callbridge serve` (pid {pid}) is serving it; "
        "stop it first, or choose another PORT (--port)"
    )


def second_serve(cwd: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "serve", *args],
        cwd=cwd,
        env={**os.environ, "PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path, str]]]:
    """A real `serve` (with args and extra environment) that answers /healthz: its process, its
    output (stdout and stderr), its base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path, str]:
        port = free_port()
        proc, log_path = start_serve(tmp_path, {**os.environ, "PORT": str(port), **env}, *args)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _answers(base), timeout=30), log_path.read_text()
        return proc, log_path, base

    yield start
    for proc in procs:
        stop_serve(proc)


def _answers(base: str) -> bool:
    try:
        return get(f"{base}/healthz")[0] == 200
    except OSError:
        return False


# --- one instance per address ------------------------------------------------------------------


def test_a_second_serve_on_a_single_process_serve_is_refused_and_the_first_serves_on(
    serving: Callable[..., tuple[subprocess.Popen[bytes], Path, str]], tmp_path: Path
) -> None:
    first, _, base = serving()
    port = int(base.rsplit(":", 1)[1])
    for args in ((), ("--workers", "2")):
        second = second_serve(tmp_path, port, *args)
        assert second.returncode == 1, second.stderr
        assert second.stderr.splitlines() == [taken_line(port, first.pid)], args
    assert first.poll() is None
    assert get(f"{base}/healthz")[0] == 200


def test_a_second_serve_on_workers_is_refused_and_the_profiles_are_said_once(
    serving: Callable[..., tuple[subprocess.Popen[bytes], Path, str]], tmp_path: Path
) -> None:
    numbers = tmp_path / "numbers"
    numbers.mkdir()
    default = json.loads((Path(app.__file__).parent / "profiles" / "default.json").read_text())
    for name in (SALES, "reminders"):
        (numbers / f"{name}.json").write_text(json.dumps(default))
    first, log_path, base = serving("--workers", "2", AGENT_PROFILES_DIR=str(numbers))
    port = int(base.rsplit(":", 1)[1])
    for args in (("--workers", "2"), ()):
        second = second_serve(tmp_path, port, *args)
        assert second.returncode == 1, second.stderr
        assert second.stderr.splitlines() == [taken_line(port, first.pid)], args
    assert first.poll() is None
    assert get(f"{base}/healthz")[0] == 200
    # the supervisor said which profile answers which number, once for the instance
    lines = log_path.read_text().splitlines()
    said = [line for line in lines if line.startswith("callbridge: profiles from")]
    assert said == [
        f"callbridge: profiles from {numbers}: {SALES} (calls to these numbers); reminders (calls placed that "
        f"name it); every other number: the built-in default ({Path(app.__file__).parent / 'profiles'}"
        "/default.json)"
    ]
    records = [json.loads(line) for line in lines if line.startswith("{") and '"profiles_loaded"' in line]
    assert [r["numbers"] for r in records] == [[SALES, "reminders"]]


def test_serve_on_a_port_another_program_listens_on_names_the_address(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MAX_CALL=3\n")  # the misspelling is said first, then the port
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        for args in ((), ("--workers", "2")):
            done = second_serve(tmp_path, port, *args)
            assert done.returncode == 1
            assert done.stderr.splitlines() == [
                "callbridge: .env: unknown key MAX_CALL ignored (did you mean MAX_CALLS?)",
                f"callbridge: cannot listen on 127.0.0.1:{port}: another program listens on 127.0.0.1:{port}; "
                "stop it first, or choose another PORT (--port)",
            ], args


# --- .env.example -------------------------------------------------------------------------------


def test_env_example_copied_as_it_is_runs_the_offline_quickstart(
    serving: Callable[..., tuple[subprocess.Popen[bytes], Path, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text())
    _, log_path, base = serving()
    said = [line for line in log_path.read_text().splitlines() if line.startswith("callbridge:")]
    assert said[0].startswith("callbridge: console at "), said  # offline, and no warning before it
    monkeypatch.chdir(tmp_path)  # simulate-call reads the same .env (TWILIO_AUTH_TOKEN empty: unset)
    out = tmp_path / "heard.wav"
    assert main(["simulate-call", "--url", base, "--fast", "--tail", "0.5", "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert out.exists()


# --- simulate-call ------------------------------------------------------------------------------


def test_simulate_call_with_nothing_at_the_url_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "heard.wav"
    assert main(["simulate-call", "--url", url, "--fast", "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"callbridge: nothing answers at {url} (connection refused): is `callbridge serve` running?\n"
    )
    assert not out.exists()


def test_simulate_call_fails_when_the_stream_is_refused(
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # two instances with different stream-token secrets: the webhook answered by one, the stream
    # sent to the other, which refuses the token (the calls a shared port used to break)
    agent = start_agent()
    other = start_bridge(agent.url, stream_token_secret="another-instance-secret-0123456789")
    bridge = start_bridge(agent.url, public_url=other.base_url, twilio_validate_signature=False)
    out = tmp_path / "heard.wav"
    args = ["simulate-call", "--url", bridge.base_url, "--fast", "--tail", "0.5", "--out", str(out)]
    assert main([*args, "--auth-token", TWILIO_TOKEN]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "callbridge: call failed: the bridge closed the stream with code 1008 (refused: a stream token it does "
        "not accept (another instance's secret, used or expired), or no valid start in time)"
    ]
    assert bridge.wait_for("stream_rejected")["reason"] == "bad_token"  # the log of both (the last configured)


def test_simulate_call_fails_when_the_bridge_answers_its_fallback(
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    bridge = start_bridge(start_agent().url, max_calls=1)
    assert SimulatedCaller(bridge.base_url, TWILIO_TOKEN).post_webhook()[0] == 200  # admitted: the one place
    out = tmp_path / "heard.wav"
    args = ["simulate-call", "--url", bridge.base_url, "--fast", "--out", str(out), "--auth-token", TWILIO_TOKEN]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "callbridge: call not connected: the bridge answered TwiML without a media stream (its fallback "
        "when it is at MAX_CALLS or stopping; its log says why): <?xml"
    ), err
    assert len(err.splitlines()) == 1 and "<Say" in err
    assert bridge.wait_for("call_not_admitted")["reason"] == "over_capacity"


def test_simulate_call_to_a_number_gets_that_numbers_profile(
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    sales = json.loads((Path(app.__file__).parent / "profiles" / "default.json").read_text())
    sales["agent"]["greeting"] = "Sales desk, how can I help?"
    numbers = tmp_path / "numbers"
    numbers.mkdir()
    (numbers / f"{SALES}.json").write_text(json.dumps(sales))
    agent = start_agent()
    bridge = start_bridge(agent.url, agent_profiles_dir=numbers)
    out = tmp_path / "heard.wav"
    args = ["simulate-call", "--url", bridge.base_url, "--fast", "--tail", "0.5", "--out", str(out)]
    code = main([*args, "--auth-token", TWILIO_TOKEN, "--to", SALES, "--from", "+15557654321"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"from +15557654321 to {SALES} (CallSid " in printed.out
    answered = bridge.wait_for("call_answered")
    assert answered["profile"] == SALES
    assert wait_until(lambda: bool(agent.agent.sessions) and agent.agent.sessions[0].settings is not None)
    settings = agent.agent.sessions[0].settings
    assert settings is not None and settings["agent"]["greeting"] == "Sales desk, how can I help?"


# --- twilio check -------------------------------------------------------------------------------


class Plain(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def plain_http() -> Iterator[str]:
    """Something on loopback that answers HTTP, but is not the bridge (404 everywhere)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_twilio_check_says_why_public_url_is_not_reachable(plain_http: str) -> None:
    refused = f"https://127.0.0.1:{free_port()}"
    assert rest.public_url_reachable(refused) == (False, f"PUBLIC_URL {refused} is not reachable: connection refused")
    nowhere = "https://bridge.callbridge-test.invalid"
    assert rest.public_url_reachable(nowhere) == (
        False,
        f"PUBLIC_URL {nowhere} is not reachable: the name bridge.callbridge-test.invalid does not resolve",
    )
    assert rest.public_url_reachable(f"https://{plain_http}") == (
        False,
        f"PUBLIC_URL https://{plain_http} is not reachable: the TLS handshake failed: no TLS there (plain http?)",
    )
    assert rest.public_url_reachable(f"http://{plain_http}") == (
        False,
        f"PUBLIC_URL http://{plain_http} answers, but GET /healthz answered HTTP 404 Not Found: "
        "is this bridge behind it?",
    )


def test_twilio_check_prints_the_words(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    refused = f"https://127.0.0.1:{free_port()}"
    monkeypatch.setenv("PUBLIC_URL", refused)
    assert main(["twilio", "check"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL public_url_reachable: PUBLIC_URL {refused} is not reachable: connection refused\n" in out
    assert "urlopen" not in out and "Errno" not in out
