"""An operator steering a live call, in the core: each action's message to the agent (checked
against deepgram-sdk's models), what a call refuses and why, the confirmations, the audit
(log, metric, record), and the live events the console follows. Simulated time, no sockets."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from app.core.actions import Action, HangUpCall, Log, Measure, Notify, RedirectCall, SendMark, SendToAgent
from app.core.call import Call
from app.core.call_control import SteerProblem
from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentConversationText,
    AgentInfo,
    AgentInjectionRefused,
    AgentStartedSpeaking,
    AgentUserStartedSpeaking,
    CallUpdated,
    OperatorCommand,
    Tick,
    TwilioMark,
    TwilioMedia,
    TwilioStop,
)
from app.core.options import OPERATOR_GOODBYE, CallOptions, Telephony
from app.core.response_timer import LOUD_SAMPLES, QUIET_BYTES, TURN_MIN_FRAMES, ResponseTimer
from app.core.states import CallState
from app.core.vocabulary import LiveEventType, MetricName, OperatorAction, Outcome, RestResult
from tests.conformance.sdk_oracle import validate_client_message
from tests.unit.test_call_control import AGENT, PHONE, feed, live_call

SILENT = b"\xff" * 160
LOUD = b"\x00" * 160  # mu-law 0x00: the loudest negative sample


def to_agent(actions: list[Action]) -> list[dict[str, Any]]:
    return [json.loads(a.data) for a in actions if isinstance(a, SendToAgent) and isinstance(a.data, str)]


def notes(actions: list[Action], kind: LiveEventType | None = None) -> list[Notify]:
    return [a for a in actions if isinstance(a, Notify) and (kind is None or a.type is kind)]


def command(action: OperatorAction, action_id: str = "op_1", **fields: Any) -> OperatorCommand:
    return OperatorCommand(action, action_id, **fields)


@pytest.mark.parametrize(
    ("cmd", "sent"),
    [
        (command(OperatorAction.SAY, text="Hold on."), {"type": "InjectAgentMessage", "message": "Hold on."}),
        (command(OperatorAction.INSTRUCT, text="Be kind."), {"type": "UpdatePrompt", "prompt": "Be kind."}),
        (command(OperatorAction.AS_CALLER, text="Hi <b>"), {"type": "InjectUserMessage", "content": "Hi <b>"}),
        (
            command(OperatorAction.VOICE, speak={"provider": {"type": "deepgram", "model": "aura-2-apollo-en"}}),
            {"type": "UpdateSpeak", "speak": {"provider": {"type": "deepgram", "model": "aura-2-apollo-en"}}},
        ),
    ],
)
def test_each_action_sends_exactly_its_message_and_is_audited(cmd: OperatorCommand, sent: dict[str, Any]) -> None:
    call = live_call()
    assert call.steer_refusal(cmd) is None
    actions = call.handle(cmd, 5.0)
    assert to_agent(actions) == [sent]
    validate_client_message(sent)  # deepgram-sdk's own model takes it
    assert Measure(MetricName.OPERATOR_ACTIONS, 1, cmd.action.value) in actions
    audit = next(a for a in actions if isinstance(a, Log) and a.event == "operator_action")
    assert audit.fields["action"] == cmd.action.value and "text" not in audit.fields  # no LOG_TRANSCRIPTS
    (event,) = notes(actions, LiveEventType.ACTION)
    assert event.fields == {"action": cmd.action.value, "action_id": "op_1", "result": "sent"}
    recorded = {"action": cmd.action.value, "action_id": "op_1", "at": 5.0, "result": "sent"}
    if cmd.text:  # these options keep the transcript for the record: the text goes with it
        recorded["text"] = cmd.text
    assert call.summary(6.0)["operator_actions"] == [recorded]


def test_the_text_is_logged_and_recorded_only_where_transcripts_are_allowed() -> None:
    call = Call(CallOptions(agent=AGENT, telephony=PHONE, log_transcripts=True, record_transcript=True), now=0.0)
    live = live_call()
    call.__dict__.update({k: v for k, v in live.__dict__.items() if k not in ("options",)})
    call.control._options = call.options  # the options that allow it
    actions = call.handle(command(OperatorAction.SAY, text="Card ending 4242?"), 1.0)
    audit = next(a for a in actions if isinstance(a, Log) and a.event == "operator_action")
    assert audit.fields["text"] == "Card ending 4242?"
    assert call.summary(2.0)["operator_actions"][0]["text"] == "Card ending 4242?"


def test_instruct_and_voice_are_confirmed_by_the_agents_answers_in_order() -> None:
    call = live_call()
    call.handle(command(OperatorAction.INSTRUCT, "op_a", text="one"), 1.0)
    call.handle(command(OperatorAction.VOICE, "op_b", speak={"provider": {"type": "deepgram"}}), 1.0)
    call.handle(command(OperatorAction.INSTRUCT, "op_c", text="two"), 1.0)
    first = notes(call.handle(AgentInfo("PromptUpdated", {"type": "PromptUpdated"}), 2.0), LiveEventType.ACTION)
    assert [n.fields["action_id"] for n in first] == ["op_a"] and first[0].fields["result"] == "confirmed"
    voice = notes(call.handle(AgentInfo("SpeakUpdated", {"type": "SpeakUpdated"}), 2.0), LiveEventType.ACTION)
    assert [n.fields["action_id"] for n in voice] == ["op_b"]
    second = notes(call.handle(AgentInfo("PromptUpdated", {"type": "PromptUpdated"}), 2.0), LiveEventType.ACTION)
    assert [n.fields["action_id"] for n in second] == ["op_c"]
    assert notes(call.handle(AgentInfo("PromptUpdated", {"type": "PromptUpdated"}), 2.0)) == []  # nothing waits
    results = [a["result"] for a in call.summary(3.0)["operator_actions"]]
    assert results == ["confirmed", "confirmed", "confirmed"]


def test_a_refused_say_is_reported_and_said_again_at_the_next_quiet_moment() -> None:
    call = live_call()
    call.handle(command(OperatorAction.SAY, "op_s", text="Still there?"), 1.0)
    refused = notes(call.handle(AgentInjectionRefused("User is speaking"), 1.1), LiveEventType.ACTION)
    assert refused[0].fields["result"] == "refused_retrying"
    again = call.handle(Tick(), 1.5)
    assert to_agent(again) == [{"type": "InjectAgentMessage", "message": "Still there?"}]
    assert notes(again, LiveEventType.ACTION)[0].fields == {"action": "say", "action_id": "op_s", "result": "sent"}


def test_hang_up_says_goodbye_then_completes_the_call_as_the_operators() -> None:
    call = live_call()
    actions = call.handle(command(OperatorAction.HANG_UP, "op_h"), 1.0)
    assert to_agent(actions) == [{"type": "InjectAgentMessage", "message": OPERATOR_GOODBYE}]
    assert call.steer_refusal(command(OperatorAction.HANG_UP)) == (SteerProblem.NOT_NOW, "the call is already ending")
    spoken = feed(call, AgentStartedSpeaking(None, None, None), AgentAudio(b"\xff" * 800), AgentAudioDone(), now=1.2)
    (mark,) = [a.name for a in spoken if isinstance(a, SendMark)]
    feed(call, TwilioMark(mark, call.stream_sid), now=2.0)  # the goodbye's mark came back: it was heard
    actions = call.handle(Tick(), 2.5)
    assert any(isinstance(a, HangUpCall) for a in actions)
    assert call.state is CallState.HANGING_UP
    feed(call, CallUpdated(RestResult.OK), now=3.0)
    summary = call.summary(3.0)
    assert summary["outcome"] == Outcome.COMPLETED.value
    assert summary["ended_by"] == "operator" and summary["hangup_reason"] == "operator"


def test_transfer_only_to_a_listed_destination_and_only_with_rest() -> None:
    call = live_call()
    problem = call.steer_refusal(command(OperatorAction.TRANSFER, destination="nobody"))
    assert problem is not None and problem[0] is SteerProblem.INVALID and "sales" in problem[1]
    offline = live_call(replace(PHONE, rest_available=False))
    problem = offline.steer_refusal(command(OperatorAction.TRANSFER, destination="sales"))
    assert problem is not None and problem[0] is SteerProblem.NOT_NOW and "REST" in problem[1]
    call.handle(command(OperatorAction.TRANSFER, destination="sales"), 1.0)
    actions = call.handle(Tick(), 1.0 + 11.0)  # no goodbye audio at all: the hand-off's own deadline
    assert any(isinstance(a, RedirectCall) and "+15551230001" in a.twiml for a in actions)
    feed(call, CallUpdated(RestResult.OK), now=13.0)
    assert call.summary(13.0)["ended_by"] == "operator"


def test_nothing_replaces_a_goodbye_once_the_call_is_ending() -> None:
    call = live_call()
    call.handle(command(OperatorAction.HANG_UP), 1.0)
    for action in (OperatorAction.SAY, OperatorAction.INSTRUCT, OperatorAction.TRANSFER):
        problem = call.steer_refusal(command(action, text="x", destination="sales"))
        assert problem == (SteerProblem.NOT_NOW, "the call is already ending")


def test_a_call_that_is_not_live_takes_no_command() -> None:
    call = Call(CallOptions(agent=AGENT, telephony=Telephony()), now=0.0)
    problem = call.steer_refusal(command(OperatorAction.SAY, text="x"))
    assert problem is not None and problem[0] is SteerProblem.NOT_NOW and "awaiting_start" in problem[1]


def test_live_events_follow_the_call() -> None:
    call = live_call()
    spoken = feed(call, AgentStartedSpeaking(None, None, None), AgentAudio(b"\xff" * 320), AgentAudioDone(), now=1.0)
    assert [n.type for n in notes(spoken)] == [LiveEventType.AGENT_SPEAKING, LiveEventType.AGENT_DONE]
    feed(call, AgentStartedSpeaking(None, None, None), AgentAudio(b"\xff" * 320), now=2.0)
    barge = call.handle(AgentUserStartedSpeaking(), 2.1)
    assert [n.type for n in notes(barge)] == [LiveEventType.BARGE_IN]
    # transcripts only where they may be shown
    assert notes(call.handle(AgentConversationText("user", "my PIN is 1234"), 2.2)) == []
    shown = live_call()
    shown.options = replace(shown.options, console_transcripts=True)
    text = notes(shown.handle(AgentConversationText("user", "hello"), 1.0))
    assert [(n.type, n.fields) for n in text] == [(LiveEventType.TRANSCRIPT, {"role": "user", "text": "hello"})]
    ended = call.handle(TwilioStop(call.stream_sid), 3.0)
    assert [(n.type, n.fields) for n in notes(ended)] == [(LiveEventType.ENDED, {"outcome": "caller_hangup"})]


def test_state_changes_are_events() -> None:
    call = Call(CallOptions(agent=AGENT, telephony=replace(PHONE, media_timeout=0)), now=0.0)
    from app.core.events import AgentConnected, AgentSettingsApplied, AgentWelcome, StreamTokenAccepted, TwilioStart

    states = []
    for event in (
        TwilioStart("MZ" + "a" * 32, "CA" + "b" * 32),
        StreamTokenAccepted(),
        AgentConnected(),
        AgentWelcome("r"),
        AgentSettingsApplied(),
    ):
        states += [n.fields["state"] for n in notes(call.handle(event, 0.0), LiveEventType.STATE)]
    assert states == ["checking_token", "connecting_agent", "awaiting_welcome", "awaiting_settings_applied", "live"]


def test_the_response_time_runs_from_the_end_of_caller_speech_to_the_replys_first_audio() -> None:
    call = live_call()
    sid = call.stream_sid
    t = 1.0
    for _ in range(20):  # 400 ms of speech
        call.handle(TwilioMedia(LOUD, sid), t)
        t += 0.02
    end_of_speech = t - 0.02
    for _ in range(30):  # 600 ms of silence: the agent thinks
        call.handle(TwilioMedia(SILENT, sid), t)
        t += 0.02
    call.handle(AgentStartedSpeaking(None, None, None), t)
    actions = call.handle(AgentAudio(b"\xff" * 320), t)
    expected = round((t - end_of_speech) * 1000)
    assert Measure(MetricName.RESPONSE_LATENCY, expected / 1000) in actions
    assert notes(actions, LiveEventType.LATENCY)[0].fields == {"response_ms": expected}
    # the rest of the reply is not another response; nor is a reply to no speech
    assert notes(call.handle(AgentAudio(b"\xff" * 320), t + 0.1), LiveEventType.LATENCY) == []
    call.handle(AgentAudioDone(), t + 0.2)
    call.handle(AgentStartedSpeaking(None, None, None), t + 5.0)
    assert notes(call.handle(AgentAudio(b"\xff" * 320), t + 5.0), LiveEventType.LATENCY) == []
    assert call.summary(t + 6)["response_ms"] == [expected]


def test_a_barge_in_or_sparse_noise_makes_no_response_time() -> None:
    timer = ResponseTimer()
    timer.reply_started()
    timer.agent_audio(0.0)  # the greeting
    for i in range(10):  # the caller talks over it: a barge-in
        timer.caller_frame(LOUD, 1.0 + i * 0.02)
    timer.cut_short()
    assert timer.agent_audio(1.3) is None  # what still arrives of the cut reply answers nothing
    timer.reply_started()
    assert timer.agent_audio(2.0) is not None  # the reply to the interruption does
    for i in range(6):  # a click every few seconds: never a turn
        timer.caller_frame(LOUD, 10.0 + i * 3.0)
    timer.reply_started()
    assert timer.agent_audio(40.0) is None
    for i in range(TURN_MIN_FRAMES):  # speech long before a check-in: not answered by it
        timer.caller_frame(LOUD, 50.0 + i * 0.02)
    timer.reply_started()
    assert timer.agent_audio(75.0) is None
    assert timer.responses_ms == [round((2.0 - 1.18) * 1000)]


def test_the_detector_ignores_clicks_and_hiss() -> None:
    timer = ResponseTimer()
    hiss = bytes([0xFE, 0x7E] * 80)  # the quietest non-zero samples
    click = LOUD[: LOUD_SAMPLES - 1] + SILENT[LOUD_SAMPLES - 1 :]
    for i in range(100):
        timer.caller_frame(hiss if i % 2 else click, i * 0.02)
    timer.reply_started()
    assert timer.agent_audio(3.0) is None
    assert 90 <= len(QUIET_BYTES) <= 110 and 0xFF in QUIET_BYTES and 0x00 not in QUIET_BYTES
    for i in range(TURN_MIN_FRAMES):
        timer.caller_frame(LOUD, 4.0 + i * 0.02)
    timer.reply_started()
    assert timer.agent_audio(5.0) == round((5.0 - (4.0 + (TURN_MIN_FRAMES - 1) * 0.02)) * 1000)


def test_latency_report_fields_become_metrics() -> None:
    call = live_call()
    body = {"type": "LatencyReport", "ttt_token_latency": 0.4, "tts_latency": 0.2, "bogus": 1, "total_latency": "x"}
    actions = call.handle(AgentInfo("LatencyReport", body), 1.0)
    measured = {(a.label, a.value) for a in actions if isinstance(a, Measure)}
    assert measured == {("ttt_token_latency", 0.4), ("tts_latency", 0.2)}
