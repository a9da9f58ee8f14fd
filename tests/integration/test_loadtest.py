"""`callbridge loadtest --url` against an offline `callbridge serve`, as docs/capacity.md's user runs it:
no Twilio token anywhere, the local agent inside the bridge; and `--floor`, the yardstick, in a
tiny run that still accounts for every frame."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import main
from app.codecs import TWILIO_SAMPLE_RATE
from app.devtools.endpoints import LOOPBACK, bridge_url, free_port, wait_for_port
from app.devtools.loadtest import stamp_count
from tests.conftest import start_serve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline_bridge(tmp_path: Path) -> Iterator[str]:
    """A real `callbridge serve` with nothing configured but where to listen (no .env either:
    it runs in an empty directory)."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "HOST": LOOPBACK,
        "PORT": str(port),
        "LOG_LEVEL": "warning",
    }
    proc, log_path = start_serve(tmp_path, env)
    try:
        try:
            wait_for_port(port, proc, timeout=20)
        except RuntimeError as exc:
            raise AssertionError(log_path.read_text(errors="replace")) from exc
        yield bridge_url(port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_loadtest_url_against_offline_serve(
    offline_bridge: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # like the bridge, the load test sees no Twilio token: no environment variable, no .env here
    monkeypatch.delenv("TWILIO_AUTH_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    code = main(["loadtest", "--url", offline_bridge, "--calls", "2", "--seconds", "3", "--ramp", "0.2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "calls completed 2/2, failed 0, Twilio protocol violations 0" in printed, printed
    assert not re.search(r"\bnan\b", printed, re.IGNORECASE), printed
    # what a bridge it did not start cannot tell it
    assert "CPU" not in printed and "RSS" not in printed, printed
    # client-side samples for both calls, and the bridge's own count of them from /metrics
    assert re.search(r"webhook POST -> TwiML\s+p50 .*\(n=2\)", printed), printed
    assert re.search(r"stream start -> first agent audio \(greeting\)\s+p50 .*\(n=2\)", printed), printed
    assert "calls ended by outcome: caller_hangup 2" in printed, printed
    assert "webhooks: answered 2" in printed, printed
    assert re.search(r"stream start -> first agent audio\s+mean .* \(bucket bounds; n=2\)", printed), printed


@pytest.mark.timeout(30)
def test_loadtest_url_with_the_wrong_token_says_why(offline_bridge: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["loadtest", "--url", offline_bridge, "--calls", "1", "--seconds", "1", "--auth-token", "wrong"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "calls completed 0/1, failed 1" in printed and "HTTP 403" in printed, printed
    assert "signed with the token given with --auth-token" in printed, printed
    assert "webhooks: bad_signature 1" in printed, printed
    assert "p50" not in printed and not re.search(r"\bnan\b", printed, re.IGNORECASE), printed


@pytest.mark.timeout(120)
def test_loadtest_with_the_floor_reports_both_and_the_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    """The yardstick: the floor and the bridge under the same tiny load, every frame accounted for."""
    code = main(["loadtest", "--calls", "2", "--seconds", "3", "--ramp", "0.2", "--floor"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    bridge, _, rest = printed.partition("the floor (app.devtools.minimal_relay)")
    floor, _, comparison = rest.partition("bridge against the floor")
    assert comparison, printed
    frames = 2 * stamp_count(3 * TWILIO_SAMPLE_RATE)  # every stamped caller frame of both calls
    for side, process in ((bridge, "bridge process"), (floor, "floor process")):
        assert "calls completed 2/2, failed 0, Twilio protocol violations 0" in side, printed
        assert f"caller -> agent: {frames} frames sent, lost 0, duplicated 0, reordered 0" in side, printed
        # every frame has a latency: most once the agent was ready, the first few held until then
        relayed = re.search(r"caller frame sent -> at the agent\s+p50 .*\(n=(\d+)\)", side)
        held = re.search(r"sent before SettingsApplied \(held\)\s+(?:no samples|p50 .*\(n=(\d+)\))", side)
        assert relayed and held and int(relayed[1]) + int(held[1] or 0) == frames, printed
        received = re.search(r"agent -> caller: (\d+) audio messages received, lost 0 .*, reordered 0", side)
        assert received and int(received[1]) > 0, printed  # the greeting at least, stamped and matched
        assert re.search(process + r", from /proc:\n  CPU [\d.]+ s for 0\.1 call-minutes", side), printed
    assert "bridge, from /metrics" in bridge and "from /metrics" not in floor, printed
    assert "calls ended by outcome: caller_hangup 2" in bridge, printed
    for figure in ("caller -> agent, ms p99", "agent -> caller, ms p99", "CPU-s per call-minute"):
        assert re.search(re.escape(figure) + r"\s+[\d.]+\s+[\d.]+\s+.*[\d.]+x$", comparison, re.MULTILINE), printed
    assert re.search(r"frames lost\s+0\s+0\s*$", comparison, re.MULTILINE), printed
    assert not re.search(r"\bnan\b", printed, re.IGNORECASE), printed


def test_loadtest_floor_and_workers_need_their_own_servers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--floor"]) == 2
    assert "not with --url" in capsys.readouterr().err
