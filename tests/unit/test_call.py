"""The call state machine, event by event, including the odd orders real peers produce."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from app.agent import messages as agent_msg
from app.codecs import AudioFormat
from app.core.actions import (
    Action,
    BindLogContext,
    ClearTwilio,
    ConnectAgent,
    EndCall,
    Log,
    Measure,
    RedeemStreamToken,
    RedirectCall,
    SendMark,
    SendMedia,
    SendToAgent,
)
from app.core.call import Call
from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentClosed,
    AgentConnected,
    AgentConnectFailed,
    AgentConversationText,
    AgentError,
    AgentFunctionCallRequest,
    AgentInfo,
    AgentInvalid,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentThinking,
    AgentUnknown,
    AgentUserStartedSpeaking,
    AgentWarning,
    AgentWelcome,
    BridgeFailed,
    BridgeShuttingDown,
    CallUpdated,
    CallUpdateFailed,
    Event,
    FunctionCall,
    StreamTokenAccepted,
    StreamTokenRefused,
    Tick,
    TwilioBadStart,
    TwilioClosed,
    TwilioConnected,
    TwilioDtmf,
    TwilioInvalid,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
)
from app.core.options import CallOptions, Telephony
from app.core.states import CallState
from app.core.vocabulary import FallbackReason, InvalidKind, LogLevel, Outcome, RejectReason, RestResult
from tests.conformance.sdk_oracle import validate_client_message

AGENT = {"listen": {"provider": {"type": "deepgram", "model": "nova-3"}}, "greeting": "hi"}
SID = "MZ" + "a" * 32
CALL = "CA" + "b" * 32
RESERVED_LOG_KEYS = {"event", "level", "timestamp", "logger"}


SILENT_STREAM = Telephony(media_timeout=0)
"""These calls pass simulated seconds without a media frame, which the dead-stream watchdog
would end; its own tests (test_stream_watchdog.py) turn it on."""


def make_call(**options: Any) -> Call:
    options.setdefault("telephony", SILENT_STREAM)
    return Call(CallOptions(agent=AGENT, **options), now=0.0)


def feed(call: Call, *events: Event, now: float = 1.0) -> list[Action]:
    out: list[Action] = []
    for event in events:
        actions = call.handle(event, now)
        for action in actions:
            if isinstance(action, Log):  # a Log field named like a structlog key would crash the pump
                assert not RESERVED_LOG_KEYS & set(action.fields), action
        out += actions
    return out


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def started_call(**options: Any) -> Call:
    """Start seen and its stream token accepted: the agent session is being opened."""
    call = make_call(**options)
    feed(call, TwilioConnected(), TwilioStart(SID, CALL), StreamTokenAccepted())
    return call


def ready_call(**options: Any) -> Call:
    call = started_call(**options)
    feed(call, AgentConnected(), AgentWelcome("req-1"), AgentSettingsApplied())
    return call


def test_start_redeems_the_token_then_opens_agent_session_and_binds_ids() -> None:
    call = make_call()
    params = {"from": "+1", "stream_token": "tok"}
    actions = feed(call, TwilioConnected(), TwilioStart(SID, CALL, custom_parameters=params))
    assert of(actions, RedeemStreamToken) == [RedeemStreamToken("tok", CALL)]
    assert of(actions, ConnectAgent) == []  # no agent session before the token is good
    assert BindLogContext({"call_sid": CALL, "stream_sid": SID}) in actions
    assert call.custom_parameters == params
    accepted = feed(call, StreamTokenAccepted())
    assert of(accepted, ConnectAgent) == [ConnectAgent()]
    assert Measure("active_calls", 1) in accepted
    assert call.state is CallState.CONNECTING_AGENT and call.accepted


def test_refused_token_rejects_the_stream_without_an_agent_session() -> None:
    call = make_call()
    feed(call, TwilioStart(SID, CALL))
    actions = feed(call, StreamTokenRefused("token reused"))
    assert of(actions, ConnectAgent) == []
    assert of(actions, EndCall) == [EndCall(RejectReason.BAD_TOKEN, "stream token refused: token reused", 1008)]
    assert Measure("streams_rejected", 1, "bad_token") in actions
    assert not call.accepted and call.ended


def test_no_start_in_time_rejects_the_stream() -> None:
    call = make_call(start_timeout=10.0)
    assert call.handle(Tick(), 9.5) == []
    actions = call.handle(Tick(), 10.0)
    assert of(actions, EndCall)[0].outcome is RejectReason.NO_START
    assert [log.event for log in of(actions, Log)] == ["twilio_stream_without_start", "stream_rejected"]


def test_start_deadline_also_covers_a_token_check_that_never_answers() -> None:
    call = make_call(start_timeout=10.0)
    feed(call, TwilioStart(SID, CALL), now=1.0)
    assert of(call.handle(Tick(), 10.5), EndCall)[0].outcome is RejectReason.NO_START


def test_welcome_sends_settings_once_with_bridge_audio_block() -> None:
    call = make_call()
    feed(call, TwilioStart(SID, CALL), StreamTokenAccepted(), AgentConnected())
    actions = feed(call, AgentWelcome("req-9"))
    sends = of(actions, SendToAgent)
    assert len(sends) == 1
    settings = json.loads(sends[0].data)
    assert settings["type"] == "Settings"
    assert settings["audio"] == {
        "input": {"encoding": "mulaw", "sample_rate": 8000},
        "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
    }
    assert settings["agent"] == AGENT
    assert BindLogContext({"request_id": "req-9"}) in actions
    # a second Welcome must not send a second Settings (SETTINGS_ALREADY_APPLIED)
    assert of(feed(call, AgentWelcome("again")), SendToAgent) == []


def test_media_before_settings_applied_is_buffered_then_delivered_in_order() -> None:
    call = started_call()
    feed(call, AgentConnected(), AgentWelcome("r"))
    frames = [bytes([i]) * 160 for i in range(5)]
    for frame in frames:
        assert feed(call, TwilioMedia(frame, SID)) == []
    assert call.buffered_caller_bytes == 800
    actions = feed(call, AgentSettingsApplied())
    assert [a.data for a in of(actions, SendToAgent)] == frames
    assert call.buffered_caller_bytes == 0
    # then live audio flows straight through
    assert feed(call, TwilioMedia(b"x" * 160, SID)) == [SendToAgent(b"x" * 160)]


def test_media_before_start_is_buffered_not_dropped() -> None:
    call = make_call()
    assert feed(call, TwilioMedia(b"\x01" * 160)) == []
    feed(call, TwilioStart(SID, CALL), StreamTokenAccepted(), AgentConnected(), AgentWelcome("r"))
    actions = feed(call, AgentSettingsApplied())
    assert of(actions, SendToAgent) == [SendToAgent(b"\x01" * 160)]


def test_prebuffer_is_bounded_and_drops_oldest_with_one_log() -> None:
    call = started_call(max_prebuffer_seconds=0.1)  # 800 bytes of mu-law
    logs = []
    for i in range(10):
        logs += of(feed(call, TwilioMedia(bytes([i]) * 160, SID)), Log)
    assert [log.event for log in logs] == ["caller_audio_dropped"]
    assert call.stats.caller_bytes_dropped == 800
    assert call.stats.overflows == {"caller_prebuffer": 5} and call.stats.invalid == {}  # not invalid input
    feed(call, AgentConnected(), AgentWelcome("r"))
    delivered = [a.data for a in of(feed(call, AgentSettingsApplied()), SendToAgent)]
    assert delivered == [bytes([i]) * 160 for i in range(5, 10)]  # the newest 100 ms


def test_agent_audio_becomes_twilio_media_with_stream_sid() -> None:
    call = ready_call()
    actions = feed(call, AgentAudio(b"\x00\x01\x02"))
    assert [a.metric for a in of(actions, Measure)] == ["first_agent_audio"]
    assert feed(call, AgentAudio(b"\x00\x01\x02")) == of(actions, SendMedia)  # measured once
    assert of(actions, SendMedia) == [
        SendMedia('{"event":"media","streamSid":"' + SID + '","media":{"payload":"AAEC"}}', 3)
    ]


def test_agent_audio_before_the_session_is_ready_is_out_of_order_and_counted() -> None:
    call = started_call()
    first = feed(call, AgentAudio(b"\x07" * 10))
    again = feed(call, AgentAudio(b"\x07" * 10))
    assert [log.event for log in of(first, Log)] == ["event_out_of_order"] and again == []
    assert call.stats.invalid == {InvalidKind.OUT_OF_ORDER: 2}


def test_barge_in_clears_twilio_and_forgets_outstanding_marks() -> None:
    call = ready_call()
    feed(call, AgentStartedSpeaking(total_latency=1.0), AgentAudio(b"a" * 800))
    mark = of(feed(call, AgentAudioDone()), SendMark)[0]
    assert json.loads(mark.text) == {"event": "mark", "streamSid": SID, "mark": {"name": "agent-audio-1"}}
    actions = feed(call, AgentUserStartedSpeaking())
    assert actions[0] == ClearTwilio('{"event":"clear","streamSid":"' + SID + '"}')  # first, before anything
    assert call.stats.barge_ins == 1
    # Twilio returns the cleared mark: that audio was never heard
    assert feed(call, TwilioMark("agent-audio-1", SID)) == []
    assert call.stats.marks_cleared == 1 and call.stats.marks_played == 0


def test_user_speaking_without_agent_audio_still_clears_but_is_not_a_barge_in() -> None:
    call = ready_call()
    actions = feed(call, AgentUserStartedSpeaking())
    assert of(actions, ClearTwilio) and call.stats.barge_ins == 0


def test_mark_played_is_counted_and_unknown_mark_logged_once() -> None:
    call = ready_call()
    feed(call, AgentStartedSpeaking(), AgentAudio(b"a"), AgentAudioDone())
    feed(call, TwilioMark("agent-audio-1", SID))
    assert call.stats.marks_played == 1
    first = feed(call, TwilioMark("nope", SID))
    second = feed(call, TwilioMark("nope2", SID))
    assert [log.event for log in of(first, Log)] == ["twilio_unknown_mark"]
    assert second == []


def test_wrong_stream_sid_is_dropped_and_logged_once() -> None:
    call = ready_call()
    first = feed(call, TwilioMedia(b"x" * 160, "MZother"))
    again = feed(call, TwilioMedia(b"x" * 160, "MZother"))
    assert [log.event for log in of(first, Log)] == ["twilio_wrong_stream_sid"] and again == []
    assert of(first, SendToAgent) == []
    assert call.stats.invalid["wrong_stream_sid"] == 2
    feed(call, TwilioStop("MZother"))
    assert not call.ended  # a stop for another stream is ignored


def test_stop_ends_call_once() -> None:
    call = ready_call()
    actions = feed(call, TwilioStop(SID))
    assert of(actions, EndCall) == [EndCall(Outcome.CALLER_HANGUP, "caller hung up (stop)", 1000)]
    assert Measure("active_calls", -1) in actions and Measure("calls", 1, "caller_hangup") in actions
    assert feed(call, TwilioStop(SID)) == []
    assert feed(call, TwilioClosed(1000)) == []
    assert feed(call, AgentAudio(b"late")) == []  # nothing leaks out after the end


def test_twilio_socket_closed_without_stop_ends_call() -> None:
    call = ready_call()
    assert of(feed(call, TwilioClosed(1006)), EndCall)[0].outcome == "caller_hangup"


def test_keepalive_after_quiet_period_only() -> None:
    call = ready_call(keepalive_after=5.0, telephony=Telephony(silence_check_in=0))
    assert call.handle(Tick(), 4.0) == []
    assert call.handle(Tick(), 6.1) == [SendToAgent(agent_msg.KEEP_ALIVE)]
    assert call.handle(Tick(), 7.0) == []  # the clock restarts at each send
    call.handle(TwilioMedia(b"x", SID), 10.0)
    assert call.handle(Tick(), 14.0) == []  # audio counts as traffic
    assert call.handle(Tick(), 15.5) == [SendToAgent(agent_msg.KEEP_ALIVE)]


def test_no_keepalive_before_settings_applied() -> None:
    call = started_call(agent_ready_timeout=100)
    feed(call, AgentConnected(), AgentWelcome("r"))
    assert call.handle(Tick(), 50.0) == []


def test_agent_not_ready_in_time_redirects_the_call_to_the_fallback() -> None:
    call = make_call(agent_ready_timeout=10)
    feed(call, TwilioStart(SID, CALL), StreamTokenAccepted(), now=0.0)
    assert call.handle(Tick(), 9.0) == []
    assert call.handle(Tick(), 10.5)[0] == Log(
        LogLevel.ERROR, "agent_not_ready", {"state": "connecting_agent", "timeout_s": 10}
    )
    actions = call.handle(Tick(), 11.0)  # the next tick decides: no second chance at the start
    (redirect,) = of(actions, RedirectCall)
    assert "<Say>Sorry, our assistant is not available right now." in redirect.twiml and "<Hangup />" in redirect.twiml
    assert Measure("fallbacks", 1, "agent_not_ready") in actions and of(actions, EndCall) == []
    assert of(feed(call, CallUpdated(RestResult.OK), now=11.0), EndCall)[0].outcome == "fallback"
    assert call.summary(11.0)["fallback_reason"] == "agent_not_ready"


def test_an_agent_lost_mid_call_is_reconnected_with_the_conversation_and_no_greeting() -> None:
    call = ready_call()
    feed(call, AgentConversationText("assistant", "hi"), AgentConversationText("user", "my order"), now=2.0)
    actions = feed(call, AgentError("INTERNAL_SERVER_ERROR", "boom"), now=3.0)
    assert of(actions, Log)[0].fields == {"code": "INTERNAL_SERVER_ERROR", "description": "boom"}
    assert of(actions, EndCall) == [] and call.state is CallState.AGENT_DOWN
    assert feed(call, TwilioMedia(b"\x05" * 160, SID), now=3.2) == []  # the caller's audio is kept meanwhile
    assert of(feed(call, Tick(), now=3.5), ConnectAgent) == [ConnectAgent()]  # the first attempt, at once
    feed(call, AgentConnected(), now=3.6)
    settings = json.loads(next(a.data for a in feed(call, AgentWelcome("r2"), now=3.7) if isinstance(a, SendToAgent)))
    validate_client_message(settings)  # deepgram-sdk's model of Settings, context included
    assert "greeting" not in settings["agent"]
    assert settings["agent"]["context"]["messages"] == [
        {"type": "History", "role": "assistant", "content": "hi"},
        {"type": "History", "role": "user", "content": "my order"},
    ]
    flushed = of(feed(call, AgentSettingsApplied(), now=4.0), SendToAgent)
    assert flushed == [SendToAgent(b"\x05" * 160)]  # delivered after SettingsApplied
    assert call.summary(5.0)["reconnects"] == 1 and call.summary(5.0)["reconnect_waits_s"] == [1.0]


def test_a_reconnect_that_takes_long_plays_one_moment_once_per_loss() -> None:
    hold = b"\x11" * 1000  # what the profile's hold_audio became: mu-law 8 kHz
    call = ready_call(hold_audio=hold, hold_after=2.0, reconnect_attempts=5, reconnect_within=20.0)
    feed(call, AgentAudio(b"\x22" * 800), now=2.0)  # the agent is speaking when it is lost
    feed(call, AgentClosed(1006, ""), now=3.0)
    feed(call, Tick(), AgentConnectFailed("connection refused"), now=3.5)  # the first attempt fails
    assert of(feed(call, Tick(), now=4.9), SendMedia) == []  # silence is fine for a moment
    actions = feed(call, Tick(), now=5.0)
    played = b"".join(base64.b64decode(json.loads(m.text)["media"]["payload"]) for m in of(actions, SendMedia))
    assert played == hold and [log.event for log in of(actions, Log)] == ["hold_message_played"]
    assert of(actions, SendMark) == []  # not an agent utterance
    assert of(feed(call, Tick(), AgentConnectFailed("refused"), Tick(), now=7.0), SendMedia) == []  # once
    feed(call, Tick(), AgentConnected(), AgentWelcome("r2"), AgentSettingsApplied(), now=8.0)
    assert call.state is CallState.LIVE
    # the agent's cut-off utterance is one record, the hold message none
    assert [u["full_ms"] for u in call.playback.heard.records(9.0)] == [100]
    feed(call, AgentClosed(1006, ""), now=10.0)
    assert of(feed(call, Tick(), AgentConnectFailed("refused"), Tick(), now=12.5), SendMedia)  # a new loss: again


def lose_and_restore(call: Call, at: float) -> None:
    feed(call, AgentClosed(1006, ""), now=at)
    feed(call, Tick(), now=at + 0.1)  # the attempt
    if call.state is CallState.CONNECTING_AGENT:
        feed(call, AgentConnected(), AgentWelcome("r"), AgentSettingsApplied(), now=at + 0.2)


def test_an_agent_that_comes_back_and_drops_at_once_spends_the_budget_and_gets_the_fallback() -> None:
    call = ready_call(reconnect_attempts=3, reconnect_within=10.0)
    for at in (1.0, 2.0, 3.0):
        lose_and_restore(call, at)
        assert call.state is CallState.LIVE
    lose_and_restore(call, 4.0)  # a fourth loss within 10 s: no fourth attempt
    assert call.state is CallState.FALLING_BACK and call.fallback_reason is FallbackReason.RECONNECT_FAILED


def test_losses_far_apart_heal_every_time() -> None:
    call = ready_call(reconnect_attempts=3, reconnect_within=10.0)
    for at in range(1, 200, 20):  # ten losses, one every 20 s
        lose_and_restore(call, float(at))
        assert call.state is CallState.LIVE
    assert call.summary(300.0)["reconnects"] == 10


def test_without_hold_audio_a_long_reconnect_stays_silent() -> None:
    call = ready_call(reconnect_attempts=5, reconnect_within=20.0)
    feed(call, AgentClosed(1006, ""), now=3.0)
    assert of(feed(call, Tick(), AgentConnectFailed("refused"), Tick(), now=9.0), SendMedia) == []


def test_a_reconnected_agent_is_told_of_the_function_calls_it_made_and_their_answers() -> None:
    call = ready_call()
    feed(call, AgentConversationText("user", "where is order 42?"), now=2.0)
    made = {"id": "f1", "name": "lookup", "client_side": True, "arguments": '{"order": 42}', "response": "shipped"}
    feed(call, AgentInfo("History", {"type": "History", "function_calls": [made, {"id": 7}]}), now=2.5)
    feed(call, AgentInfo("History", {"type": "History", "role": "user", "content": "where is order 42?"}), now=2.5)
    feed(call, AgentConversationText("assistant", "It has shipped."), now=3.0)
    feed(call, AgentClosed(1006, ""), Tick(), now=4.0)
    feed(call, AgentConnected(), now=4.1)
    settings = json.loads(next(a.data for a in feed(call, AgentWelcome("r2"), now=4.2) if isinstance(a, SendToAgent)))
    validate_client_message(settings)  # deepgram-sdk's model: function-call history included
    assert settings["agent"]["context"]["messages"] == [
        {"type": "History", "role": "user", "content": "where is order 42?"},  # once: the text turn
        {"type": "History", "function_calls": [made]},  # the malformed one left out
        {"type": "History", "role": "assistant", "content": "It has shipped."},
    ]


def test_the_reconnect_budget_spent_gets_the_caller_the_fallback() -> None:
    call = ready_call(reconnect_attempts=2, reconnect_within=10.0)
    feed(call, AgentClosed(1011, "gone"), now=1.0)
    assert of(feed(call, Tick(), now=1.0), ConnectAgent)  # attempt 1, at once
    feed(call, AgentConnectFailed("timed out opening the connection"), now=2.0)
    assert of(feed(call, Tick(), now=2.0), ConnectAgent) == []  # backoff: 0.5 s after the last attempt
    assert of(feed(call, Tick(), now=2.5), ConnectAgent)  # attempt 2
    feed(call, AgentConnectFailed("timed out opening the connection"), now=3.5)
    actions = feed(call, Tick(), now=4.0)
    assert of(actions, RedirectCall) and Measure("fallbacks", 1, "reconnect_failed") in actions


def test_a_failure_a_new_session_would_repeat_is_not_retried() -> None:
    call = ready_call()
    feed(call, AgentError("INVALID_SETTINGS", "bad think provider"), now=1.0)
    actions = feed(call, Tick(), now=1.5)
    assert of(actions, ConnectAgent) == [] and Measure("fallbacks", 1, "cannot_heal") in actions


def test_agent_refused_at_start_gets_the_fallback_and_a_failed_fallback_ends_the_call() -> None:
    call = started_call(fallback_twiml="<Response><Say>custom</Say></Response>")
    feed(call, AgentConnectFailed("HTTP 401 on upgrade (bad API key)"))
    actions = feed(call, Tick(), now=1.5)
    assert of(actions, RedirectCall) == [RedirectCall(CALL, "<Response><Say>custom</Say></Response>")]
    assert Measure("fallbacks", 1, "agent_refused") in actions
    ended = of(feed(call, CallUpdateFailed("no Twilio REST credentials")), EndCall)
    assert ended[0].outcome == "agent_error" and "no fallback" in call.end_reason


def test_warning_unknown_info_and_invalid_messages_never_end_the_call() -> None:
    call = ready_call()
    actions = feed(
        call,
        AgentWarning("SPEAK_REQUEST_FAILED", "x"),
        AgentUnknown("Brand new"),
        AgentUnknown("Brand new"),
        AgentInfo("History", {}),
        AgentInvalid("bad JSON"),
        AgentThinking("hmm"),
    )
    assert not call.ended and of(actions, EndCall) == []
    assert [log.event for log in of(actions, Log)].count("agent_message_unknown_ignored") == 1


def test_transcripts_are_logged_only_when_enabled() -> None:
    quiet = ready_call()
    log = of(feed(quiet, AgentConversationText("user", "my PIN is 1234")), Log)[0]
    assert "content" not in log.fields and log.fields["chars"] == 14
    loud = ready_call(log_transcripts=True)
    assert of(feed(loud, AgentConversationText("user", "hello")), Log)[0].fields["content"] == "hello"
    assert quiet.transcript[0][1:] == ("user", "my PIN is 1234")  # kept for the call record


def test_dtmf_digit_is_pii() -> None:
    assert of(feed(ready_call(), TwilioDtmf("5", SID)), Log)[0].fields == {}
    assert of(feed(ready_call(log_transcripts=True), TwilioDtmf("5", SID)), Log)[0].fields == {"digit": "5"}


def test_client_function_calls_are_answered_not_left_hanging() -> None:
    call = ready_call()
    request = AgentFunctionCallRequest(
        (FunctionCall("id-1", "lookup", "{}", True), FunctionCall("id-2", "server_fn", "{}", False))
    )
    sends = of(feed(call, request), SendToAgent)
    assert len(sends) == 1
    reply = json.loads(sends[0].data)
    assert reply["type"] == "FunctionCallResponse" and reply["id"] == "id-1" and reply["name"] == "lookup"


def test_bad_start_rejects_the_stream_but_other_bad_frames_do_not() -> None:
    call = make_call()
    assert of(feed(call, TwilioInvalid(InvalidKind.BAD_JSON, "{")), EndCall) == []
    ended = of(feed(call, TwilioBadStart("no callSid")), EndCall)
    assert ended == [EndCall(RejectReason.BAD_START, "unusable start message: no callSid", 1008)]


def test_start_twice_is_ignored() -> None:
    call = ready_call()
    actions = feed(call, TwilioStart("MZ" + "c" * 32, CALL))
    assert [log.event for log in of(actions, Log)] == ["event_out_of_order"]
    assert of(actions, Log)[0].fields == {"input": "TwilioStart", "state": "live"}
    assert call.stream_sid == SID


def test_settings_applied_out_of_order_is_ignored() -> None:
    call = started_call()
    actions = feed(call, AgentSettingsApplied())
    assert [log.event for log in of(actions, Log)] == ["event_out_of_order"]
    assert call.state is CallState.CONNECTING_AGENT


def test_bridge_shutdown_and_failure_end_call_with_their_own_outcomes() -> None:
    assert of(feed(ready_call(), BridgeShuttingDown()), EndCall)[0].outcome is Outcome.BRIDGE_SHUTDOWN
    assert of(feed(ready_call(), BridgeFailed("boom")), EndCall)[0].outcome is Outcome.BRIDGE_ERROR
    # before the stream is a call, the same events refuse it instead
    assert of(feed(make_call(), BridgeShuttingDown()), EndCall)[0].outcome is RejectReason.SHUTTING_DOWN


def test_linear16_agent_formats_are_transcoded_both_ways() -> None:
    call = ready_call(agent_input=AudioFormat("linear16", 16000), agent_output=AudioFormat("linear16", 16000))
    sent = of(feed(call, *[TwilioMedia(b"\xff" * 160, SID)] * 50), SendToAgent)
    relayed = sum(len(a.data) for a in sent)  # 1 s at 16 kHz, 2 bytes a sample, less what soxr holds
    assert 32000 - 2 * int(0.12 * 16000) <= relayed <= 32000
    # the session is lost: what the resampler held goes first to the next one, nothing is lost
    feed(call, AgentClosed(1006, ""), Tick(), now=2.0)
    resent = of(feed(call, AgentConnected(), AgentWelcome("req-2"), AgentSettingsApplied(), now=2.5), SendToAgent)
    audio = sum(len(a.data) for a in resent if isinstance(a.data, bytes))
    assert abs(relayed + audio - 32000) <= 4
    # the agent's utterance: its tail comes out at AgentAudioDone, before the mark
    actions = feed(call, *[AgentAudio(b"\x00\x00" * 320)] * 50, AgentAudioDone(), now=3.0)
    media = of(actions, SendMedia)
    heard = sum(len(base64.b64decode(json.loads(m.text)["media"]["payload"])) for m in media)
    assert abs(heard - 8000) <= 2  # 1 s of mu-law at 8 kHz
    assert isinstance(actions[-1], SendMark)


def test_summary_reports_the_call() -> None:
    call = ready_call()
    feed(call, AgentStartedSpeaking(total_latency=0.8), AgentAudio(b"a" * 160), AgentAudioDone())
    feed(call, TwilioMedia(b"b" * 160, SID), TwilioStop(SID), now=3.0)
    summary = call.summary(3.0)
    assert summary["outcome"] == "caller_hangup" and summary["ended_by"] == "caller"
    assert summary["turns"] == 1 and summary["agent_bytes"] == 160 and summary["caller_bytes"] == 160
    assert summary["agent_latency_avg_s"] == 0.8
    assert summary["duration_s"] == 3.0


@pytest.mark.parametrize(
    "event",
    [
        TwilioMark("x"),
        TwilioDtmf("1"),
        TwilioStop(),
        AgentAudioDone(),
        AgentUserStartedSpeaking(),
        AgentSettingsApplied(),
        AgentWelcome("r"),
        AgentClosed(),
        Tick(),
    ],
)
def test_any_event_before_start_is_safe(event: Event) -> None:
    call = make_call()
    feed(call, event)  # must not raise
    if not call.ended:
        feed(call, TwilioStart(SID, CALL))
        assert of(feed(call, StreamTokenAccepted()), ConnectAgent) == [ConnectAgent()]


def test_measurements_for_metrics() -> None:
    call = make_call()
    feed(call, TwilioStart(SID, CALL), StreamTokenAccepted(), AgentConnected(), AgentWelcome("r"), now=1.0)
    ready = feed(call, AgentSettingsApplied(), now=1.25)
    assert Measure("agent_connect", 0.25) in ready
    latencies = feed(call, AgentStartedSpeaking(total_latency=0.9, tts_latency=0.2, ttt_latency=0.7))
    assert {(m.label, m.value) for m in of(latencies, Measure)} == {("total", 0.9), ("tts", 0.2), ("ttt", 0.7)}
    assert Measure("barge_ins") in feed(call, AgentUserStartedSpeaking())
    assert Measure("agent_warnings", 1, "W1") in feed(call, AgentWarning("W1", ""))
    assert Measure("agent_errors", 1, "E1") in feed(call, AgentError("E1", ""))
