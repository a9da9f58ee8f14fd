"""The test peers' fault modes, each driven by a bare client, so only the peer is under test:
the local agent's refusals, stalls, drops and stopped reading, chosen per session; the
simulated caller's faults are checked when made."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.local_agent import LocalAgentConfig, ScriptStep, in_sessions
from app.devtools.simulated_caller import CallerFault
from tests.conftest import AgentHandle, wait_until
from tests.integration.test_peers_local_agent import Client, session, settings

pytestmark = pytest.mark.timeout(30)
SPEECH = synth.encode(synth.speech_like("one two three four") + synth.silence(0.6), TWILIO_FORMAT)


def test_refusals_and_faults_apply_to_the_sessions_chosen(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="connect", do="refuse", status=429, sessions="2-")]))

    async def attempt() -> int | None:
        try:
            async with connect(agent.url, proxy=None) as ws:
                assert json.loads(await ws.recv())["type"] == "Welcome"
                return None
        except InvalidStatus as exc:
            return exc.response.status_code

    assert [asyncio.run(attempt()) for _ in range(3)] == [None, 429, 429]
    assert agent.agent.refused == [(2, 429), (3, 429)]
    assert [s.number for s in agent.agent.sessions] == [1]
    assert [n for n in range(1, 30) if in_sessions("3/10", n)] == [3, 13, 23]
    assert [n for n in range(1, 6) if in_sessions("2-3", n)] == [2, 3]


def test_a_stalled_session_sends_nothing_but_keeps_reading(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="connect", do="stall")]))

    async def body() -> None:
        async with connect(agent.url, proxy=None) as ws:
            with pytest.raises(TimeoutError):  # no Welcome, ever
                await asyncio.wait_for(ws.recv(), 1.0)
            for _ in range(100):  # it reads: nothing backs up
                await asyncio.wait_for(ws.send(b"\xff" * 160), 1.0)

    asyncio.run(body())
    record = agent.agent.sessions[0]
    assert wait_until(lambda: record.closed)
    assert record.sent == [] and record.settings is None


def test_a_tagged_step_applies_only_to_sessions_whose_settings_carry_the_tag(
    start_agent: Callable[..., AgentHandle],
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="settings", do="stall", tag="faulty")]))
    plain = settings()
    tagged = json.dumps({**json.loads(plain), "tags": ["faulty"]})

    async def ready(msg: str) -> bool:
        async with connect(agent.url, proxy=None) as ws:
            c = Client(ws)
            await c.next("Welcome")
            await c.send(msg)
            try:
                await c.next("SettingsApplied", within=1.0)
                return True
            except TimeoutError:
                return False

    assert asyncio.run(ready(plain)) is True
    assert asyncio.run(ready(tagged)) is False


def test_a_drop_mid_reply_cuts_the_socket_after_some_of_the_reply(start_agent: Callable[..., AgentHandle]) -> None:
    step = ScriptStep(on="utterance", n=1, do="drop_mid_reply", seconds=0.3)
    agent = start_agent(LocalAgentConfig(script=[step], speak_rate=0))

    async def body(c: Client) -> None:
        await c.ready(settings())
        for frame in range(0, len(SPEECH), 160):
            await c.send(SPEECH[frame : frame + 160])
        await c.next("AgentStartedSpeaking")
        with pytest.raises(ConnectionClosedError):  # no close frame: 1006
            await c.next("AgentAudioDone")

    asyncio.run(session(agent.url, body))
    record = agent.agent.sessions[0]
    assert wait_until(lambda: record.closed)
    assert record.dropped_after_bytes is not None
    assert 0.3 * 8000 <= record.dropped_after_bytes < len(SPEECH)  # some of the echo, not all of it
    assert record.speeches[-1].interrupted and record.speeches[-1].done_at is None


def test_a_session_that_stops_reading_backs_the_client_up_then_reads_again(
    start_agent: Callable[..., AgentHandle],
) -> None:
    step = ScriptStep(on="settings_applied", do="stop_reading", seconds=2.0)
    agent = start_agent(LocalAgentConfig(script=[step]))
    frame = b"\xff" * 160
    sent = 0

    async def body() -> float:
        nonlocal sent
        async with connect(agent.url, proxy=None, compression=None) as ws:
            ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
            c = Client(ws)
            await c.ready(settings())
            began = time.monotonic()
            with contextlib.suppress(TimeoutError):
                while time.monotonic() - began < 5.0:
                    sent += len(frame)  # counted first: a send that times out waits on a frame already written
                    await asyncio.wait_for(ws.send(frame), 0.5)
            blocked_after = time.monotonic() - began
            await asyncio.wait_for(ws.send(frame), 5.0)  # it reads again after its 2 s
            sent += len(frame)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "KeepAlive"}))
            return blocked_after

    blocked_after = asyncio.run(body())
    assert blocked_after < 2.0  # the writes backed up while it was not reading
    record = agent.agent.sessions[0]
    assert record.stopped_reading_at is not None
    assert wait_until(lambda: len(record.audio_in) == sent, 5), (len(record.audio_in), sent)  # then all arrived
    assert sent < 1_000_000  # a few hundred KB at most were buffered on the way


def test_script_fault_steps_and_caller_faults_are_checked() -> None:
    with pytest.raises(ValueError, match="'refuse' is for"):
        ScriptStep.from_dict({"on": "settings", "do": "refuse"})
    with pytest.raises(ValueError, match="'refuse' is for"):
        ScriptStep.from_dict({"on": "connect", "do": "refuse", "status": 200})
    with pytest.raises(ValueError, match="'drop_mid_reply' is for"):
        ScriptStep.from_dict({"on": "settings_applied", "do": "drop_mid_reply"})
    for bad in ("0", "-2", "3-1", "x", "2/0", "/3", ""):
        with pytest.raises(ValueError, match="'sessions' must be"):
            ScriptStep.from_dict({"on": "utterance", "do": "close", "sessions": bad})
    with pytest.raises(ValueError, match="'tag'"):
        ScriptStep.from_dict({"on": "connect", "do": "stall", "tag": "x"})
    assert ScriptStep.from_dict({"on": "connect", "do": "refuse", "status": 503, "sessions": "2-"}).status == 503
    with pytest.raises(ValueError, match="caller fault must be one of"):
        CallerFault("explode")
    with pytest.raises(ValueError, match="frames and frame_bytes"):
        CallerFault("flood", frames=0)
