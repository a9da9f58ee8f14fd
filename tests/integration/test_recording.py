"""Recording with consent, end to end (issue 10, item 6): a real bridge asks the Twilio REST
stand-in to record only after consent, and the stand-in's signed status callback is checked."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import app
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.endpoints import free_port
from app.devtools.simulated_caller import CallResult, SimulatedCaller
from app.devtools.twilio_api import TwilioApiStandIn
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, rest_env, wait_until

pytestmark = pytest.mark.timeout(60)


def recording_profile(**recording: Any) -> dict[str, Any]:
    base: dict[str, Any] = json.loads((Path(app.__file__).parent / "profiles" / "default.json").read_text())
    base["bridge"]["recording"] = recording
    return base


def start(
    start_bridge: Callable[..., BridgeHandle], agent: AgentHandle, api: TwilioApiStandIn, **recording: Any
) -> BridgeHandle:
    port = free_port()  # PUBLIC_URL names the bridge itself: Twilio's callbacks are signed for it
    return start_bridge(
        agent.url, recording_profile(**recording), port=port, public_url=f"http://127.0.0.1:{port}", **rest_env(api)
    )


def call(bridge: BridgeHandle, api: TwilioApiStandIn, seconds: float, **kwargs: Any) -> CallResult:
    audio = synth.encode(synth.silence(seconds), TWILIO_FORMAT)
    return asyncio.run(SimulatedCaller(bridge.base_url, TWILIO_TOKEN, twilio_api=api, **kwargs).run(audio))


def test_explicit_consent_by_key_starts_a_dual_channel_recording_and_its_signed_callback_is_taken(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    bridge = start(start_bridge, start_agent(), twilio_api, consent="explicit", consent_key="5")
    result = call(bridge, twilio_api, 3.0, keys=[(1.0, "5")])

    assert [r["call_sid"] for r in twilio_api.recordings] == [result.call_sid]
    form = twilio_api.recordings[0]["form"]
    callback = bridge.base_url + "/twilio/recording-status"
    assert form["RecordingChannels"] == "dual" and form["RecordingStatusCallback"] == callback
    assert wait_until(lambda: twilio_api.recording_callbacks == [(callback, 204)])  # signature accepted
    status = bridge.wait_for("recording_status")
    assert status["status"] == "in-progress" and status["recording_sid"] == twilio_api.recordings[0]["sid"]
    ended = bridge.wait_for("call_ended")
    assert ended["recording"]["consent"] == "key" and ended["recording"]["state"] == "recording"
    assert 1.0 <= ended["recording"]["consent_at_s"] < 3.0


def test_without_consent_nothing_is_recorded(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    bridge = start(start_bridge, start_agent(), twilio_api, consent="explicit", consent_window_seconds=5)
    call(bridge, twilio_api, 2.0, keys=[(1.0, "2")])  # another key: not consent
    ended = bridge.wait_for("call_ended")
    assert twilio_api.recordings == []
    assert ended["recording"]["consent"] == "none"


def test_implied_consent_records_after_the_announced_greeting(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    bridge = start(start_bridge, start_agent(), twilio_api, consent="implied")
    result = call(bridge, twilio_api, 8.0)  # silent: the greeting and its announcement play through
    consent = bridge.wait_for("recording_consent")
    assert consent["consent"] == "implied"
    assert [r["call_sid"] for r in twilio_api.recordings] == [result.call_sid]
    ended = bridge.wait_for("call_ended")
    greeting = ended["agent_audio"]["full_ms"] / 1000  # the only utterance: consent after it played
    assert consent["at_s"] >= greeting


def test_a_forged_recording_callback_is_refused(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    bridge = start(start_bridge, start_agent(), twilio_api, consent="implied")
    request = urllib.request.Request(
        bridge.base_url + "/twilio/recording-status",
        data=b"RecordingSid=RE1&RecordingStatus=completed",
        headers={"X-Twilio-Signature": "forged"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    with refused.value:  # its socket goes with it
        assert refused.value.code == 403
    assert bridge.records("recording_status") == []
