"""The call's state machine swept whole: every (state x event) pair, the table's own rules,
the playback machine, and the pre-buffer limits for every profile the config accepts."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from app.codecs import TWILIO_FORMAT, AudioFormat
from app.core.actions import (
    Action,
    ClearTwilio,
    ConnectAgent,
    EndCall,
    RedeemStreamToken,
    SendMark,
    SendMedia,
    SendToAgent,
)
from app.core.call import _HANDLERS, Call
from app.core.endings import close_code
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
    AgentInjectionRefused,
    AgentInvalid,
    AgentReadyDeadlinePassed,
    AgentRetryDue,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentThinking,
    AgentUnavailable,
    AgentUnknown,
    AgentUserStartedSpeaking,
    AgentWarning,
    AgentWelcome,
    AmdVerdict,
    BridgeFailed,
    BridgeShuttingDown,
    CalleeAnswered,
    CallGone,
    CallUpdated,
    CallUpdateDeadlinePassed,
    CallUpdateFailed,
    Event,
    FunctionCall,
    FunctionDone,
    HangUpDue,
    KeepAliveDue,
    MediaDeadlinePassed,
    OperatorCommand,
    OutboxFull,
    RecordingFailed,
    RecordingStarted,
    StartDeadlinePassed,
    StreamEvicted,
    StreamOverCapacity,
    StreamTokenAccepted,
    StreamTokenRefused,
    Tick,
    TransferDue,
    TwilioBadStart,
    TwilioClosed,
    TwilioConnected,
    TwilioDtmf,
    TwilioFrameTooLarge,
    TwilioInvalid,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
)
from app.core.options import AGENT_BACKLOG_SECONDS, FRAMES_PER_SECOND, CallOptions, OutboundSpec, Telephony
from app.core.states import (
    ACCEPTED_STATES,
    DEADLINES,
    HANDLER_MOVES,
    PLAYBACK_TRANSITIONS,
    TRANSITIONS,
    CallState,
    PlaybackInput,
    PlaybackState,
    _row,
)
from app.core.vocabulary import HangupReason, InvalidKind, OperatorAction, Outcome, Overflow, RejectReason, RestResult

SID = "MZ" + "a" * 32
CALL = "CA" + "b" * 32

SAMPLES: dict[type[Any], Event] = {
    TwilioConnected: TwilioConnected(),
    TwilioStart: TwilioStart(SID, CALL),
    TwilioBadStart: TwilioBadStart("callSid missing"),
    TwilioMedia: TwilioMedia(b"\x01" * 160, SID),
    TwilioMark: TwilioMark("agent-audio-1", SID),
    TwilioDtmf: TwilioDtmf("5", SID),
    TwilioStop: TwilioStop(SID),
    TwilioClosed: TwilioClosed(1000),
    TwilioInvalid: TwilioInvalid(InvalidKind.BAD_JSON, "{"),
    StreamTokenAccepted: StreamTokenAccepted(),
    StreamTokenRefused: StreamTokenRefused("reused"),
    AgentConnected: AgentConnected(),
    AgentConnectFailed: AgentConnectFailed("HTTP 429"),
    AgentWelcome: AgentWelcome("req"),
    AgentSettingsApplied: AgentSettingsApplied(),
    AgentAudio: AgentAudio(b"\x02" * 160),
    AgentUserStartedSpeaking: AgentUserStartedSpeaking(),
    AgentStartedSpeaking: AgentStartedSpeaking(total_latency=0.5),
    AgentAudioDone: AgentAudioDone(),
    AgentConversationText: AgentConversationText("user", "hi"),
    AgentThinking: AgentThinking("hmm"),
    AgentFunctionCallRequest: AgentFunctionCallRequest((FunctionCall("f1", "lookup", "{}", True),)),
    AgentWarning: AgentWarning("W", "w"),
    AgentError: AgentError("E", "e"),
    AgentInfo: AgentInfo("History", {}),
    AgentUnknown: AgentUnknown("Brand new"),
    AgentInvalid: AgentInvalid("bad JSON"),
    AgentClosed: AgentClosed(1011, "bye"),
    BridgeFailed: BridgeFailed("internal error: KeyError"),
    OutboxFull: OutboxFull(Overflow.TWILIO_QUEUE),
    BridgeShuttingDown: BridgeShuttingDown(),
    OperatorCommand: OperatorCommand(OperatorAction.SAY, "op_1", text="One moment."),
    AmdVerdict: AmdVerdict("machine_end_beep", 3200),
    CalleeAnswered: CalleeAnswered("the callee spoke"),
    Tick: Tick(),
    StartDeadlinePassed: StartDeadlinePassed(),
    AgentReadyDeadlinePassed: AgentReadyDeadlinePassed(),
    KeepAliveDue: KeepAliveDue(),
    FunctionDone: FunctionDone("f1", "lookup", "{}"),
    CallUpdated: CallUpdated(RestResult.OK),
    CallUpdateFailed: CallUpdateFailed("Twilio error 20003"),
    RecordingStarted: RecordingStarted("RE" + "1" * 32),
    RecordingFailed: RecordingFailed("Twilio error 21220"),
    CallUpdateDeadlinePassed: CallUpdateDeadlinePassed(),
    HangUpDue: HangUpDue(HangupReason.END_CALL),
    TransferDue: TransferDue("sales", "<Response><Dial>+15551230001</Dial></Response>"),
    AgentInjectionRefused: AgentInjectionRefused("someone is speaking"),
    AgentRetryDue: AgentRetryDue(),
    AgentUnavailable: AgentUnavailable(),
    TwilioFrameTooLarge: TwilioFrameTooLarge(),
    StreamOverCapacity: StreamOverCapacity(),
    StreamEvicted: StreamEvicted(),
    CallGone: CallGone("Twilio 21220: call not in progress"),
    MediaDeadlinePassed: MediaDeadlinePassed(),
}

ALL_EVENT_TYPES = set(typing.get_args(Event))

HANDED_OFF = {CallState.HANGING_UP, CallState.TRANSFERRING, CallState.FALLING_BACK, CallState.ENDING_DEAD_STREAM}
"""States after a REST update was sent: Twilio's answer (or its deadline) ends them."""

LIVE_PATH: list[Event] = [
    TwilioStart(SID, CALL),
    StreamTokenAccepted(),
    AgentConnected(),
    AgentWelcome("r"),
    AgentSettingsApplied(),
]
PLACED = CallOptions(
    agent="id", telephony=Telephony(rest_available=True), outbound=OutboundSpec(voicemail="Please call us back.")
)
"""A call the bridge placed (outbound.py): with the options ``call_in`` gives every call."""
# the events that lead a fresh call to each state, in order
PATH: dict[CallState, list[Event]] = {
    CallState.AWAITING_START: [],
    CallState.CHECKING_TOKEN: [TwilioStart(SID, CALL)],
    CallState.AWAITING_ANSWER: [TwilioStart(SID, CALL), StreamTokenAccepted(PLACED)],
    CallState.CONNECTING_AGENT: [TwilioStart(SID, CALL), StreamTokenAccepted()],
    CallState.AWAITING_WELCOME: [TwilioStart(SID, CALL), StreamTokenAccepted(), AgentConnected()],
    CallState.AWAITING_SETTINGS_APPLIED: [
        TwilioStart(SID, CALL),
        StreamTokenAccepted(),
        AgentConnected(),
        AgentWelcome("r"),
    ],
    CallState.LIVE: [
        TwilioStart(SID, CALL),
        StreamTokenAccepted(),
        AgentConnected(),
        AgentWelcome("r"),
        AgentSettingsApplied(),
    ],
    CallState.HANGING_UP: [*LIVE_PATH, HangUpDue(HangupReason.END_CALL)],
    CallState.TRANSFERRING: [*LIVE_PATH, TransferDue("sales", "<Response/>")],
    CallState.AGENT_DOWN: [*LIVE_PATH, AgentClosed(1011, "lost")],
    CallState.FALLING_BACK: [TwilioStart(SID, CALL), StreamTokenAccepted(), AgentConnectFailed("HTTP 401"), Tick()],
    CallState.ENDING_DEAD_STREAM: [*LIVE_PATH, MediaDeadlinePassed()],  # with REST credentials (call_in)
    CallState.ENDED: [TwilioStop()],
}


def call_in(state: CallState, **options: Any) -> Call:
    options.setdefault("telephony", Telephony(rest_available=True))
    call = Call(CallOptions(agent="id", **options), now=0.0)
    for event in PATH[state]:
        call.handle(event, 0.0)
    assert call.state is state
    return call


def test_every_event_type_has_a_handler_and_a_sample() -> None:
    assert set(_HANDLERS) == ALL_EVENT_TYPES
    assert set(SAMPLES) == ALL_EVENT_TYPES


def test_table_is_about_known_events_and_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(CallState)
    for row in TRANSITIONS.values():
        assert set(row) <= ALL_EVENT_TYPES


def test_outcomes_only_end_accepted_calls_and_reasons_only_refuse_streams() -> None:
    for state, row in TRANSITIONS.items():
        for event_type, target in row.items():
            if isinstance(target, Outcome):
                assert state in ACCEPTED_STATES, (state, event_type)
            if isinstance(target, RejectReason):
                assert state not in ACCEPTED_STATES, (state, event_type)


def test_close_codes_tell_twilio_why() -> None:
    assert close_code(Outcome.CALLER_HANGUP) == close_code(Outcome.FALLBACK) == 1000
    assert close_code(Outcome.BRIDGE_SHUTDOWN) == close_code(RejectReason.SHUTTING_DOWN) == 1001
    assert close_code(RejectReason.BAD_TOKEN) == close_code(RejectReason.NO_START) == 1008
    assert close_code(Outcome.BRIDGE_ERROR) == close_code(RejectReason.INTERNAL_ERROR) == 1011
    assert close_code(RejectReason.OVER_CAPACITY) == close_code(RejectReason.EVICTED) == 1013
    assert close_code(Outcome.OVERSIZE_FRAME) == 1009 and close_code(Outcome.STREAM_LOST) == 1000


def test_the_table_cannot_be_changed_at_run_time_nor_list_an_event_twice() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[CallState.LIVE][TwilioStart] = CallState.LIVE  # type: ignore[index]
    with pytest.raises(TypeError):
        TRANSITIONS[CallState.ENDED] = {}  # type: ignore[index]
    with pytest.raises(ValueError, match="TwilioStop listed twice"):
        _row({TwilioStop: Outcome.CALLER_HANGUP}, {TwilioStop: RejectReason.NO_START})


def test_every_live_state_can_end_and_watches_a_deadline() -> None:
    for state in set(CallState) - {CallState.ENDED}:
        row = TRANSITIONS[state]
        for ending in (TwilioStop, TwilioClosed, BridgeFailed, BridgeShuttingDown):
            target = row[ending]
            assert isinstance(target, Outcome | RejectReason), (state, ending)
        # a Twilio socket that stopped reading: refused before a call, the fallback during one,
        # and nothing new once the call is being handed off (the update's deadline ends it)
        stuck = row[OutboxFull]
        if state in (CallState.AWAITING_START, CallState.CHECKING_TOKEN):
            assert stuck is RejectReason.INTERNAL_ERROR
        elif state in HANDED_OFF:
            assert stuck is state and DEADLINES[state] is CallUpdateDeadlinePassed
        else:
            assert stuck is CallState.FALLING_BACK, state
        assert row[Tick] is state
        if state is CallState.AWAITING_ANSWER:  # its time is the callee's (Outbound.due): CalleeAnswered
            assert CalleeAnswered in row and state not in DEADLINES
        else:
            assert DEADLINES[state] in row  # the deadline's event is taken there


def test_every_state_is_reachable_from_a_fresh_call() -> None:
    reached, frontier = {CallState.AWAITING_START}, [CallState.AWAITING_START]
    while frontier:
        here = frontier.pop()
        moves = [to for (start, _), to in HANDLER_MOVES.items() if start is here]
        for target in [*TRANSITIONS[here].values(), *moves]:
            state = target if isinstance(target, CallState) else CallState.ENDED
            if state not in reached:
                reached.add(state)
                frontier.append(state)
    assert reached == set(CallState)


@pytest.mark.parametrize("state", list(CallState), ids=lambda s: s.value)
@pytest.mark.parametrize("event_type", sorted(ALL_EVENT_TYPES, key=lambda t: t.__name__), ids=lambda t: t.__name__)
def test_every_state_event_pair_has_its_defined_outcome(state: CallState, event_type: type[Any]) -> None:
    call = call_in(state)
    before_invalid = call.stats.invalid.get(InvalidKind.OUT_OF_ORDER, 0)
    before_ignored = call.stats.ignored_after_end
    actions: list[Action] = call.handle(SAMPLES[event_type], 100.0)  # late: any deadline has passed
    target = TRANSITIONS[state].get(event_type)
    ends = [a for a in actions if isinstance(a, EndCall)]
    if state is CallState.ENDED:
        assert actions == [] and call.stats.ignored_after_end == before_ignored + 1
    elif target is None:
        assert call.state is state and not ends
        assert call.stats.invalid[InvalidKind.OUT_OF_ORDER] == before_invalid + 1
    elif isinstance(target, Outcome | RejectReason):
        assert call.state is CallState.ENDED and ends == [EndCall(target, call.end_reason, close_code(target))]
        assert actions[-1] == ends[0]  # the end is the last thing asked of the pump
        assert call.end_reason and call.end_reason != event_type.__name__  # said in words
        sends = (SendMedia, SendMark, ClearTwilio, SendToAgent, ConnectAgent, RedeemStreamToken)
        assert not [a for a in actions if isinstance(a, sends)]  # an ending sends nothing
    elif event_type is Tick and MediaDeadlinePassed in TRANSITIONS[state]:  # no media since: a dead stream
        assert call.state is CallState.ENDING_DEAD_STREAM
    elif event_type is Tick and state is CallState.AGENT_DOWN:  # long after the loss: budget spent
        assert call.state is CallState.FALLING_BACK
    elif event_type is AmdVerdict and state is CallState.AWAITING_ANSWER:  # a machine: the message follows
        assert call.state is CallState.CONNECTING_AGENT and call.outbound is not None and call.outbound.voicemail
    elif event_type is Tick:  # a Tick late enough fires the state's own deadline
        expected = TRANSITIONS[state][DEADLINES[state]]
        assert call.state is (expected if isinstance(expected, CallState) else CallState.ENDED)
    else:
        assert call.state is target and not ends


def test_out_of_order_is_logged_once_per_state_and_event() -> None:
    call = call_in(CallState.CONNECTING_AGENT)
    first = call.handle(AgentAudio(b"x"), 1.0)
    assert len(first) == 1 and call.handle(AgentAudio(b"x"), 1.0) == []
    assert call.stats.invalid == {InvalidKind.OUT_OF_ORDER: 2}


def test_playback_table_is_total_and_barge_in_always_returns_to_quiet() -> None:
    for state in PlaybackState:
        assert set(PLAYBACK_TRANSITIONS[state]) == set(PlaybackInput)
        assert PLAYBACK_TRANSITIONS[state][PlaybackInput.BARGE_IN] is PlaybackState.QUIET


def test_playback_states_follow_an_utterance_and_its_mark() -> None:
    call = call_in(CallState.LIVE)
    assert call.playback.state is PlaybackState.QUIET
    call.handle(AgentAudio(b"a" * 160), 1.0)
    assert call.playback.state is PlaybackState.SPEAKING
    call.handle(AgentAudioDone(), 1.0)
    assert call.playback.state is PlaybackState.PLAYING_OUT
    call.handle(TwilioMark("agent-audio-1", SID), 2.0)
    assert call.playback.state is PlaybackState.QUIET
    assert call.stats.barge_ins == 0
    call.handle(AgentUserStartedSpeaking(), 2.5)  # nothing playing: not a barge-in
    assert call.stats.barge_ins == 0
    call.handle(AgentStartedSpeaking(), 3.0)
    call.handle(AgentUserStartedSpeaking(), 3.1)  # the agent was speaking: a barge-in
    assert call.stats.barge_ins == 1 and call.playback.state is PlaybackState.QUIET


# --- limits derived from the profile --------------------------------------------------------


@pytest.mark.parametrize("prebuffer", [0.1, 10.0, 60.0])
@pytest.mark.parametrize(
    "agent_input",
    [TWILIO_FORMAT, AudioFormat("linear16", 16000), AudioFormat("linear16", 11025), AudioFormat("linear16", 8049)],
    ids=str,
)
def test_agent_queue_takes_the_real_prebuffer_flush_for_any_accepted_profile(
    prebuffer: float, agent_input: AudioFormat
) -> None:
    """Fill the pre-buffer to its bound with the caller's 20 ms frames, flush it, and count
    what the flush really puts in the queue (odd sample rates cut frames unevenly)."""
    options = CallOptions(agent="id", agent_input=agent_input, max_prebuffer_seconds=prebuffer)
    call = call_in(CallState.AWAITING_SETTINGS_APPLIED, agent_input=agent_input, max_prebuffer_seconds=prebuffer)
    for i in range(int((prebuffer + 1) * FRAMES_PER_SECOND)):
        call.handle(TwilioMedia(bytes([i % 200]) * 160, SID), 0.0)
    flushed = [a for a in call.handle(AgentSettingsApplied(), 0.0) if isinstance(a, SendToAgent)]
    backlog = int(AGENT_BACKLOG_SECONDS * FRAMES_PER_SECOND)
    assert len(flushed) + backlog <= options.agent_queue_limit


def test_agent_ready_after_40_seconds_delivers_all_buffered_audio_within_the_queue_bound() -> None:
    """The defect: a 60 s pre-buffer and ready timeout were accepted but the agent queue held
    30 s, so a slow agent ended the call instead of getting the caller's audio."""
    options = CallOptions(agent="id", max_prebuffer_seconds=60, agent_ready_timeout=60)
    call = Call(options, now=0.0)
    for event in PATH[CallState.AWAITING_SETTINGS_APPLIED]:
        call.handle(event, 0.0)
    sent: list[bytes] = []
    now = 0.0
    for i in range(40 * FRAMES_PER_SECOND):  # 40 s of 20 ms frames, simulated time
        now = i * 0.02
        frame = (i % 251).to_bytes(1, "big") * 160
        sent.append(frame)
        assert call.handle(TwilioMedia(frame, SID), now) == []
        if i % 25 == 0:
            assert not any(isinstance(a, EndCall) for a in call.handle(Tick(), now))
    flushed = [a.data for a in call.handle(AgentSettingsApplied(), now) if isinstance(a, SendToAgent)]
    assert not call.ended and call.state is CallState.LIVE
    assert b"".join(flushed) == b"".join(sent) and call.stats.caller_bytes_dropped == 0  # nothing lost
    assert len(flushed) <= options.agent_queue_limit


def test_the_watchdog_watches_the_call_until_it_is_handed_off_and_only_then() -> None:
    watched = {state for state, row in TRANSITIONS.items() if MediaDeadlinePassed in row}
    assert watched == ACCEPTED_STATES - HANDED_OFF
    for state in watched:
        assert TRANSITIONS[state][MediaDeadlinePassed] is CallState.ENDING_DEAD_STREAM
    ending = TRANSITIONS[CallState.ENDING_DEAD_STREAM]
    assert {target for target in ending.values() if not isinstance(target, CallState)} == {
        Outcome.STREAM_LOST,
        Outcome.BRIDGE_ERROR,
        Outcome.BRIDGE_SHUTDOWN,
    }
    for state in watched:
        assert TRANSITIONS[state][TwilioFrameTooLarge] is Outcome.OVERSIZE_FRAME


def test_a_call_twilio_says_is_over_ends_as_the_caller_hanging_up_unless_we_were_hanging_up() -> None:
    assert TRANSITIONS[CallState.HANGING_UP][CallGone] is Outcome.COMPLETED
    assert TRANSITIONS[CallState.TRANSFERRING][CallGone] is Outcome.CALLER_HANGUP
    assert TRANSITIONS[CallState.FALLING_BACK][CallGone] is Outcome.CALLER_HANGUP
