"""The caller never hears dead air (issue 8, first part): an agent that cannot take the call
gets the caller the profile's fallback through Twilio's REST API, and an instance that is
full or draining answers the webhook with the fallback instead of a stream."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import app
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.endpoints import free_port, wait_for_port
from app.devtools.local_agent import LocalAgentConfig
from app.devtools.simulated_caller import CallResult, SimulatedCaller
from app.devtools.twilio_api import TwilioApiStandIn
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, rest_env, start_serve, wait_until

pytestmark = pytest.mark.timeout(60)

FALLBACK = {"say": "Sorry, our assistant is resting. Connecting you to a person.", "dial": "+15551230002"}


def profile(**bridge: Any) -> dict[str, Any]:
    base: dict[str, Any] = json.loads((Path(app.__file__).parent / "profiles" / "default.json").read_text())
    base["bridge"].update(bridge)
    return base


def call(bridge: BridgeHandle, seconds: float, **kwargs: Any) -> CallResult:
    audio = synth.encode(synth.silence(seconds), TWILIO_FORMAT)
    return asyncio.run(SimulatedCaller(bridge.base_url, TWILIO_TOKEN, **kwargs).run(audio))


def test_an_agent_that_refuses_the_session_gets_the_caller_the_fallback_within_seconds(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    agent = start_agent(LocalAgentConfig(require_key="the-right-key-0123456789"))  # we send none: 401
    bridge = start_bridge(agent.url, profile(fallback=FALLBACK), **rest_env(twilio_api))
    result = call(bridge, 1.0, tail=10.0, max_tail=10.0, twilio_api=twilio_api)

    assert result.ended_by == "transfer"  # the stand-in's word for "the call got new TwiML"
    assert result.redirected_to is not None
    assert "<Say>Sorry, our assistant is resting." in result.redirected_to
    assert "<Dial><Number>+15551230002</Number></Dial>" in result.redirected_to
    redirected_at = next(e.t for e in result.timeline if "REST update" in e.text)
    assert redirected_at < 3.0  # seconds after the stream started: no long silence first
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "fallback" and ended["fallback_reason"] == "agent_refused"
    assert agent.agent.sessions == []  # refused at the upgrade: no session was ever opened


def test_without_rest_credentials_a_refused_agent_still_ends_the_call_cleanly(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent(LocalAgentConfig(require_key="the-right-key-0123456789"))
    bridge = start_bridge(agent.url, profile())
    result = call(bridge, 1.0, tail=5.0, max_tail=5.0)

    assert result.ended_by == "bridge"
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "agent_error" and "no fallback" in ended["end_reason"]


def test_a_full_instance_answers_the_webhook_with_the_fallback_and_refuses_extra_streams(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    bridge = start_bridge(start_agent().url, profile(fallback=FALLBACK), max_calls=1)
    first: dict[str, CallResult] = {}
    thread = threading.Thread(target=lambda: first.update(result=call(bridge, 3.0, tail=0.5)))
    thread.start()
    assert wait_until(lambda: bool(bridge.records("stream_started")), timeout=5)

    status, twiml = SimulatedCaller(bridge.base_url, TWILIO_TOKEN).post_webhook()
    assert status == 200 and "<Connect>" not in twiml
    assert "<Say>Sorry, our assistant is resting." in twiml and "+15551230002" in twiml
    thread.join(15)
    assert first["result"].ended_by == "caller"  # the call in progress was not disturbed
    assert bridge.records("call_not_admitted")[0]["reason"] == "over_capacity"
    # once the first call is over, calls are taken again
    assert wait_until(lambda: bool(bridge.records("call_ended")), timeout=5)
    time.sleep(0.1)
    status, twiml = SimulatedCaller(bridge.base_url, TWILIO_TOKEN).post_webhook()
    assert status == 200 and "<Connect>" in twiml


def test_a_draining_instance_answers_new_calls_with_the_fallback(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    bridge = start_bridge(start_agent().url, profile())
    bridge.server.config.app.state.bridge.draining = True
    status, twiml = SimulatedCaller(bridge.base_url, TWILIO_TOKEN).post_webhook()
    assert status == 200 and "<Connect>" not in twiml and "<Say>" in twiml and "<Hangup />" in twiml
    assert bridge.records("call_not_admitted")[0]["reason"] == "draining"


def test_with_rest_credentials_the_answer_carries_the_fallback_after_the_stream(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    """Should the stream die with the bridge (a crash, a lost node), Twilio goes on to what
    follows <Connect>: the fallback, not a dead line."""
    agent = start_agent()
    with_rest = start_bridge(agent.url, profile(fallback=FALLBACK), **rest_env(twilio_api))
    status, twiml = SimulatedCaller(with_rest.base_url, TWILIO_TOKEN).post_webhook()
    assert status == 200
    after = twiml.split("</Connect>", 1)[1]
    assert "<Say>Sorry, our assistant is resting." in after and "<Number>+15551230002</Number>" in after
    without = start_bridge(agent.url, profile(fallback=FALLBACK))
    status, twiml = SimulatedCaller(without.base_url, TWILIO_TOKEN).post_webhook()
    assert status == 200 and twiml.split("</Connect>", 1)[1] == "</Response>"  # closing the stream hangs up


@pytest.mark.timeout(60)
def test_a_bridge_killed_mid_call_leaves_the_caller_with_the_fallback_not_a_dead_line(
    start_agent: Callable[..., AgentHandle], twilio_api: TwilioApiStandIn, tmp_path: Path
) -> None:
    """A real `callbridge serve` killed with SIGKILL during a call (a crash, an OOM kill, a lost
    node): Twilio, played by the simulated caller, runs what follows <Connect>."""
    agent = start_agent()
    port = free_port()
    env = {
        **os.environ,
        "AGENT_URL": agent.url,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "TWILIO_ACCOUNT_SID": twilio_api.account_sid,
        "TWILIO_API_BASE": twilio_api.base_url,
        "STREAM_TOKEN_SECRET": "kill-test-stream-secret-0123",
        "PORT": str(port),
        "WORKERS": "1",
    }
    proc, log_path = start_serve(tmp_path, env)
    try:
        wait_for_port(port, proc)
        caller = SimulatedCaller(f"http://127.0.0.1:{port}", TWILIO_TOKEN, tail=0.5, twilio_api=twilio_api)
        outcome: dict[str, CallResult] = {}
        audio = synth.encode(synth.silence(8.0), TWILIO_FORMAT)
        thread = threading.Thread(target=lambda: outcome.update(result=asyncio.run(caller.run(audio))))
        thread.start()
        assert wait_until(lambda: b"stream_started" in log_path.read_bytes(), timeout=10)
        proc.kill()
        thread.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    result = outcome["result"]
    assert result.ended_by == "bridge" and result.rest_updates == []  # nobody told Twilio anything
    assert result.after_stream is not None and result.after_stream.startswith("<Say>Sorry")
    assert result.after_stream.endswith("<Hangup />")  # the default profile has no person to dial
