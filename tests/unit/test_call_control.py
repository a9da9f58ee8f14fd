"""Call control in the core: the functions the agent calls, hang-up and transfer after the
goodbye, the keypad, the silence check-in and the time limit. Simulated time, no sockets."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from app.core.actions import Action, EndCall, HangUpCall, Log, RedirectCall, RunFunction, SendMark, SendToAgent
from app.core.call import Call
from app.core.call_control import END_CALL, TRANSFER_CALL, builtin_functions, with_functions
from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentConnected,
    AgentConversationText,
    AgentFunctionCallRequest,
    AgentInjectionRefused,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentUserStartedSpeaking,
    AgentWelcome,
    CallUpdated,
    CallUpdateFailed,
    Event,
    FunctionCall,
    FunctionDone,
    StreamTokenAccepted,
    Tick,
    TwilioDtmf,
    TwilioMark,
    TwilioStart,
    TwilioStop,
)
from app.core.options import CallOptions, Telephony, ToolSpec
from app.core.states import CallState
from app.core.vocabulary import Outcome, RestResult
from tests.conformance.sdk_oracle import validate_client_message

SID = "MZ" + "a" * 32
CALL = "CA" + "b" * 32
AGENT = {
    "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
    "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "prompt": "Be brief."},
    "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
}
TOOL = ToolSpec("lookup_order", "https://ops.example.com/tools/lookup_order", timeout=5.0)
PHONE = Telephony(
    transfer=(("sales", "+15551230001"), ("support", "sip:support@pbx.example.com")),
    tools=(TOOL,),
    rest_available=True,
)


def live_call(telephony: Telephony = PHONE, now: float = 0.0) -> Call:
    """A live call whose simulated seconds pass without media frames: the dead-stream watchdog
    is off here (its own tests are in test_stream_watchdog.py)."""
    call = Call(CallOptions(agent=AGENT, telephony=replace(telephony, media_timeout=0)), now=now)
    start = TwilioStart(SID, CALL, custom_parameters={"from": "+15550001111", "to": "+15550002222"})
    for event in (start, StreamTokenAccepted(), AgentConnected(), AgentWelcome("r"), AgentSettingsApplied()):
        call.handle(event, now)
    assert call.state is CallState.LIVE
    return call


def feed(call: Call, *events: Event, now: float) -> list[Action]:
    out: list[Action] = []
    for event in events:
        out += call.handle(event, now)
    return out


def request(*functions: tuple[str, str, str]) -> AgentFunctionCallRequest:
    return AgentFunctionCallRequest(tuple(FunctionCall(i, name, args, True) for i, name, args in functions))


def responses(actions: list[Action]) -> dict[str, dict[str, Any]]:
    """FunctionCallResponse messages by id, each checked against deepgram-sdk's model."""
    found = {}
    for action in actions:
        if isinstance(action, SendToAgent) and isinstance(action.data, str):
            msg = json.loads(action.data)
            if msg["type"] == "FunctionCallResponse":
                validate_client_message(msg)
                found[msg["id"]] = msg
    return found


def injections(actions: list[Action]) -> list[dict[str, Any]]:
    out = []
    for action in actions:
        if isinstance(action, SendToAgent) and isinstance(action.data, str):
            msg = json.loads(action.data)
            if msg["type"].startswith("Inject"):
                validate_client_message(msg)
                out.append(msg)
    return out


def say(call: Call, now: float) -> str:
    """The agent speaks one utterance; returns the mark Twilio will return once it played."""
    actions = feed(call, AgentStartedSpeaking(), AgentAudio(b"\xff" * 800), AgentAudioDone(), now=now)
    return next(a for a in actions if isinstance(a, SendMark)).name


# --- declared to the agent -------------------------------------------------------------------


def test_settings_declare_the_telephony_functions_after_the_profiles_own() -> None:
    own = {"name": "lookup_order", "description": "Find an order", "parameters": {"type": "object", "properties": {}}}
    agent = {**AGENT, "think": {**AGENT["think"], "functions": [own]}}
    call = Call(CallOptions(agent=agent, telephony=PHONE), now=0.0)
    actions = feed(call, TwilioStart(SID, CALL), StreamTokenAccepted(), AgentConnected(), AgentWelcome("r"), now=0.0)
    settings = json.loads(next(a.data for a in actions if isinstance(a, SendToAgent) and isinstance(a.data, str)))
    validate_client_message(settings)
    names = [f["name"] for f in settings["agent"]["think"]["functions"]]
    assert names == ["lookup_order", END_CALL, TRANSFER_CALL]
    transfer = settings["agent"]["think"]["functions"][2]
    assert transfer["parameters"]["properties"]["destination"]["enum"] == ["sales", "support"]


def test_transfer_is_not_offered_without_rest_credentials_nor_to_a_stored_agent() -> None:
    offline = Telephony(transfer=(("sales", "+15551230001"),), rest_available=False)
    assert [f["name"] for f in builtin_functions(offline)] == [END_CALL]
    assert with_functions("stored-agent-id", PHONE) == "stored-agent-id"
    fallbacks = {**AGENT, "think": [AGENT["think"], AGENT["think"]]}
    both = with_functions(fallbacks, Telephony(end_call=True))
    assert isinstance(both, dict) and all(t["functions"][0]["name"] == END_CALL for t in both["think"])


# --- end_call ----------------------------------------------------------------------------


def test_end_call_hangs_up_only_after_the_goodbyes_mark_returns() -> None:
    call = live_call()
    answered = responses(feed(call, request(("f1", END_CALL, '{"reason": "done"}')), now=10.0))
    assert "goodbye" in answered["f1"]["content"]
    mark = say(call, 11.0)  # the goodbye
    for t in (11.5, 12.0, 15.0, 19.5):  # past the grace: the goodbye is still playing
        assert not [a for a in feed(call, Tick(), now=t) if isinstance(a, HangUpCall)]
    feed(call, TwilioMark(mark, SID), now=19.6)
    hang_up = [a for a in feed(call, Tick(), now=19.8) if isinstance(a, HangUpCall)]
    assert hang_up == [HangUpCall(CALL)] and call.state is CallState.HANGING_UP
    ended = [a for a in feed(call, CallUpdated(RestResult.OK), now=20.7) if isinstance(a, EndCall)]
    assert ended[0].outcome is Outcome.COMPLETED
    summary = call.summary(21.0)
    assert summary["ended_by"] == "agent" and summary["hangup_reason"] == "end_call"
    assert "hung up by the bridge" in summary["end_reason"]


def test_end_call_without_a_goodbye_hangs_up_after_the_grace_and_a_stuck_one_after_the_timeout() -> None:
    quiet = live_call()
    feed(quiet, request(("f1", END_CALL, "{}")), now=10.0)
    assert not [a for a in feed(quiet, Tick(), now=13.5) if isinstance(a, HangUpCall)]
    assert [a for a in feed(quiet, Tick(), now=14.0) if isinstance(a, HangUpCall)]
    stuck = live_call()
    feed(stuck, request(("f1", END_CALL, "{}")), now=10.0)
    say(stuck, 10.5)  # its mark never comes back
    assert not [a for a in feed(stuck, Tick(), now=19.5) if isinstance(a, HangUpCall)]
    assert [a for a in feed(stuck, Tick(), now=20.0) if isinstance(a, HangUpCall)]


def test_a_failed_hang_up_still_ends_the_call_and_twilios_stop_counts_as_done() -> None:
    failed = live_call()
    feed(failed, request(("f1", END_CALL, "{}")), Tick(), now=10.0)
    feed(failed, Tick(), now=15.0)
    actions = feed(failed, CallUpdateFailed("Twilio error 20003: HTTP 401"), now=15.5)
    assert [a.outcome for a in actions if isinstance(a, EndCall)] == [Outcome.COMPLETED]
    assert "Twilio refused" in failed.end_reason and any(
        isinstance(a, Log) and a.event == "call_update_failed" for a in actions
    )
    stopped = live_call()
    feed(stopped, request(("f1", END_CALL, "{}")), now=10.0)
    feed(stopped, Tick(), now=15.0)
    assert [a.outcome for a in feed(stopped, TwilioStop(SID), now=15.2) if isinstance(a, EndCall)] == [
        Outcome.COMPLETED
    ]


def test_a_second_end_call_is_answered_not_doubled() -> None:
    call = live_call()
    feed(call, request(("f1", END_CALL, "{}")), now=1.0)
    again = responses(feed(call, request(("f2", END_CALL, "{}")), now=1.1))
    assert again["f2"]["content"] == "The call is already ending."


# --- transfer ----------------------------------------------------------------------------


def test_transfer_to_an_unlisted_name_is_refused_naming_the_allowed_ones_and_nothing_is_dialled() -> None:
    call = live_call()
    actions = feed(call, request(("t1", TRANSFER_CALL, '{"destination": "+15559999999"}')), now=1.0)
    content = responses(actions)["t1"]["content"]
    assert "sales, support" in content and "no transfer destination" in content
    for t in range(2, 30):
        actions += feed(call, Tick(), now=float(t))
    assert not [a for a in actions if isinstance(a, RedirectCall | HangUpCall)] and call.state is CallState.LIVE


def test_transfer_to_a_listed_name_dials_exactly_that_number_after_the_announcement() -> None:
    call = live_call()
    feed(call, request(("t1", TRANSFER_CALL, '{"destination": "sales"}')), now=1.0)
    mark = say(call, 2.0)
    assert not [a for a in feed(call, Tick(), now=2.5) if isinstance(a, RedirectCall)]
    feed(call, TwilioMark(mark, SID), now=3.0)
    transfer = [a for a in feed(call, Tick(), now=3.5) if isinstance(a, RedirectCall)]
    assert transfer == [
        RedirectCall(
            CALL,
            '<?xml version="1.0" encoding="UTF-8"?><Response><Dial><Number>+15551230001</Number></Dial></Response>',
        )
    ]
    ended = [a for a in feed(call, TwilioStop(SID), now=4.0) if isinstance(a, EndCall)]
    assert ended[0].outcome is Outcome.TRANSFERRED and call.summary(4.0)["transferred_to"] == "sales"


def test_a_transfer_twilio_refuses_ends_as_the_bridges_error() -> None:
    call = live_call()
    feed(call, request(("t1", TRANSFER_CALL, '{"destination": "support"}')), now=1.0)
    actions = feed(call, Tick(), now=5.5)
    assert "<Sip>sip:support@pbx.example.com</Sip>" in next(a.twiml for a in actions if isinstance(a, RedirectCall))
    ended = [a for a in feed(call, CallUpdateFailed("Twilio error 21220"), now=6.0) if isinstance(a, EndCall)]
    assert ended[0].outcome is Outcome.BRIDGE_ERROR and "failed" in call.end_reason


# --- operator tools and the runner's promises -------------------------------------------------


def test_two_functions_in_one_request_are_each_answered_with_their_id() -> None:
    call = live_call()
    actions = feed(call, request(("a", "lookup_order", '{"order": 42}'), ("b", "no_such_thing", "{}")), now=1.0)
    run = [a for a in actions if isinstance(a, RunFunction)]
    assert run == [
        RunFunction(
            "a",
            "lookup_order",
            TOOL.url,
            {
                "call_sid": CALL,
                "from": "+15550001111",
                "to": "+15550002222",
                "function": "lookup_order",
                "arguments": {"order": 42},
            },
            5.0,
        )
    ]
    assert "There is no function called no_such_thing" in responses(actions)["b"]["content"]
    done = responses(feed(call, FunctionDone("a", "lookup_order", '{"status":"shipped"}'), now=1.5))
    assert done["a"] == {
        "type": "FunctionCallResponse",
        "id": "a",
        "name": "lookup_order",
        "content": '{"status":"shipped"}',
    }


def test_bad_arguments_are_answered_in_words_and_no_tool_runs() -> None:
    call = live_call()
    actions = feed(call, request(("a", "lookup_order", "{not json")), now=1.0)
    assert not [a for a in actions if isinstance(a, RunFunction)]
    assert "not valid JSON" in responses(actions)["a"]["content"]


def test_a_slow_tool_gets_a_hold_message_then_a_timeout_answer_and_its_late_result_is_dropped() -> None:
    call = live_call()
    feed(call, request(("a", "lookup_order", "{}")), now=1.0)
    assert injections(feed(call, Tick(), now=2.5)) == []
    hold = injections(feed(call, Tick(), now=3.0))
    assert hold == [{"type": "InjectAgentMessage", "message": PHONE.hold_message}]
    assert injections(feed(call, Tick(), now=4.0)) == []  # once per request
    timed_out = responses(feed(call, Tick(), now=6.0))
    assert timed_out["a"]["content"] == "lookup_order did not answer within 5 seconds."
    late = feed(call, FunctionDone("a", "lookup_order", "too late"), now=7.0)
    assert responses(late) == {}  # one answer per request, never two


def test_a_barge_in_clear_is_not_held_up_by_a_running_tool() -> None:
    call = live_call()
    feed(call, request(("a", "lookup_order", "{}")), AgentStartedSpeaking(), AgentAudio(b"\xff" * 160), now=1.0)
    actions = feed(call, AgentUserStartedSpeaking(), now=1.1)
    assert type(actions[0]).__name__ == "ClearTwilio"  # the core's first action, tool or not


# --- keypad ------------------------------------------------------------------------------


def test_keypad_digits_reach_the_agent_as_one_message_per_burst() -> None:
    call = live_call()
    for i, digit in enumerate("1234"):
        assert injections(feed(call, TwilioDtmf(digit, SID), now=1.0 + i * 0.3)) == []
    assert injections(feed(call, Tick(), now=3.3)) == []  # 1.4 s after the last digit
    assert injections(feed(call, Tick(), now=3.5)) == [
        {"type": "InjectUserMessage", "content": "The caller pressed 1 2 3 4"}
    ]
    feed(call, TwilioDtmf("9", SID), now=5.0)
    assert injections(feed(call, TwilioDtmf("#", SID), now=5.2)) == [
        {"type": "InjectUserMessage", "content": "The caller pressed 9 #"}
    ]
    off = live_call(Telephony(dtmf=False))
    assert injections(feed(off, TwilioDtmf("1", SID), TwilioDtmf("#", SID), Tick(), now=9.0)) == []


# --- silence and the time limit ---------------------------------------------------------------


def test_silence_gets_a_check_in_then_a_goodbye_then_the_hang_up() -> None:
    call = live_call(Telephony(silence_check_in=15.0))
    mark = say(call, 1.0)
    feed(call, TwilioMark(mark, SID), now=2.0)
    assert injections(feed(call, Tick(), now=15.5)) == []  # 14.5 s since the agent last spoke
    check_in = injections(feed(call, Tick(), now=16.5))
    assert check_in == [{"type": "InjectAgentMessage", "message": "Are you still there?"}]
    mark = say(call, 17.0)  # the check-in, spoken; nobody answers
    feed(call, TwilioMark(mark, SID), now=19.0)
    assert injections(feed(call, Tick(), now=31.5)) == []
    goodbye = injections(feed(call, Tick(), now=32.5))
    assert goodbye[0]["message"].endswith("Goodbye!")
    mark = say(call, 33.0)
    feed(call, TwilioMark(mark, SID), now=35.0)
    assert [a for a in feed(call, Tick(), now=35.5) if isinstance(a, HangUpCall)]
    feed(call, CallUpdated(RestResult.NO_CREDENTIALS), now=36.0)
    summary = call.summary(36.0)
    assert (
        summary["outcome"] == "completed" and summary["hangup_reason"] == "silence" and summary["ended_by"] == "bridge"
    )


def test_the_caller_speaking_undoes_the_check_in() -> None:
    call = live_call(Telephony(silence_check_in=15.0))
    feed(call, Tick(), now=16.0)  # check-in sent
    feed(call, AgentUserStartedSpeaking(), AgentConversationText("user", "yes I'm here"), now=18.0)
    assert injections(feed(call, Tick(), now=32.0)) == []
    assert injections(feed(call, Tick(), now=33.5))[0]["message"] == "Are you still there?"  # a check-in again


def test_max_duration_says_the_time_limit_and_hangs_up() -> None:
    call = live_call(Telephony(max_call=60.0, silence_check_in=0))
    assert injections(feed(call, Tick(), now=59.5)) == []
    limit = injections(feed(call, Tick(), now=60.0))
    assert "time limit" in limit[0]["message"]
    assert [a for a in feed(call, Tick(), now=70.0) if isinstance(a, HangUpCall)]
    assert call.summary(70.0)["outcome"] == "in_progress"  # until Twilio answers
    feed(call, CallUpdated(RestResult.OK), now=70.5)
    assert call.summary(71.0)["hangup_reason"] == "max_duration"


def test_a_refused_injection_goes_again_at_the_next_quiet_moment() -> None:
    call = live_call(Telephony(silence_check_in=15.0))
    first = injections(feed(call, Tick(), now=16.0))
    feed(call, AgentInjectionRefused("user is speaking"), AgentStartedSpeaking(), AgentAudio(b"\xff" * 160), now=16.2)
    assert injections(feed(call, Tick(), now=16.5)) == []  # the agent is speaking: not now
    mark = next(a for a in feed(call, AgentAudioDone(), now=16.6) if isinstance(a, SendMark)).name
    feed(call, TwilioMark(mark, SID), now=17.0)
    assert injections(feed(call, Tick(), now=17.5)) == first


@pytest.mark.parametrize("state_after", ["hanging_up", "transferring"])
def test_functions_are_still_answered_while_the_call_hands_off(state_after: str) -> None:
    call = live_call()
    name = END_CALL if state_after == "hanging_up" else TRANSFER_CALL
    feed(call, request(("x", name, '{"destination": "sales"}')), now=1.0)
    feed(call, Tick(), now=6.0)
    assert call.state.value == state_after
    assert "already ending" in responses(feed(call, request(("y", END_CALL, "{}")), now=6.5))["y"]["content"]
