"""Availability (issue 16), over real sockets on loopback: token-less sockets, held or churned,
never keep a real call out; a stream that goes quiet without closing is completed through
the REST API; Twilio's "that call is over" answers end calls as the caller hanging up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State

from app.bridge import REST_IN_FLIGHT
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.local_agent import LocalAgentConfig, ScriptStep
from app.devtools.simulated_caller import CallerFault, CallResult, SimulatedCaller
from app.devtools.twilio_api import TwilioApiStandIn
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, get, metric_value, rest_env, wait_until
from tests.integration.test_call_control import profile

pytestmark = pytest.mark.timeout(120)


def caller_audio(*parts: tuple[str, float | str]) -> bytes:
    pcm = b""
    for kind, value in parts:
        pcm += synth.silence(float(value)) if kind == "silence" else synth.speech_like(str(value))
    return synth.encode(pcm, TWILIO_FORMAT)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Attacker:
    """Token-less media sockets from the internet, on their own loop in a thread as a separate
    client would be: ``held`` kept open (and reopened when the bridge closes them), sockets
    opened as fast as one client can and left open (the bridge must push them out), and
    sockets opened and dropped at once, until stopped."""

    def __init__(self, url: str, held: int, drop: bool = True, flood: bool = True) -> None:
        self.url = url
        self.held = held
        self.drop = drop
        self.flood_on = flood
        self.opened = 0
        self.refused = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.main()), daemon=True)

    async def main(self) -> None:
        await asyncio.gather(
            *(self.hold() for _ in range(self.held)),
            *([self.flood()] if self.flood_on else []),
            *([self.churn()] if self.drop else []),
        )

    async def one(self) -> ClientConnection | None:
        try:
            ws = await connect(self.url, open_timeout=5, max_size=None, compression=None)
        except Exception:  # refused or reset under load: try again
            self.refused += 1
            await asyncio.sleep(0.05)
            return None
        self.opened += 1
        return ws

    async def hold(self) -> None:
        while not self.stop.is_set():
            ws = await self.one()
            if ws is None:
                continue
            with contextlib.suppress(Exception):  # wait until the bridge closes it, or we stop
                while not self.stop.is_set():
                    try:
                        await asyncio.wait_for(ws.recv(), 0.2)
                    except TimeoutError:
                        continue
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)

    async def flood(self) -> None:
        """Open, never close: only the bridge's eviction (or start deadline) frees them."""
        open_ones: list[ClientConnection] = []
        while not self.stop.is_set():
            ws = await self.one()
            if ws is not None:
                open_ones.append(ws)
            if len(open_ones) > 256:  # forget those the bridge closed (websockets closes our side)
                open_ones = [w for w in open_ones if w.state is not State.CLOSED]
        for ws in open_ones:
            ws.transport.abort()

    async def churn(self) -> None:
        while not self.stop.is_set():
            ws = await self.one()
            if ws is not None:
                ws.transport.abort()  # opened and dropped at once, no close handshake


def test_token_less_sockets_held_and_churned_never_keep_real_calls_out(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent()
    # 200 sockets held (reopened as soon as the bridge pushes one out) against a pool of 64, and
    # a loop opening and dropping more; the round trip is loopback's here (the next test has 100 ms)
    bridge = start_bridge(agent.url, max_calls=4, max_tokenless_streams=64, stream_start_timeout_seconds=3)
    time.sleep(0.2)
    baseline_fds, baseline_tasks = open_fds(), bridge.task_count()
    attacker = Attacker(bridge.base_url.replace("http://", "ws://") + "/twilio/media", held=200, flood=False)
    attacker.thread.start()
    try:
        assert wait_until(lambda: attacker.opened >= 300, timeout=30), attacker.opened
        audio = caller_audio(("silence", 0.5), ("speech", "one two three"), ("silence", 0.5))

        async def four_calls() -> list[CallResult | BaseException]:
            callers = [SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=1.0) for _ in range(4)]
            return await asyncio.gather(*(c.run(audio) for c in callers), return_exceptions=True)

        results: list[CallResult] = []
        state = bridge.server.config.app.state.bridge  # type: ignore[attr-defined]
        for _ in range(2):  # two rounds of MAX_CALLS real calls, all while the flood goes on
            for result in asyncio.run(four_calls()):
                assert isinstance(result, CallResult), result
                assert result.violations == [] and result.ended_by == "caller", result.transcript()
                results.append(result)
            # the callers are gone; the bridge frees their places once each call's teardown is
            # over (the agent's drain): the next round is placed then, not into a full instance
            assert wait_until(lambda: not state.calls, timeout=5), len(state.calls)
        opened_during_calls = attacker.opened
    finally:
        attacker.stop.set()
        attacker.thread.join(15)
    assert opened_during_calls > 400  # the flood really ran while the calls were placed
    # every real call: admitted (not the fallback), relayed byte-exact both ways
    sessions = agent.agent.sessions
    assert len(sessions) == 8
    assert wait_until(lambda: all(s.closed for s in sessions), timeout=5)
    ended = bridge.records("call_ended")
    assert len(ended) == 8 and {r["outcome"] for r in ended} == {"caller_hangup"}
    assert not bridge.records("call_not_admitted")
    # byte-exact both ways: each call's bytes are one session's (the calls are alike, so as sets)
    assert sorted(bytes(r.sent) for r in results) == sorted(bytes(s.audio_in) for s in sessions)
    assert sorted(bytes(r.received) for r in results) == sorted(bytes(s.audio_out) for s in sessions)
    assert all(len(r.sent) > 8000 and len(r.received) > 8000 for r in results)
    # the token-less sockets were evicted or timed out, counted, and logged within bounds
    _, metrics = get(bridge.base_url + "/metrics")
    evicted = metric_value(metrics, "callbridge_streams_rejected_total", 'reason="evicted"')
    assert evicted > 100
    assert len(bridge.records("stream_rejected")) < evicted / 5
    # and nothing is left behind: sockets, tasks
    assert wait_until(lambda: open_fds() <= baseline_fds, timeout=10), (open_fds(), baseline_fds)
    assert wait_until(lambda: bridge.task_count() <= baseline_tasks, timeout=10)
    status, body = get(bridge.base_url + "/readyz")
    assert status == 200 and '"active_calls":0' in body.replace(" ", "")


def test_a_real_stream_a_round_trip_away_survives_a_churning_flood_with_the_default_pool(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    """Twilio's ``start`` comes a network round trip after the 101: 100 ms here, while
    token-less sockets are opened as fast as a client can and left open, with the default pool
    (a pool smaller than the flood's upgrades in 100 ms loses the real stream: checked by hand
    with 16)."""
    agent = start_agent()
    bridge = start_bridge(agent.url, max_calls=2)
    assert bridge.config.settings.max_tokenless_streams == 512
    attacker = Attacker(bridge.base_url.replace("http://", "ws://") + "/twilio/media", held=0, drop=False)
    attacker.thread.start()
    try:
        assert wait_until(lambda: attacker.opened >= 100, timeout=20)
        began, opened_before = time.monotonic(), attacker.opened
        audio = caller_audio(("silence", 0.3), ("speech", "one two"), ("silence", 0.3))

        async def two_calls() -> list[CallResult]:
            callers = [SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=1.0, start_delay=0.1) for _ in range(2)]
            return list(await asyncio.gather(*(c.run(audio) for c in callers)))

        results = asyncio.run(two_calls())
        rate = (attacker.opened - opened_before) / (time.monotonic() - began)
    finally:
        attacker.stop.set()
        attacker.thread.join(15)
    assert rate > 100, rate  # the flood really ran
    print(f"churn: {rate:.0f} upgrades/s; a pool of 512 needs {512 / 0.1:.0f}/s to reach a 100 ms stream")
    assert [r.ended_by for r in results] == ["caller", "caller"]
    sessions = agent.agent.sessions
    assert wait_until(lambda: len(sessions) == 2 and all(s.closed for s in sessions), timeout=5)
    assert sorted(bytes(r.sent) for r in results) == sorted(bytes(s.audio_in) for s in sessions)


def test_real_calls_are_byte_exact_beside_a_full_token_less_pool(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url, max_calls=1, max_tokenless_streams=8, stream_start_timeout_seconds=30)
    url = bridge.base_url.replace("http://", "ws://") + "/twilio/media"

    async def scenario() -> CallResult:
        idle = [await connect(url, compression=None) for _ in range(8)]  # the pool is full, for 30 s
        try:
            audio = caller_audio(("silence", 0.3), ("speech", "hello there"), ("silence", 0.5))
            return await SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=1.0).run(audio)
        finally:
            for ws in idle:
                ws.transport.abort()

    result = asyncio.run(scenario())
    assert result.ended_by == "caller" and result.violations == []
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert bytes(session.audio_in) == bytes(result.sent)  # every byte the caller sent, in order
    assert bytes(result.received) == bytes(session.audio_out)
    (evicted,) = [r for r in bridge.records("stream_rejected") if r["reason"] == "evicted"][:1]
    assert "newer sockets" in evicted["detail"]


def test_a_stream_that_goes_quiet_without_closing_is_completed_through_rest(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    agent = start_agent()
    quiet_profile = profile({"media_timeout_seconds": 2})
    bridge = start_bridge(agent.url, quiet_profile, **rest_env(twilio_api))
    audio = caller_audio(("silence", 0.3), ("speech", "hello"), ("silence", 20))
    caller = SimulatedCaller(
        bridge.base_url, TWILIO_TOKEN, tail=1.0, twilio_api=twilio_api, fault=CallerFault("stall", at=2.0)
    )
    result = asyncio.run(caller.run(audio))

    (update,) = twilio_api.call_updates(caller.call_sid)
    assert update.form == {"Status": "completed"}  # so Twilio stops billing
    last_frame_at = result.sent_at[-1][1]  # the last media the bridge got, just before the stall
    assert result.fault_at is not None and last_frame_at <= result.fault_at
    assert 2.0 <= update.at - last_frame_at <= 2.0 + 2.0  # media_timeout_seconds, plus a tick or two
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "stream_lost" and ended["ended_by"] == "twilio"
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)  # both sockets closed
    assert result.ended_by in ("bridge", "twilio_rest")
    assert bridge.wait_for("twilio_stream_lost")["media_timeout_s"] == 2
    assert wait_until(lambda: not REST_IN_FLIGHT)  # the hang-up outlived its call, not the answer


GONE = {
    "20404": (404, 20404, "The requested resource was not found"),
    "21220": (400, 21220, "Call is not in-progress. Cannot redirect."),
}


@pytest.mark.parametrize("code", sorted(GONE))
@pytest.mark.parametrize("what", ["hang_up", "transfer"])
def test_a_call_twilio_says_is_over_is_not_a_bridge_error(
    what: str,
    code: str,
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    twilio_api: TwilioApiStandIn,
) -> None:
    steps: dict[str, Any] = {
        "hang_up": {"name": "end_call", "reply": "Goodbye!"},
        "transfer": {"name": "transfer_call", "arguments": '{"destination": "sales"}', "reply": "Hold on."},
    }
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="utterance", n=1, do="function_call", **steps[what])]))
    bridge = start_bridge(agent.url, profile({"transfer": {"sales": "+15551230001"}}), **rest_env(twilio_api))
    twilio_api.fail_call_updates = GONE[code]
    audio = caller_audio(("silence", 0.3), ("speech", "that is all"))
    result = asyncio.run(SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=8.0, twilio_api=twilio_api).run(audio))

    ended = bridge.wait_for("call_ended", timeout=10)
    assert ended["outcome"] == ("completed" if what == "hang_up" else "caller_hangup"), ended
    assert f"Twilio {code}" in ended["end_reason"]
    _, metrics = get(bridge.base_url + "/metrics")
    assert metric_value(metrics, "callbridge_call_updates_total", 'result="already_ended"') == 1
    assert metric_value(metrics, "callbridge_calls_total", 'outcome="bridge_error"') == 0
    assert result.violations == []


def test_a_fallback_for_a_call_that_is_over_ends_as_the_caller_hanging_up(
    start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    bridge = start_bridge("ws://127.0.0.1:9/unreachable", profile(), **rest_env(twilio_api))  # no agent at all
    twilio_api.fail_call_updates = GONE["21220"]
    audio = caller_audio(("silence", 0.3), ("speech", "hello"), ("silence", 1.0))
    asyncio.run(SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=3.0, twilio_api=twilio_api).run(audio))

    ended = bridge.wait_for("call_ended", timeout=10)
    assert ended["outcome"] == "caller_hangup" and ended["fallback_reason"] == "agent_unreachable", ended
    assert "before the fallback" in ended["end_reason"]


class SlowTokenStore:
    """A shared token store answering in 300 ms (within the Redis client's 1 s timeout): the
    window in which a real stream's token is being checked."""

    async def use_once(self, nonce: str, expires: float) -> bool:
        await asyncio.sleep(0.3)
        return True

    async def close(self) -> None:
        pass


def test_a_stream_whose_token_is_being_checked_in_a_shared_store_is_not_evicted(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url, max_calls=4, max_tokenless_streams=4)
    bridge.server.config.app.state.bridge.token_store = SlowTokenStore()  # read by each new stream
    url = bridge.base_url.replace("http://", "ws://") + "/twilio/media"
    audio = caller_audio(("silence", 0.3), ("speech", "hello"), ("silence", 0.5))

    async def scenario() -> CallResult:
        run = asyncio.create_task(SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=1.0).run(audio))
        await asyncio.sleep(0.15)  # the real stream's token is in the store's hands now
        idle = [await connect(url, compression=None) for _ in range(4)]  # a full pool's worth of newcomers
        try:
            return await run
        finally:
            for ws in idle:
                ws.transport.abort()

    result = asyncio.run(scenario())
    assert result.ended_by == "caller" and result.violations == []
    assert len(agent.agent.sessions) == 1
    assert bridge.wait_for("call_ended")["outcome"] == "caller_hangup"
