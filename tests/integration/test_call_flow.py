"""Whole calls on 127.0.0.1: real uvicorn bridge, real local agent, simulated Twilio caller."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import app
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.local_agent import LocalAgentConfig, ScriptStep
from app.devtools.simulated_caller import CallResult, SimulatedCaller, parse_twiml
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, wait_until

pytestmark = pytest.mark.timeout(60)

GREETING = "Hello! Thanks for calling. How can I help you today?"
SILENCE_BYTE = 0xFF


def caller_audio(*parts: tuple[str, float]) -> bytes:
    """("silence", seconds) or ("speech", words...) pieces, as mu-law 8 kHz."""
    pcm = b""
    for kind, value in parts:
        pcm += synth.silence(float(value)) if kind == "silence" else synth.speech_like(str(value))
    return synth.encode(pcm, TWILIO_FORMAT)


def place_call(bridge: BridgeHandle, audio: bytes, **kwargs: Any) -> CallResult:
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN, **kwargs)
    return asyncio.run(caller.run(audio))


@pytest.fixture
def agent(start_agent: Callable[..., AgentHandle]) -> AgentHandle:
    return start_agent()


@pytest.fixture
def bridge(start_bridge: Callable[..., BridgeHandle], agent: AgentHandle) -> BridgeHandle:
    return start_bridge(agent.url)


def greeting_audio() -> bytes:
    return synth.encode(synth.speech_like(GREETING), TWILIO_FORMAT)


# both with MediaSocket's shortcut (as ``callbridge serve`` runs) and through plain ASGI
BOTH_PATHS = pytest.mark.parametrize("plain_asgi", [False, True], ids=["media_socket", "plain_asgi"])


@BOTH_PATHS
def test_offline_call_relays_audio_byte_exact_both_ways(
    agent: AgentHandle, start_bridge: Callable[..., BridgeHandle], plain_asgi: bool
) -> None:
    bridge = start_bridge(agent.url, plain_asgi=plain_asgi)
    audio = caller_audio(("silence", 3.6), ("speech", "one two three four"), ("silence", 0.6))
    result = place_call(bridge, audio, tail=0.5)

    assert result.violations == []
    assert result.ended_by == "caller"
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)  # the agent has consumed everything it was sent
    # caller -> agent: every byte, in order, nothing lost or added
    assert bytes(session.audio_in) == bytes(result.sent)
    # agent -> caller: every byte the agent spoke arrived, as Twilio media
    assert bytes(result.received) == bytes(session.audio_out)
    # the greeting came first and was heard in full, then the echo of the utterance
    assert bytes(result.received).startswith(greeting_audio())
    assert session.utterances == 1
    assert len(result.received) > len(greeting_audio())
    # played in full: on a loaded machine a late chunk leaves a gap (an underrun, as Twilio's
    # player would), so the check is on what played rather than on the 20 ms timeline
    assert bytes(result.played).startswith(greeting_audio())
    # each AgentAudioDone became a mark that came back once the audio had played
    assert result.marks_played == ["agent-audio-1", "agent-audio-2"]
    # UserStartedSpeaking always sends clear; here nothing was playing, so nothing was lost
    assert result.bytes_dropped_by_clear == 0 and result.marks_cleared == []
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "caller_hangup"
    assert ended["turns"] == 2
    assert ended["caller_bytes_dropped"] == 0 and ended["agent_bytes_dropped"] == 0


@BOTH_PATHS
def test_barge_in_clears_twilio_and_caller_hears_agent_stop(
    agent: AgentHandle, start_bridge: Callable[..., BridgeHandle], plain_asgi: bool
) -> None:
    bridge = start_bridge(agent.url, plain_asgi=plain_asgi)
    # the caller talks over the greeting one second in
    audio = caller_audio(("silence", 1.0), ("speech", "wait wait"), ("silence", 0.6))
    result = place_call(bridge, audio, tail=0.3)

    assert result.violations == []
    assert len(result.clears) >= 1
    assert result.bytes_dropped_by_clear > 0  # Twilio's buffer still held greeting audio
    assert "agent-audio-1" in result.marks_cleared  # the greeting's mark: never played
    assert "agent-audio-1" not in result.marks_played
    heard = bytes(result.heard)
    cut = int(result.clears[0] / 0.02)
    after = heard[(cut + 3) * 160 : (cut + 15) * 160]
    assert after and set(after) == {SILENCE_BYTE}, "agent audio kept playing after the clear"
    assert greeting_audio() not in heard  # the greeting was cut short
    ended = bridge.wait_for("call_ended")
    assert ended["clear_latency_ms_max"] < 50
    assert ended["barge_ins"] >= 1
    # what the caller heard of the greeting, as the bridge estimates it, against what the
    # simulated caller really played (frames of non-silence from the greeting's start to the clear)
    first = next(i for i in range(0, len(heard), 160) if set(heard[i : i + 160]) != {SILENCE_BYTE}) // 160
    played_ms = (cut - first) * 20
    cut_in = bridge.records("barge_in")[0]
    assert abs(cut_in["heard_ms"] - played_ms) < 200, (cut_in, played_ms)
    assert cut_in["full_ms"] == len(greeting_audio()) // 8
    assert cut_in["heard"] == f"heard {cut_in['heard_ms']} ms of {cut_in['full_ms']} ms"
    assert ended["agent_audio"]["interrupted"] >= 1


def test_caller_audio_before_settings_applied_arrives_intact(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="settings", do="delay", seconds=1.0)]))
    bridge = start_bridge(agent.url)
    audio = caller_audio(("speech", "early words here"), ("silence", 0.5))
    result = place_call(bridge, audio, fast=True, tail=2.0)

    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert bytes(session.audio_in) == bytes(result.sent)
    ready = bridge.wait_for("agent_ready")
    assert ready["buffered_caller_bytes"] >= len(audio)


def test_long_prebuffer_flush_fits_the_agent_queue(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    """A profile may keep 60 s of caller audio while the agent gets ready; its flush (here
    40 s, more than the 30 s the agent queue used to hold) must reach the agent, not end the
    call as a stuck peer."""
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="settings", do="delay", seconds=2.0)]))
    profile = json.loads((Path(app.__file__).parent / "profiles" / "default.json").read_text())
    profile["bridge"].update(max_prebuffer_seconds=60, agent_ready_timeout_seconds=60)
    bridge = start_bridge(agent.url, profile=profile)
    audio = caller_audio(("silence", 40.0))
    result = place_call(bridge, audio, fast=True, tail=4.0)  # hangs up after the agent is ready

    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert bridge.wait_for("agent_ready")["buffered_caller_bytes"] >= len(audio)
    assert bytes(session.audio_in) == bytes(result.sent)
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "caller_hangup" and ended["overflows"] == {} and ended["caller_bytes_dropped"] == 0


def test_bad_webhook_signature_is_rejected(bridge: BridgeHandle, agent: AgentHandle) -> None:
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    status, _ = caller.post_webhook(signature="bm90IGEgc2lnbmF0dXJl")
    assert status == 403
    status, _ = caller.post_webhook(signature="")
    assert status == 403
    # a valid signature over different parameters is still wrong
    params = caller.webhook_params()
    signature = caller.validator.compute_signature(f"{bridge.base_url}/twilio/voice", params)
    status, _ = caller.post_webhook({**params, "From": "+19995550000"}, signature=signature)
    assert status == 403
    assert agent.agent.sessions == []


async def _stream_with(url: str, caller: SimulatedCaller, params: dict[str, str], **kw: Any) -> int | None:
    """Open a media stream, send connected+start, return the close code the bridge used."""
    async with await caller.open_stream(url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(caller.start_message(params))
        payload = base64.b64encode(b"\xff" * 160).decode()
        try:
            for _ in range(10):
                await ws.send(
                    json.dumps({"event": "media", "streamSid": caller.stream_sid, "media": {"payload": payload}})
                )
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed:
            pass
        await drain_until_closed(ws)
        return ws.close_code


@pytest.mark.parametrize("tamper", ["missing", "garbage", "other_call", "reused"])
def test_bad_stream_token_closes_without_agent_session(tamper: str, agent: AgentHandle, bridge: BridgeHandle) -> None:
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    status, twiml = caller.post_webhook()
    assert status == 200
    url, params = parse_twiml(twiml)
    if tamper == "missing":
        params.pop("stream_token")
    elif tamper == "garbage":
        params["stream_token"] = "123.abc.def"
    elif tamper == "other_call":
        other = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
        params["stream_token"] = parse_twiml(other.post_webhook()[1])[1]["stream_token"]
    elif tamper == "reused":
        result = place_call_with(caller, url, params)
        assert result == 1000
        assert len(agent.agent.sessions) == 1
    before = len(agent.agent.sessions)
    code = asyncio.run(_stream_with(url, caller, params))
    assert code == 1008
    time.sleep(0.2)
    assert len(agent.agent.sessions) == before


async def drain_until_closed(ws: Any, limit_s: float = 5.0) -> None:
    """Read (and discard) until the bridge closes; an unread socket would never see the close."""

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    await asyncio.wait_for(drain(), limit_s)


def place_call_with(caller: SimulatedCaller, url: str, params: dict[str, str]) -> int | None:
    async def run() -> int | None:
        async with await caller.open_stream(url) as ws:
            await ws.send(caller.start_message(params))
            await asyncio.sleep(0.3)
            await ws.send(json.dumps({"event": "stop", "streamSid": caller.stream_sid, "stop": {}}))
            await drain_until_closed(ws)
            return ws.close_code

    return asyncio.run(run())


def test_bad_upgrade_signature_is_refused(agent: AgentHandle, bridge: BridgeHandle) -> None:
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    url, _ = parse_twiml(caller.post_webhook()[1])

    async def run() -> None:
        async with connect(url, additional_headers={"X-Twilio-Signature": "Zm9yZ2Vk"}, proxy=None):
            pass

    with pytest.raises(InvalidStatus) as info:
        asyncio.run(run())
    assert info.value.response.status_code == 403
    assert agent.agent.sessions == []


@pytest.mark.parametrize("how", ["close", "error"])
def test_an_agent_lost_mid_call_is_reconnected_with_the_conversation_kept(
    how: str, start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="utterance", n=1, do=how)]))
    bridge = start_bridge(agent.url)
    audio = caller_audio(("speech", "hello"), ("silence", 3.0))  # silence goes on through the gap
    result = place_call(bridge, audio, tail=1.0)

    assert result.ended_by == "caller"  # the call survived its agent session
    assert wait_until(lambda: len(agent.agent.sessions) == 2 and agent.agent.sessions[1].closed)
    first, second = agent.agent.sessions
    assert second.settings is not None and "greeting" not in second.settings["agent"]
    history = second.settings["agent"]["context"]["messages"]
    assert [m["role"] for m in history] == ["user"]  # the caller's turn before the loss (the greeting was cut)
    assert history[0]["content"].startswith("[utterance 1")
    assert all(m["type"] == "History" and m["role"] in ("user", "assistant") for m in history)
    heard_by_agent = len(first.audio_in) + len(second.audio_in)
    assert len(second.audio_in) > 8000  # the caller's audio since the loss reached the new session
    assert heard_by_agent >= len(result.sent) - 8000  # at most what was in flight at the loss (< 1 s)
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "caller_hangup" and ended["reconnects"] == 1
    assert ended["reconnect_waits_s"][0] < 2.0


def test_caller_hangup_closes_agent_session_within_a_second(agent: AgentHandle, bridge: BridgeHandle) -> None:
    result = place_call(bridge, caller_audio(("silence", 0.5)), tail=0.2, max_tail=0.5)
    hung_up = time.monotonic()
    assert result.ended_by == "caller"
    session = agent.agent.sessions[0]
    deadline = hung_up + 1.0
    while not session.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.closed, "agent session still open a second after the caller hung up"
    assert session.close_code == 1000
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "caller_hangup"


def test_agent_warning_unknown_message_and_function_call_keep_call_up(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    script = [
        ScriptStep(on="settings_applied", do="warning", code="THINK_REQUEST_FAILED"),
        ScriptStep(on="settings_applied", do="unknown"),
        ScriptStep(on="utterance", n=1, do="function_call", name="get_weather", arguments='{"city":"Paris"}'),
    ]
    agent = start_agent(LocalAgentConfig(script=script))
    bridge = start_bridge(agent.url)
    audio = caller_audio(("silence", 0.2), ("speech", "weather please"), ("silence", 0.6))
    result = place_call(bridge, audio, fast=True, tail=1.0)
    assert result.ended_by == "caller"
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    responses = [m for m in session.messages if m["type"] == "FunctionCallResponse"]
    assert len(responses) == 1
    assert responses[0]["name"] == "get_weather"
    assert responses[0]["content"].startswith("There is no function called get_weather")  # answered, in words
    assert bridge.records("agent_warning")[0]["code"] == "THINK_REQUEST_FAILED"
    assert bridge.records("agent_message_unknown_ignored")[0]["type"] == "SomethingNewFromTheFuture"
    assert bridge.wait_for("call_ended")["outcome"] == "caller_hangup"


def test_untrusted_twilio_frames_are_rejected_and_call_goes_on(agent: AgentHandle, bridge: BridgeHandle) -> None:
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    url, params = parse_twiml(caller.post_webhook()[1])
    good = b"\x01\x02\x03" * 50

    async def run() -> None:
        async with await caller.open_stream(url) as ws:
            await ws.send(caller.start_message(params))
            for bad in [
                "{not json",
                "[]",
                json.dumps({"event": "teleport"}),
                json.dumps({"event": "media", "streamSid": caller.stream_sid, "media": {"payload": "***"}}),
                json.dumps({"event": "media", "streamSid": "MZother", "media": {"payload": "AAAA"}}),
                json.dumps({"event": "mark", "streamSid": caller.stream_sid, "mark": {"name": "never-sent"}}),
            ]:
                await ws.send(bad)
            await ws.send(b"\x00binary")
            media = {
                "event": "media",
                "streamSid": caller.stream_sid,
                "media": {"payload": base64.b64encode(good).decode()},
            }
            await ws.send(json.dumps(media))
            await asyncio.sleep(0.5)
            await ws.send(json.dumps({"event": "stop", "streamSid": caller.stream_sid, "stop": {}}))
            await drain_until_closed(ws)

    asyncio.run(run())
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert bytes(session.audio_in) == good
    kinds = {r["kind"] for r in bridge.records("twilio_frame_rejected")}
    assert {"bad_json", "not_object", "unknown_event", "bad_base64", "binary_frame"} <= kinds
    assert bridge.records("twilio_wrong_stream_sid")
    assert bridge.records("twilio_unknown_mark")
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "caller_hangup"
    assert ended["invalid_inputs"]["wrong_stream_sid"] == 1


def test_keepalive_sent_when_caller_audio_stops(
    agent: AgentHandle, start_bridge: Callable[..., BridgeHandle], tmp_path: Any
) -> None:
    profile = json.loads((__import__("app.config").config.DEFAULT_PROFILE).read_text())
    profile["bridge"]["keepalive_after_seconds"] = 0.5
    bridge = start_bridge(agent.url, profile=profile)
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    url, params = parse_twiml(caller.post_webhook()[1])

    async def run() -> None:
        async with await caller.open_stream(url) as ws:
            await ws.send(caller.start_message(params))
            await asyncio.sleep(2.6)
            await ws.send(json.dumps({"event": "stop", "streamSid": caller.stream_sid, "stop": {}}))
            await drain_until_closed(ws)

    asyncio.run(run())
    assert wait_until(lambda: agent.agent.sessions[0].keepalives >= 2)


def test_call_logs_carry_ids_and_never_secrets(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    key = "dg-secret-key-1234567890abcdef"
    agent = start_agent(LocalAgentConfig(require_key=key))
    bridge = start_bridge(agent.url, deepgram_api_key=key, log_transcripts=False)
    result = place_call(bridge, caller_audio(("speech", "my card number"), ("silence", 0.6)), fast=True, tail=1.0)
    assert result.ended_by == "caller"
    assert agent.agent.sessions[0].headers["authorization-present"] == "True"
    text = bridge.log_buffer.getvalue()
    for secret in (key, TWILIO_TOKEN, "test-stream-token-secret"):
        assert secret not in text
    call_lines = [r for r in bridge.log_records() if r.get("event") in ("agent_ready", "call_ended")]
    assert call_lines
    for record in call_lines:
        assert record["call_sid"] == result.call_sid
        assert record["stream_sid"].startswith("MZ")
        assert record["request_id"] == agent.agent.sessions[0].request_id
        assert "content" not in record  # transcripts are PII: off by default


def test_bad_agent_key_ends_call_with_clear_reason(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent(LocalAgentConfig(require_key="the-right-key-123456"))
    bridge = start_bridge(agent.url, deepgram_api_key="the-wrong-key-123456")
    result = place_call(bridge, caller_audio(("silence", 0.3)), fast=True, tail=5)
    assert result.ended_by == "bridge"
    failed = bridge.wait_for("agent_connect_failed")
    assert "401" in failed["reason"]


def test_calls_leave_no_tasks_behind(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="utterance", n=1, do="error")]))
    bridge = start_bridge(agent.url)
    baseline = bridge.task_count()
    # a normal hang-up, an agent error mid-call, and a refused stream
    place_call(bridge, caller_audio(("silence", 0.3)), fast=True, tail=0.3)
    place_call(bridge, caller_audio(("speech", "hello"), ("silence", 0.6)), fast=True, tail=5)
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    url, params = parse_twiml(caller.post_webhook()[1])
    params["stream_token"] = "1.2.3"
    assert asyncio.run(_stream_with(url, caller, params)) == 1008
    assert wait_until(lambda: bridge.task_count() <= baseline), f"{bridge.task_count()} tasks, baseline {baseline}"
    assert len(bridge.records("call_ended")) == 2


def test_oversize_twilio_frame_closes_the_stream_and_the_agent_session(
    agent: AgentHandle, bridge: BridgeHandle
) -> None:
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    url, params = parse_twiml(caller.post_webhook()[1])

    async def run() -> int | None:
        async with await caller.open_stream(url) as ws:
            await ws.send(caller.start_message(params))
            await asyncio.sleep(0.2)
            await ws.send("x" * 100_000)
            await drain_until_closed(ws)
            return ws.close_code

    assert asyncio.run(run()) == 1009  # message too big
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert bridge.wait_for("call_ended")["outcome"] == "oversize_frame"  # not the caller hanging up
