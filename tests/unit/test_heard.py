"""What the caller heard of each agent utterance (issue 10, item 3): the play-out estimate in
``app/core/heard.py`` and what the call record and log make of it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.actions import Log
from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentConversationText,
    AgentStartedSpeaking,
    AgentUserStartedSpeaking,
    TwilioMark,
)
from app.core.heard import HeardAudio
from app.core.options import MAX_OUTSTANDING_MARKS
from tests.unit.test_call import SID, feed, ready_call

MS = 8  # mu-law bytes per millisecond at 8 kHz


def test_an_utterance_sent_in_one_burst_is_heard_at_real_time_until_the_caller_cuts_in() -> None:
    heard = HeardAudio()
    heard.sent(1000 * MS, now=10.0)  # the agent streams faster than real time: all at once
    cut = heard.cleared(now=10.4)
    assert [(u.heard_ms, u.full_ms, u.interrupted) for u in cut] == [(pytest.approx(400.0), 1000.0, True)]


def test_an_utterance_played_through_before_the_clear_counts_as_heard_in_full() -> None:
    heard = HeardAudio()
    heard.sent(500 * MS, now=0.0)
    heard.done("m1")
    heard.sent(500 * MS, now=0.0)  # queued behind the first
    cut = heard.cleared(now=0.7)  # the first mark is still on its way back
    assert [(u.heard_ms, u.full_ms) for u in cut] == [(pytest.approx(200.0), 500.0)]
    assert [r["interrupted"] for r in heard.records(0.7)] == [False, True]


def test_a_gap_in_the_agent_audio_is_not_counted_as_heard() -> None:
    heard = HeardAudio()
    heard.sent(100 * MS, now=0.0)
    heard.sent(100 * MS, now=0.5)  # Twilio ran dry for 400 ms in between
    cut = heard.cleared(now=0.55)
    assert cut[0].heard_ms == pytest.approx(150.0) and cut[0].full_ms == 200.0


def test_after_a_clear_the_next_utterance_starts_from_nothing() -> None:
    heard = HeardAudio()
    heard.sent(1000 * MS, now=0.0)
    heard.cleared(now=0.1)
    heard.sent(300 * MS, now=0.2)
    heard.done("m2")
    heard.mark_returned("m2", now=0.5)
    assert heard.records(0.5) == [
        {"heard_ms": 100, "full_ms": 1000, "interrupted": True},
        {"heard_ms": 300, "full_ms": 300, "interrupted": False},
    ]
    assert heard.position_ms(0.5) == pytest.approx(400.0)


def test_a_mark_back_sooner_than_estimated_moves_the_position_up() -> None:
    heard = HeardAudio()
    heard.sent(500 * MS, now=0.0)
    heard.done("m1")
    heard.sent(500 * MS, now=0.0)
    heard.mark_returned("m1", now=0.3)  # Twilio says 500 ms were played by 0.3 s
    assert heard.position_ms(0.3) == pytest.approx(500.0)
    assert heard.cleared(now=0.4)[0].heard_ms == pytest.approx(100.0)


def test_a_call_that_ends_mid_utterance_records_what_had_played() -> None:
    heard = HeardAudio()
    heard.sent(2000 * MS, now=0.0)
    assert heard.records(1.25) == [{"heard_ms": 1250, "full_ms": 2000, "interrupted": True}]


def test_a_twilio_that_returns_no_marks_cannot_grow_the_pending_set() -> None:
    heard = HeardAudio()
    for i in range(MAX_OUTSTANDING_MARKS + 10):
        heard.sent(MS, now=float(i))
        heard.done(f"m{i}")
    assert len(heard._pending) == MAX_OUTSTANDING_MARKS
    assert len(heard.records(1e6)) == MAX_OUTSTANDING_MARKS + 10


@given(
    st.lists(
        st.tuples(st.sampled_from(["send", "done", "mark", "clear"]), st.integers(1, 4000), st.floats(0, 0.5)),
        max_size=60,
    )
)
def test_heard_is_never_negative_nor_more_than_was_sent_nor_more_than_time_allows(
    steps: list[tuple[str, int, float]],
) -> None:
    heard, now, marks = HeardAudio(), 0.0, 0
    for op, size, wait in steps:
        now += wait
        if op == "send":
            heard.sent(size, now)
        elif op == "done":
            marks += 1
            heard.done(f"m{marks}")
        elif op == "mark" and marks:
            heard.mark_returned(f"m{marks}", now)
        elif op == "clear":
            heard.cleared(now)
        assert 0.0 <= heard.position_ms(now) <= heard._sent_ms + 1e-6
    for record in heard.records(now):
        assert 0 <= record["heard_ms"] <= record["full_ms"]
        assert record["interrupted"] == (record["heard_ms"] < record["full_ms"])


def test_a_barge_in_marks_the_assistant_turn_and_logs_heard_x_of_y() -> None:
    call = ready_call()
    feed(call, AgentConversationText("user", "hello"), now=1.0)
    feed(call, AgentConversationText("assistant", "a long answer"), AgentStartedSpeaking(), now=1.0)
    feed(call, AgentAudio(b"\xff" * 3000 * MS), AgentAudioDone(), now=1.0)  # 3 s, sent at once
    actions = feed(call, AgentUserStartedSpeaking(), now=2.2)
    barge = next(a for a in actions if isinstance(a, Log) and a.event == "barge_in")
    assert barge.fields["heard"] == "heard 1200 ms of 3000 ms"
    cut = call.conversation.cut_short
    assert list(cut) == [1] and cut[1].as_record() == {"heard_ms": 1200, "full_ms": 3000, "interrupted": True}
    feed(call, AgentAudio(b"\xff" * 500 * MS), AgentAudioDone(), now=3.0)
    feed(call, TwilioMark("agent-audio-2", SID), now=3.6)
    assert call.summary(4.0)["agent_audio"] == {"utterances": 2, "interrupted": 1, "heard_ms": 1700, "full_ms": 3500}
