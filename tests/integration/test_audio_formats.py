"""Whole calls with the agent on each audio format a profile may ask for: the caller's speech
reaches the agent (at the agent's rate, at the caller's level) and the agent's replies reach
the caller (as mu-law 8 kHz, at the level the agent spoke them). Plus: any other format stops
the bridge at start-up with an error naming the field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import app
from app.codecs import TWILIO_FORMAT, AudioFormat, Transcoder
from app.config import ConfigError, load_profile
from app.devtools import synth
from app.devtools.bench_audio import Samples, db, decode
from app.devtools.simulated_caller import SimulatedCaller
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, wait_until

pytestmark = pytest.mark.timeout(60)

GREETING = "Hello! Thanks for calling. How can I help you today?"
LEVEL_DB = 1.0  # how far the level heard may be from the level spoken
HELD_S = 0.15  # the most audio a resampler holds back (app/codecs.py: 118 ms), with margin

FORMAT_PAIRS = [  # (agent input, agent output): every input and every output format at least once
    (AudioFormat("mulaw", 8000), AudioFormat("alaw", 8000)),
    (AudioFormat("linear16", 8000), AudioFormat("linear16", 8000)),
    (AudioFormat("linear16", 16000), AudioFormat("linear16", 16000)),
    (AudioFormat("linear16", 24000), AudioFormat("linear16", 24000)),
    (AudioFormat("linear16", 48000), AudioFormat("linear16", 48000)),
]


def profile_with(agent_input: AudioFormat, agent_output: AudioFormat) -> dict[str, Any]:
    profile: dict[str, Any] = json.loads((Path(app.__file__).parent / "profiles" / "default.json").read_text())
    profile["bridge"]["agent_audio"] = {
        "input": {"encoding": agent_input.encoding, "sample_rate": agent_input.sample_rate},
        "output": {"encoding": agent_output.encoding, "sample_rate": agent_output.sample_rate},
    }
    return profile


def energy_per_second(samples: Samples, rate: int) -> float:
    return float(np.sum(samples * samples)) / rate


@pytest.mark.parametrize(
    ("agent_input", "agent_output"),
    FORMAT_PAIRS,
    ids=[f"in-{i.encoding}{i.sample_rate}-out-{o.encoding}{o.sample_rate}" for i, o in FORMAT_PAIRS],
)
def test_call_with_agent_format(
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    agent_input: AudioFormat,
    agent_output: AudioFormat,
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url, profile=profile_with(agent_input, agent_output))
    pcm = synth.silence(3.6) + synth.speech_like("one two three four") + synth.silence(0.6)
    audio = synth.encode(pcm, TWILIO_FORMAT)
    result = asyncio.run(SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=1.5).run(audio))

    assert result.violations == []
    assert result.ended_by == "caller"
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    settings = session.settings
    assert settings is not None
    assert settings["audio"]["input"] == {"encoding": agent_input.encoding, "sample_rate": agent_input.sample_rate}
    assert settings["audio"]["output"]["encoding"] == agent_output.encoding
    assert settings["audio"]["output"]["sample_rate"] == agent_output.sample_rate

    # caller -> agent: all of it at the agent's rate (less what the resampler still holds), the
    # speech found as one utterance, at the caller's level
    sent = decode(bytes(result.sent), TWILIO_FORMAT)
    got = decode(bytes(session.audio_in), agent_input)
    seconds_sent = sent.size / TWILIO_FORMAT.sample_rate
    seconds_got = got.size / agent_input.sample_rate
    assert seconds_sent - HELD_S <= seconds_got <= seconds_sent
    assert session.utterances == 1
    level = db(
        np.sqrt(energy_per_second(got, agent_input.sample_rate) / energy_per_second(sent, TWILIO_FORMAT.sample_rate))
    )
    assert abs(level) <= LEVEL_DB

    # agent -> caller: the greeting, as the agent spoke it in its format, is what the caller
    # received first, converted to mu-law; then the echo of the utterance
    greeting = synth.encode(synth.speech_like(GREETING), agent_output)
    assert bytes(session.audio_out).startswith(greeting)
    to_caller = Transcoder(agent_output, TWILIO_FORMAT)
    expected = to_caller.convert(greeting) + to_caller.flush()
    unheld = len(expected) - int(HELD_S * TWILIO_FORMAT.sample_rate)
    received = bytes(result.received)
    assert received[:unheld] == expected[:unheld]
    assert len(received) > len(expected)  # the echo came too
    assert result.marks_played[:2] == ["agent-audio-1", "agent-audio-2"]
    spoken = decode(bytes(session.audio_out), agent_output)
    heard = decode(received, TWILIO_FORMAT)
    level = db(
        np.sqrt(
            energy_per_second(heard, TWILIO_FORMAT.sample_rate) / energy_per_second(spoken, agent_output.sample_rate)
        )
    )
    assert abs(level) <= LEVEL_DB
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "caller_hangup"
    assert ended["caller_bytes_dropped"] == 0 and ended["agent_bytes_dropped"] == 0


@pytest.mark.parametrize(
    ("side", "spec", "said"),
    [
        ("input", {"encoding": "alaw"}, "bridge.agent_audio.input.encoding must be one of mulaw, linear16"),
        ("output", {"encoding": "mp3"}, "bridge.agent_audio.output.encoding must be one of mulaw, alaw, linear16"),
        (
            "output",
            {"encoding": "linear16", "sample_rate": 44100},
            "bridge.agent_audio.output.sample_rate must be one of 8000, 16000, 24000, 48000 for linear16 (found 44100)",
        ),
        (
            "input",
            {"encoding": "linear16", "sample_rate": 22050},
            "bridge.agent_audio.input.sample_rate must be one of 8000, 16000, 24000, 48000 for linear16",
        ),
        ("output", {"encoding": "alaw", "sample_rate": 16000}, "bridge.agent_audio.output.sample_rate must be 8000"),
        ("input", {"encoding": "mulaw", "sample_rate": 48000}, "bridge.agent_audio.input.sample_rate must be 8000"),
    ],
)
def test_other_formats_are_a_start_up_error_naming_the_field(
    tmp_path: Path, side: str, spec: dict[str, Any], said: str
) -> None:
    profile = {"agent": "id", "bridge": {"agent_audio": {side: spec}}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(ConfigError) as raised:
        load_profile(path)
    assert said in str(raised.value)


@pytest.mark.parametrize(("agent_input", "agent_output"), FORMAT_PAIRS)
def test_offered_formats_load(tmp_path: Path, agent_input: AudioFormat, agent_output: AudioFormat) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_with(agent_input, agent_output)))
    audio = load_profile(path).bridge.agent_audio
    assert (audio.input.to_format(), audio.output.to_format()) == (agent_input, agent_output)
