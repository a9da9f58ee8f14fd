"""A four-hour call through the core in simulated time (issue 16, item 3): every per-call
collection stays within the bound stated where it is defined, and the call's memory is the
same at hour two as at hour four.

The call is busy the whole time: Twilio's 20 ms frames, a turn every 6 s with agent audio
and its mark, a barge-in every third turn, an operator tool every tenth, Deepgram's History
of function calls, and the agent session lost and restored every half hour.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field

from app.core.actions import Action, ConnectAgent, EndCall, RunFunction, SendMark
from app.core.call import Call
from app.core.conversation import MAX_CONTEXT_MESSAGES, MAX_TRANSCRIPT_TURNS
from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentClosed,
    AgentConnected,
    AgentConversationText,
    AgentFunctionCallRequest,
    AgentInfo,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentUserStartedSpeaking,
    AgentWelcome,
    Event,
    FunctionCall,
    FunctionDone,
    StreamTokenAccepted,
    Tick,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
)
from app.core.options import (
    MAX_OUTSTANDING_MARKS,
    MAX_PENDING_FUNCTIONS,
    MAX_RECONNECT_WAITS_RECORDED,
    MAX_UTTERANCES_RECORDED,
    CallOptions,
    Telephony,
    ToolSpec,
)
from app.core.states import CallState

AGENT = {"listen": {"provider": {"type": "deepgram", "model": "nova-3"}}, "greeting": "hi"}
SID = "MZ" + "a" * 32
CALL_SID = "CA" + "b" * 32
FRAME = b"\xff" * 160
TURN_SECONDS = 6.0
HOUR = 3600.0


@dataclass
class Driver:
    """Plays Twilio, the agent and the pump around one ``Call``: performs the actions that
    need an answer (marks, tools, reconnects) as the real peers would."""

    call: Call
    now: float = 0.0
    turn: int = 0
    marks: list[str] = field(default_factory=list)  # sent, not yet returned

    def feed(self, event: Event) -> list[Action]:
        actions = self.call.handle(event, self.now)
        assert not any(isinstance(a, EndCall) for a in actions), (self.now, self.call.end_reason)
        for action in actions:
            if isinstance(action, SendMark):
                self.marks.append(action.name)
            elif isinstance(action, RunFunction):
                self.call.handle(FunctionDone(action.id, action.name, '{"status":"shipped"}'), self.now)
        return actions

    def caller_speaks(self, seconds: float) -> None:
        """Twilio's frames for ``seconds``, and the pump's ticks between them."""
        for i in range(round(seconds / 0.02)):
            self.feed(TwilioMedia(FRAME, SID))
            if i % 25 == 0:
                self.feed(Tick())
            self.now += 0.02

    def one_turn(self) -> None:
        self.turn += 1
        self.caller_speaks(TURN_SECONDS / 2)
        self.feed(AgentConversationText("user", f"question number {self.turn} about my order"))
        if self.turn % 10 == 0:
            arguments = json.dumps({"order": str(self.turn)})
            self.feed(AgentFunctionCallRequest((FunctionCall(f"fn-{self.turn}", "lookup_order", arguments, True),)))
        if self.turn % 5 == 0:
            calls = [{"id": "x", "name": "lookup_order", "client_side": True, "arguments": "{}", "response": "ok"}]
            self.feed(AgentInfo("History", {"type": "History", "function_calls": calls}))
        self.feed(AgentStartedSpeaking(total_latency=0.8, ttt_latency=0.5, tts_latency=0.3))
        self.feed(AgentConversationText("assistant", f"answer number {self.turn}: it ships tomorrow"))
        for _ in range(10):
            self.feed(AgentAudio(b"\x7f" * 1600))  # 2 s of speech in 200 ms chunks
        self.feed(AgentAudioDone())
        if self.turn % 3 == 0:
            self.caller_speaks(0.5)
            self.feed(AgentUserStartedSpeaking())  # barge-in: Twilio returns the cleared marks
        else:
            self.caller_speaks(TURN_SECONDS / 2 - 0.5)
        while self.marks:
            self.feed(TwilioMark(self.marks.pop(0), SID))
        self.caller_speaks(0.5)

    def lose_and_restore_the_agent(self) -> None:
        self.feed(AgentClosed(1011, "network"))
        for _ in range(10):
            if self.call.state is CallState.AGENT_DOWN:
                self.caller_speaks(0.5)
        assert self.call.state is CallState.CONNECTING_AGENT, self.call.state
        for event in (AgentConnected(), AgentWelcome("again"), AgentSettingsApplied()):
            self.feed(event)
        assert self.call.state is CallState.LIVE


def long_call(record: bool = True) -> Driver:
    """``record``: the call record is posted with its transcript (the most the call keeps)."""
    telephony = Telephony(
        max_call=5 * HOUR, tools=(ToolSpec("lookup_order", "https://ops.example.com/lookup"),), rest_available=True
    )
    options = CallOptions(
        agent=AGENT, telephony=telephony, reconnect_attempts=3, record_utterances=record, record_transcript=record
    )
    call = Call(options, now=0.0)
    driver = Driver(call)
    for event in (TwilioStart(SID, CALL_SID), StreamTokenAccepted(), AgentConnected(), AgentWelcome("r")):
        driver.feed(event)
    driver.feed(AgentSettingsApplied())
    return driver


def run_until(driver: Driver, seconds: float) -> Iterator[None]:
    next_loss = (driver.now // (HOUR / 2) + 1) * (HOUR / 2)
    while driver.now < seconds:
        driver.one_turn()
        if driver.now >= next_loss:
            driver.lose_and_restore_the_agent()
            next_loss += HOUR / 2
        yield


def traced_after_gc() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_a_four_hour_call_keeps_every_collection_bounded_and_its_memory_flat() -> None:
    driver = long_call()
    tracemalloc.start()
    try:
        for _ in run_until(driver, 2 * HOUR):
            pass
        at_two_hours = traced_after_gc()
        for _ in run_until(driver, 4 * HOUR):
            pass
        at_four_hours = traced_after_gc()
    finally:
        tracemalloc.stop()
    call = driver.call
    assert not call.ended and driver.now >= 4 * HOUR and driver.turn > 2000
    # every collection at its bound, none past it
    assert len(call.conversation.transcript) == MAX_TRANSCRIPT_TURNS
    assert call.conversation.turns_dropped == 2 * driver.turn - MAX_TRANSCRIPT_TURNS
    assert len(call.conversation.context) == MAX_CONTEXT_MESSAGES
    assert min(call.conversation.cut_short, default=0) >= call.conversation.turns_dropped  # no orphans
    assert len(call.playback.heard.finished) == MAX_UTTERANCES_RECORDED
    assert (
        call.reconnects == int(driver.now // (HOUR / 2)) and len(call.reconnect_waits) <= MAX_RECONNECT_WAITS_RECORDED
    )
    assert len(call.attempts) <= call.options.reconnect_attempts
    assert len(call.control.pending) <= MAX_PENDING_FUNCTIONS
    assert len(call.playback._outstanding_marks) <= MAX_OUTSTANDING_MARKS
    assert len(call.playback._cleared_marks) <= MAX_OUTSTANDING_MARKS
    assert call.caller.buffered_bytes == 0
    # and the record's figures are whole-call figures all the same
    summary = call.summary(driver.now)
    assert summary["turns"] == driver.turn and summary["barge_ins"] == driver.turn // 3
    assert summary["agent_latency_avg_s"] == 0.8 and summary["functions_called"] == driver.turn // 10
    record = call.conversation.record()
    assert len(record) == MAX_TRANSCRIPT_TURNS and record[-1]["content"].endswith("ships tomorrow")
    grew = at_four_hours - at_two_hours
    print(f"4-hour call: traced {at_two_hours / 1024:.1f} KiB at 2 h, {at_four_hours / 1024:.1f} KiB at 4 h")
    assert grew < 16 * 1024, f"the call's memory grew {grew} bytes between hour 2 and hour 4"


def test_a_reconnect_after_hours_carries_only_the_latest_context() -> None:
    driver = long_call()
    for _ in run_until(driver, 1.2 * HOUR):
        pass
    driver.feed(AgentClosed(1011, "network"))
    connects: list[Action] = []
    while not connects:
        connects = [a for a in driver.feed(Tick()) if isinstance(a, ConnectAgent)]
        driver.now += 0.5
    driver.feed(AgentConnected())
    settings = [a for a in driver.feed(AgentWelcome("late")) if hasattr(a, "data")]
    text = str(settings[0].data)  # type: ignore[attr-defined]
    assert f"answer number {driver.turn}:" in text  # the latest turn is there
    assert "question number 1 about" not in text  # the first hour's start is not


def test_without_a_posted_record_a_long_call_keeps_no_words_and_counts_the_whole_call() -> None:
    driver = long_call(record=False)
    for _ in run_until(driver, 1 * HOUR):
        pass
    call = driver.call
    assert len(call.conversation.transcript) == 0 and call.playback.heard.finished == []
    assert len(call.conversation.context) == MAX_CONTEXT_MESSAGES  # a reconnect still needs it
    heard = call.summary(driver.now)["agent_audio"]
    assert heard["utterances"] == driver.turn > MAX_UTTERANCES_RECORDED  # the whole call, not the last 500
    assert heard["interrupted"] == driver.turn // 3
