"""The dead-stream watchdog (issue 16, item 2) and Twilio's answers for a call that is over
(item 4), in the core: no media for ``media_timeout`` ends a call as ``stream_lost`` and
completes it through REST; a quiet caller whose media still flows is the check-in's business."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.config import ConfigError, Settings, load_profile, resolve
from app.core.actions import EndCall, HangUpCall, Log, RedirectCall, SendToAgent
from app.core.call import Call
from app.core.events import (
    AgentClosed,
    AgentConnected,
    AgentFunctionCallRequest,
    AgentSettingsApplied,
    AgentWelcome,
    CallGone,
    CallUpdated,
    FunctionCall,
    StreamTokenAccepted,
    Tick,
    TwilioFrameTooLarge,
    TwilioMedia,
    TwilioStart,
)
from app.core.options import CallOptions, Telephony
from app.core.states import CallState
from app.core.vocabulary import Outcome, RestResult

AGENT = {"listen": {"provider": {"type": "deepgram", "model": "nova-3"}}, "greeting": "hi"}
SID = "MZ" + "a" * 32
CALL = "CA" + "b" * 32
SILENCE = b"\xff" * 160  # one 20 ms frame of mu-law silence: what Twilio sends for a quiet caller


def welcomed_call(telephony: Telephony, **options: Any) -> Call:
    """A call at t=0 whose agent session has sent Welcome (Settings sent, not yet applied)."""
    call = Call(CallOptions(agent=AGENT, telephony=telephony, **options), now=0.0)
    for event in (TwilioStart(SID, CALL), StreamTokenAccepted(), AgentConnected(), AgentWelcome("r")):
        call.handle(event, 0.0)
    return call


def live_call(**telephony: Any) -> Call:
    call = welcomed_call(Telephony(rest_available=True, **telephony))
    call.handle(AgentSettingsApplied(), 0.0)
    assert call.state is CallState.LIVE
    return call


def media_until(call: Call, start: float, end: float) -> list[object]:
    """Twilio's frames every 20 ms and the pump's ticks every 0.5 s, from ``start`` to ``end``."""
    actions: list[object] = []
    for i in range(round((end - start) / 0.02)):
        now = start + i * 0.02
        actions += call.handle(TwilioMedia(SILENCE, SID), now)
        if i % 25 == 0:
            actions += call.handle(Tick(), now)
    return actions


def ticks_until(call: Call, start: float, end: float) -> list[object]:
    actions: list[object] = []
    now = start
    while now <= end and not call.ended:
        actions += call.handle(Tick(), now)
        now += 0.5
    return actions


def test_a_stream_that_stops_sending_media_is_completed_through_rest_and_ends_as_stream_lost() -> None:
    call = live_call(silence_check_in=0)
    assert not any(isinstance(a, EndCall) for a in media_until(call, 0.0, 30.0))  # 30 s of media: alive
    assert not any(isinstance(a, EndCall) for a in ticks_until(call, 30.0, 39.5))  # quiet for 9.5 s
    actions = call.handle(Tick(), 40.0)  # the last frame was at 29.98: 10 s without one
    assert [a for a in actions if isinstance(a, HangUpCall)] == [HangUpCall(CALL)]  # Twilio stops billing
    assert call.state is CallState.ENDING_DEAD_STREAM and not any(isinstance(a, EndCall) for a in actions)
    lost = next(a for a in actions if isinstance(a, Log) and a.event == "twilio_stream_lost")
    assert lost.fields == {"silent_s": 10.02, "media_timeout_s": 10.0}
    assert call.handle(TwilioMedia(SILENCE, SID), 40.1) == []  # too late: the call is being completed
    ended = call.handle(CallUpdated(RestResult.OK), 40.2)  # Twilio's answer: now the sockets close
    assert call.outcome is Outcome.STREAM_LOST and ended[-1] == EndCall(Outcome.STREAM_LOST, call.end_reason, 1000)
    assert call.end_reason.endswith("completed through the REST API: done")
    summary = call.summary(40.2)
    assert summary["outcome"] == "stream_lost" and summary["ended_by"] == "twilio"


def test_without_rest_credentials_the_dead_stream_still_ends_and_nothing_is_asked_of_twilio() -> None:
    call = welcomed_call(Telephony(rest_available=False, silence_check_in=0))
    actions = ticks_until(call, 0.0, 20.0)
    assert call.outcome is Outcome.STREAM_LOST  # while still waiting for the agent: watched too
    assert not [a for a in actions if isinstance(a, HangUpCall)]
    assert call.summary(20.0)["end_reason"] == "no media from twilio in time: the stream is dead"


def test_a_quiet_caller_whose_media_flows_gets_the_check_in_not_the_watchdog() -> None:
    call = live_call(silence_check_in=15.0)
    actions = media_until(call, 0.0, 40.0)
    assert not call.ended
    check_ins = [a for a in actions if isinstance(a, SendToAgent) and "Are you still there?" in str(a.data)]
    assert check_ins  # the silence path, as before


def test_the_watchdog_can_be_turned_off_and_waits_for_the_profiles_timeout() -> None:
    off = live_call(silence_check_in=0, media_timeout=0)
    ticks_until(off, 0.0, 120.0)
    assert not off.ended
    slow = live_call(silence_check_in=0, media_timeout=30.0)
    ticks_until(slow, 0.0, 29.5)
    assert not slow.ended
    ticks_until(slow, 30.0, 30.0)
    assert slow.state is CallState.ENDING_DEAD_STREAM
    ticks_until(slow, 30.5, 60.0)  # Twilio never answers the hang-up: its deadline ends the call
    assert slow.outcome is Outcome.STREAM_LOST and "did not answer in time" in slow.end_reason


def test_a_lost_agent_session_does_not_pause_the_watchdog() -> None:
    call = welcomed_call(Telephony(silence_check_in=0, rest_available=True), reconnect_within=60.0)
    call.handle(AgentSettingsApplied(), 0.0)
    media_until(call, 0.0, 5.0)
    call.handle(AgentClosed(1011, "gone"), 5.0)  # reconnecting, with a minute of budget
    assert call.state is CallState.AGENT_DOWN
    ticks_until(call, 5.0, 14.5)
    assert not call.ended
    ticks_until(call, 15.0, 15.0)  # the last frame was at 4.98
    assert call.state is CallState.ENDING_DEAD_STREAM


def test_an_oversize_frame_close_says_so() -> None:
    call = live_call()
    actions = call.handle(TwilioFrameTooLarge(), 1.0)
    assert call.outcome is Outcome.OVERSIZE_FRAME and actions[-1] == EndCall(
        Outcome.OVERSIZE_FRAME, call.end_reason, 1009
    )
    assert call.summary(1.0)["invalid_inputs"] == {"oversize": 1}


@pytest.mark.parametrize("detail", ["Twilio 20404: not found", "Twilio 21220: call not in progress"])
def test_a_transfer_to_a_call_that_is_over_ends_as_the_caller_hanging_up(detail: str) -> None:
    call = live_call(silence_check_in=0, transfer=(("sales", "+15551230001"),))
    request = AgentFunctionCallRequest((FunctionCall("f1", "transfer_call", '{"destination": "sales"}', True),))
    call.handle(request, 1.0)
    now = 1.0
    while call.state is not CallState.TRANSFERRING:  # the announcement's wait runs out
        now += 0.5
        assert now < 30, call.state
        call.handle(TwilioMedia(SILENCE, SID), now)
        call.handle(Tick(), now)
    call.handle(CallGone(detail), now + 0.1)
    assert call.outcome is Outcome.CALLER_HANGUP
    assert detail in call.end_reason and "before the transfer" in call.end_reason


def test_a_fallback_for_a_call_that_is_over_ends_as_the_caller_hanging_up() -> None:
    options = CallOptions(agent=AGENT, telephony=Telephony(rest_available=True))
    call = Call(options, now=0.0)
    for event in (TwilioStart(SID, CALL), StreamTokenAccepted(), AgentClosed(1011, "no")):
        call.handle(event, 0.0)
    redirect = [a for a in call.handle(Tick(), 0.5) if isinstance(a, RedirectCall)]
    assert redirect and call.state is CallState.FALLING_BACK
    call.handle(CallGone("Twilio 21220: call not in progress"), 0.6)
    assert call.outcome is Outcome.CALLER_HANGUP and call.summary(0.6)["ended_by"] == "caller"


def test_a_hang_up_of_a_call_that_is_over_counts_as_done() -> None:
    call = live_call(silence_check_in=0)
    request = AgentFunctionCallRequest((FunctionCall("f1", "end_call", "{}", True),))
    call.handle(request, 1.0)
    now = 1.0
    while call.state is not CallState.HANGING_UP:
        now += 0.5
        assert now < 30, call.state
        call.handle(TwilioMedia(SILENCE, SID), now)
        call.handle(Tick(), now)
    call.handle(CallGone("Twilio 21220: call not in progress"), now)
    assert call.outcome is Outcome.COMPLETED and "already over" in call.end_reason


def test_the_profile_sets_the_watchdog(tmp_path: Path) -> None:
    agent = {
        "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
        "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "prompt": "Be brief."},
        "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
    }

    def write(telephony: dict[str, object]) -> Path:
        path = tmp_path / "profile.json"
        path.write_text(json.dumps({"agent": agent, "bridge": {"telephony": telephony}}))
        return path

    def options(telephony: dict[str, object]) -> CallOptions:
        return resolve(Settings(agent_profile=write(telephony))).call_options()

    assert options({}).telephony.media_timeout == 10.0
    assert options({"media_timeout_seconds": 0}).telephony.media_timeout == 0
    assert options({"media_timeout_seconds": 2.5}).telephony.media_timeout == 2.5
    with pytest.raises(ConfigError, match="media_timeout_seconds"):
        load_profile(write({"media_timeout_seconds": -1}))
    with pytest.raises(ConfigError, match="media_timeout_seconds"):
        load_profile(write({"media_timeout_seconds": 0.2}))  # shorter than a tick: every call would end
