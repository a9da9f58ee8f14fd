"""Pieces of the pumps that hold state: the bridge's Twilio send queue on barge-in, and the
simulated caller's model of Twilio's playback buffer."""

from __future__ import annotations

import asyncio
from typing import Any

from app.bridge import CallDeps, CallSession
from app.core.actions import ClearTwilio, SendMark, SendMedia
from app.core.options import CallOptions
from app.devtools.simulated_caller import Player
from app.twilio import messages as tm
from app.twilio.stream_token import StreamTokens

SID = "MZ" + "1" * 32


def test_clear_drops_queued_media_and_goes_first() -> None:
    async def run() -> list[str]:
        session = CallSession(
            ws=Any,  # type: ignore[arg-type]  # the queue logic never touches the socket
            options=CallOptions(agent="id"),
            deps=CallDeps(tokens=StreamTokens(b"x" * 16), agent_url="ws://127.0.0.1:1/", agent_api_key=None),
        )
        for item in [SendMedia(tm.media(SID, b"a"), 1), SendMark(tm.mark(SID, "m1"), "m1"), SendMedia("", 2)]:
            session.twilio_out.put_nowait(item)
        session._clear(ClearTwilio(tm.clear(SID)))
        assert session.twilio_dropped_on_clear == 2
        assert session.twilio_bytes_dropped_on_clear == 3  # sizes come from the items, not the JSON
        return [session.twilio_out.get_nowait() for _ in range(session.twilio_out.qsize())]

    assert asyncio.run(run()) == [ClearTwilio(tm.clear(SID))]


def test_player_plays_in_real_time_order_and_fires_marks_after_audio() -> None:
    player = Player()
    player.add_media(b"a" * 200)
    player.add_mark("m1")
    player.add_media(b"b" * 100)
    player.add_mark("m2")
    assert player.tick() == (b"a" * 160, [])
    assert player.tick() == (b"a" * 40 + b"b" * 100, ["m1", "m2"])
    assert player.idle
    player.add_mark("m3")  # a mark with no audio before it returns on the next tick
    assert player.tick() == (b"", ["m3"])


def test_player_clear_drops_audio_and_returns_pending_marks() -> None:
    player = Player()
    player.add_media(b"a" * 400)
    player.add_mark("m1")
    player.tick()
    assert player.clear() == (240, ["m1"])
    assert player.idle and player.tick() == (b"", [])


def test_agent_not_reading_ends_the_call_instead_of_growing_a_queue() -> None:
    from app.core.events import (
        AgentConnected,
        AgentSettingsApplied,
        AgentWelcome,
        StreamTokenAccepted,
        TwilioMedia,
        TwilioStart,
    )

    async def run() -> CallSession:
        session = CallSession(
            ws=Any,  # type: ignore[arg-type]
            options=CallOptions(agent="id"),
            deps=CallDeps(tokens=StreamTokens(b"x" * 16), agent_url="ws://127.0.0.1:1/", agent_api_key=None),
        )
        start = TwilioStart(SID, "CA" + "2" * 32)
        for event in (start, StreamTokenAccepted(), AgentConnected(), AgentWelcome("r"), AgentSettingsApplied()):
            session.call.handle(event, 0.0)  # straight to the core: no agent task is started
        while not session.done.is_set():
            session.feed(TwilioMedia(b"\xff" * 160, SID))
        return session

    session = asyncio.run(run())
    assert session.agent_out.full()
    assert session.end is not None and session.end.outcome == "bridge_error"
    assert session.call.stats.overflows == {"agent_queue": 1} and session.call.stats.invalid == {}
    assert session.call.ended


def live_session() -> CallSession:
    """A session whose core is LIVE, reached by feeding the core directly (no agent task)."""
    from app.core.events import AgentConnected, AgentSettingsApplied, AgentWelcome, StreamTokenAccepted, TwilioStart

    session = CallSession(
        ws=Any,  # type: ignore[arg-type]
        options=CallOptions(agent="id"),
        deps=CallDeps(tokens=StreamTokens(b"x" * 16), agent_url="ws://127.0.0.1:1/", agent_api_key=None),
    )
    start = TwilioStart(SID, "CA" + "2" * 32)
    for event in (start, StreamTokenAccepted(), AgentConnected(), AgentWelcome("r"), AgentSettingsApplied()):
        session.call.handle(event, 0.0)
    return session


def test_a_new_clear_replaces_one_still_queued() -> None:
    async def run() -> list[Any]:
        session = live_session()
        session._clear(ClearTwilio(tm.clear(SID)))
        session.twilio_out.put_nowait(SendMedia(tm.media(SID, b"a"), 1))
        session._clear(ClearTwilio(tm.clear(SID)))
        return [session.twilio_out.get_nowait() for _ in range(session.twilio_out.qsize())]

    assert asyncio.run(run()) == [ClearTwilio(tm.clear(SID))]  # one clear: Twilio needs no second


def test_twilio_not_reading_is_bounded_by_audio_bytes_not_only_by_items() -> None:
    """Large agent chunks fill few items but much memory: the byte bound ends the call."""
    from app.core.events import AgentAudio
    from app.core.options import TWILIO_QUEUE_AUDIO_BYTES, TWILIO_QUEUE_LIMIT

    async def run() -> CallSession:
        session = live_session()
        chunk = b"\xff" * 64_000  # 8 s of mu-law per agent message
        while not session.done.is_set():
            session.feed(AgentAudio(chunk))
        return session

    session = asyncio.run(run())
    assert session.twilio_out.qsize() < TWILIO_QUEUE_LIMIT
    queued = sum(item.audio_bytes for item in session.twilio_out._queue if isinstance(item, SendMedia))  # type: ignore[attr-defined]
    assert queued <= TWILIO_QUEUE_AUDIO_BYTES
    assert session.end is not None and session.end.outcome == "bridge_error"
    assert session.call.stats.overflows == {"twilio_queue": 1}


def test_nothing_is_queued_once_the_call_has_ended() -> None:
    from app.core.actions import SendToAgent
    from app.core.events import TwilioStop

    async def run() -> CallSession:
        session = live_session()
        session.feed(TwilioStop(SID))
        session.perform([SendToAgent(b"late"), SendMedia(tm.media(SID, b"late"), 4), ClearTwilio(tm.clear(SID))])
        return session

    session = asyncio.run(run())
    assert session.agent_out.empty() and session.twilio_out.empty()
    assert session.end is not None and session.end.outcome == "caller_hangup"
