"""The quickstart's offline call through the real CLI: `callbridge simulate-call --wav`."""

from __future__ import annotations

import wave
from collections.abc import Callable
from pathlib import Path

import pytest

from app.cli import main
from app.devtools import synth
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle


def write_wav(path: Path, pcm: bytes, rate: int, channels: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)


@pytest.mark.timeout(60)
def test_simulate_call_with_a_stereo_16k_wav(
    tmp_path: Path,
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bridge = start_bridge(start_agent().url)
    mono = (
        synth.silence(0.3, rate=16000)
        + synth.speech_like("testing one two", rate=16000)
        + synth.silence(0.6, rate=16000)
    )
    stereo = b"".join(mono[i : i + 2] * 2 for i in range(0, len(mono), 2))
    source = tmp_path / "caller.wav"
    write_wav(source, stereo, 16000, 2)
    out = tmp_path / "heard.wav"
    code = main(
        [
            "simulate-call",
            "--url",
            bridge.base_url,
            "--wav",
            str(source),
            "--out",
            str(out),
            "--fast",
            "--tail",
            "1.5",
            "--auth-token",
            TWILIO_TOKEN,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "twilio stream started" in printed and "caller starts speaking" in printed
    assert "agent  audio starts playing" in printed
    with wave.open(str(out), "rb") as heard:
        assert (heard.getnchannels(), heard.getsampwidth(), heard.getframerate()) == (1, 2, 8000)
        assert heard.getnframes() / 8000 > 1.0
    assert bridge.wait_for("call_ended")["caller_frames"] >= int(len(mono) / 2 / 16000 / 0.02)


def test_simulate_call_reports_unreadable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "not.wav"
    bad.write_bytes(b"RIFF....garbage")
    assert main(["simulate-call", "--wav", str(bad)]) == 2
    assert "not a PCM WAV" in capsys.readouterr().err
