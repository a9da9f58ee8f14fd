"""Misbehaving peers (issue 8): every fault of the agent or of Twilio's socket ends in a healed
call (the agent's audio reaches the caller again) or the spoken fallback through Twilio's REST
API, never in silence; memory stays at the send queues' documented bounds and a neighbour call
on the same bridge keeps its latency. Real bridge, real local agent, simulated caller, all on
127.0.0.1; waits that would take seconds in production are shortened through module constants
(the bridge runs in this process)."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import app
import app.bridge
from app.codecs import TWILIO_FORMAT
from app.core.options import TWILIO_QUEUE_AUDIO_BYTES, TWILIO_QUEUE_LIMIT
from app.devtools import synth
from app.devtools.local_agent import LocalAgentConfig, ScriptStep, SessionRecord
from app.devtools.simulated_caller import CallerFault, CallResult, SimulatedCaller
from app.devtools.twilio_api import TwilioApiStandIn
from app.send_queue import SendQueue
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, rest_env, wait_until

pytestmark = pytest.mark.timeout(90)

FALLBACK = {"say": "Sorry, our assistant is resting.", "dial": "+15551230002"}
STUCK_S = 1.5  # PEER_STUCK_SECONDS in these tests (10 s in production)


def profile(greeting: str = "Hi.", **bridge: Any) -> dict[str, Any]:
    base: dict[str, Any] = json.loads((Path(app.__file__).parent / "profiles" / "default.json").read_text())
    base["agent"]["greeting"] = greeting
    base["bridge"].update(fallback=FALLBACK, **bridge)
    return base


def audio(*parts: tuple[str, float | str]) -> bytes:
    """("silence", seconds) or ("speech", words) pieces, as mu-law 8 kHz."""
    pcm = b""
    for kind, value in parts:
        pcm += synth.silence(float(value)) if kind == "silence" else synth.speech_like(str(value))
    return synth.encode(pcm, TWILIO_FORMAT)


def place(bridge: BridgeHandle, sound: bytes, **kwargs: Any) -> CallResult:
    return asyncio.run(SimulatedCaller(bridge.base_url, TWILIO_TOKEN, **kwargs).run(sound))


class CallInThread:
    """A simulated call on its own thread (and loop), for calls that overlap."""

    def __init__(self, bridge: BridgeHandle, sound: bytes, **kwargs: Any) -> None:
        self.result: CallResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(bridge, sound, kwargs), daemon=True)
        self.thread.start()

    def _run(self, bridge: BridgeHandle, sound: bytes, kwargs: dict[str, Any]) -> None:
        try:
            self.result = place(bridge, sound, **kwargs)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float = 60.0) -> CallResult:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the call did not finish in time"
        return self.result


def ended(bridge: BridgeHandle, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
    assert wait_until(lambda: len(bridge.records("call_ended")) >= count, timeout), bridge.records("call_ended")
    return bridge.records("call_ended")


def redirect_s(result: CallResult) -> float:
    """Seconds after the stream started when the REST stand-in redirected the call."""
    return next(e.t for e in result.timeline if "REST update" in e.text)


def assert_fallback_spoken(result: CallResult) -> None:
    """The caller got the fallback TwiML (a <Say> then the <Dial>) through the REST API."""
    assert result.ended_by == "transfer", result.transcript()
    assert result.redirected_to is not None and "<Say>Sorry, our assistant is resting.</Say>" in result.redirected_to


def agent_audio_after(result: CallResult, since: float) -> int:
    """Bytes of agent audio the caller received after ``since`` (time.monotonic())."""
    before = max((n for n, t in result.received_at if t <= since), default=0)
    return len(result.received) - before


class TrackedQueue(SendQueue[Any]):
    """A send queue that remembers its high-water marks, to check memory stays bounded."""

    made: list[TrackedQueue] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peak_items = 0
        self.peak_audio = 0
        TrackedQueue.made.append(self)

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        self.peak_items = max(self.peak_items, self.qsize())
        self.peak_audio = max(self.peak_audio, self.queued_audio)


@pytest.fixture
def tracked_queues(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[TrackedQueue]]:
    """Every send queue the bridge makes from now on (both the Twilio and the agent queues)."""
    made: list[TrackedQueue] = []
    monkeypatch.setattr(TrackedQueue, "made", made)
    monkeypatch.setattr(app.bridge, "SendQueue", TrackedQueue)
    yield made


@pytest.fixture
def short_stuck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.bridge, "PEER_STUCK_SECONDS", STUCK_S)


# --- the agent cannot take the call ------------------------------------------------------


def test_429_at_call_start_gets_the_fallback_within_seconds(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="connect", do="refuse", status=429)]))
    bridge = start_bridge(agent.url, profile(), **rest_env(twilio_api))
    result = place(bridge, audio(("silence", 1.0)), tail=8.0, max_tail=8.0, twilio_api=twilio_api)

    assert_fallback_spoken(result)
    assert redirect_s(result) < 3.0
    assert agent.agent.refused == [(1, 429)] and agent.agent.sessions == []
    (record,) = ended(bridge)
    assert record["outcome"] == "fallback" and record["fallback_reason"] == "agent_refused"
    assert "429" in bridge.wait_for("agent_connect_failed")["reason"]


def test_an_agent_that_never_sends_welcome_gets_the_fallback_after_the_ready_timeout(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="connect", do="stall")]))
    bridge = start_bridge(agent.url, profile(agent_ready_timeout_seconds=1.5), **rest_env(twilio_api))
    result = place(bridge, audio(("silence", 1.0)), tail=8.0, max_tail=8.0, twilio_api=twilio_api)

    assert_fallback_spoken(result)
    assert 1.5 <= redirect_s(result) < 1.5 + 2.0  # the timeout, then within a tick or two
    session = agent.agent.sessions[0]
    assert session.sent == [] and session.settings is None  # no Welcome, so no Settings either
    assert wait_until(lambda: session.closed)  # the bridge let go of the silent session
    (record,) = ended(bridge)
    assert record["outcome"] == "fallback" and record["fallback_reason"] == "agent_not_ready"


def test_a_slow_settings_applied_within_the_timeout_loses_no_caller_audio(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="settings", do="delay", seconds=2.0)]))
    bridge = start_bridge(agent.url, profile(agent_ready_timeout_seconds=4))
    sound = audio(("speech", "words before the agent is ready"), ("silence", 2.5))
    result = place(bridge, sound, tail=1.0)

    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert session.settings_applied_at is not None
    assert session.settings_applied_at - session.opened_at >= 2.0
    assert bytes(session.audio_in) == bytes(result.sent)  # the early words too, byte for byte
    assert session.utterances == 1  # ... and heard as the utterance they were
    assert len(result.received) == len(session.audio_out) > 0  # greeting and echo reached the caller
    (record,) = ended(bridge)
    assert record["outcome"] == "caller_hangup" and record["caller_bytes_dropped"] == 0


def test_a_settings_applied_beyond_the_timeout_gets_the_fallback(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="settings", do="delay", seconds=5.0)]))
    bridge = start_bridge(agent.url, profile(agent_ready_timeout_seconds=1.5), **rest_env(twilio_api))
    result = place(bridge, audio(("silence", 1.0)), tail=8.0, max_tail=8.0, twilio_api=twilio_api)

    assert_fallback_spoken(result)
    assert redirect_s(result) < 1.5 + 2.0
    assert agent.agent.sessions[0].settings is not None  # Settings went out; SettingsApplied was late
    (record,) = ended(bridge)
    assert record["outcome"] == "fallback" and record["fallback_reason"] == "agent_not_ready"
