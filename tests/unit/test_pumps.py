"""Pieces of the pumps that hold state: the bridge's Twilio send queue on barge-in, and the
simulated caller's model of Twilio's playback buffer."""

from __future__ import annotations

import asyncio
from typing import Any

from app.bridge import CallDeps, CallSession
from app.core.actions import ClearTwilio, SendMark, SendMedia
from app.core.options import CallOptions
from app.core.states import CallState
from app.core.vocabulary import FallbackReason
from app.devtools.simulated_caller import Player
from app.twilio import messages as tm
from app.twilio.stream_token import StreamTokens

SID = "MZ" + "1" * 32


class _NoSocket:
    """A Twilio socket no frame reaches in these tests: no scope, so no shortcut either, and a
    send that never completes (a peer that does not read), should a writer task get to it."""

    scope: dict[str, Any] = {}

    async def send_text(self, text: str) -> None:
        await asyncio.Event().wait()


NO_SOCKET = _NoSocket()


def test_clear_drops_queued_media_and_goes_first() -> None:
    async def run() -> list[str]:
        session = CallSession(
            ws=NO_SOCKET,  # type: ignore[arg-type]  # the queue logic never touches the socket
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


def live_session() -> CallSession:
    """A session whose core is LIVE, reached by feeding the core directly (no agent task)."""
    from app.core.events import AgentConnected, AgentSettingsApplied, AgentWelcome, StreamTokenAccepted, TwilioStart

    session = CallSession(
        ws=NO_SOCKET,  # type: ignore[arg-type]
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


def live_session_with_clock(now: list[float]) -> CallSession:
    from app.core.events import AgentConnected, AgentSettingsApplied, AgentWelcome, StreamTokenAccepted, TwilioStart

    session = CallSession(
        ws=NO_SOCKET,  # type: ignore[arg-type]
        options=CallOptions(agent="id"),
        deps=CallDeps(tokens=StreamTokens(b"x" * 16), agent_url="ws://127.0.0.1:1/", agent_api_key=None),
        clock=lambda: now[0],
    )
    start = TwilioStart(SID, "CA" + "2" * 32)
    for event in (start, StreamTokenAccepted(), AgentConnected(), AgentWelcome("r"), AgentSettingsApplied()):
        session.call.handle(event, 0.0)  # straight to the core: no agent task is started
    return session


class _Transport:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


class _AgentSocket:
    """What the pump touches of a stuck agent's socket: its transport, to drop it, and the
    shortcut send, which a socket that is not being read declines."""

    def __init__(self) -> None:
        self.transport = _Transport()

    def try_send(self, message: bytes | str) -> bool:
        return False


def test_an_agent_that_stops_reading_costs_bounded_memory_then_its_session_is_dropped() -> None:
    from app.core.events import AgentClosed, TwilioMedia
    from app.core.options import PEER_STUCK_SECONDS

    socket = _AgentSocket()

    async def run() -> CallSession:
        now = [0.0]
        session = live_session_with_clock(now)
        session.agent_ws = socket  # type: ignore[assignment]
        limit = session.agent_out.maxsize
        for i in range(limit * 2):  # twice what the queue holds, in a burst
            now[0] = i * 0.001
            session.feed(TwilioMedia(bytes([i % 256]) * 160, SID))
            assert session.agent_out.qsize() <= limit
            session._check_peers_reading()
        assert not session.done.is_set() and session.agent_out.dropped_bytes == limit * 160
        assert socket.transport.aborted == 0  # dropping audio is not giving up on the agent
        now[0] = PEER_STUCK_SECONDS  # nothing taken since the first frame
        session._check_peers_reading()
        session._check_peers_reading()  # once per session, however long it stays stuck
        assert socket.transport.aborted == 1
        session.feed(AgentClosed(1006, ""))  # what the session's reader says once the socket is gone
        return session

    session = asyncio.run(run())
    assert session.agent_out.dropped_bytes > 0  # the oldest audio went, counted
    assert session.end is None and session.call.state is CallState.AGENT_DOWN  # reconnect, or the fallback
    assert session.call.stats.overflows == {"agent_queue": 1}


def test_a_twilio_socket_stuck_for_long_gets_the_caller_the_fallback() -> None:
    from app.core.events import AgentAudio
    from app.core.options import PEER_STUCK_SECONDS

    async def run() -> CallSession:
        now = [0.0]
        session = live_session_with_clock(now)
        session.feed(AgentAudio(b"\xff" * 1600))
        now[0] = PEER_STUCK_SECONDS
        session._check_peers_reading()
        session._check_peers_reading()
        return session

    session = asyncio.run(run())
    # no REST credentials here, so no fallback: the call ends as the bridge's fault, in words
    assert session.end is not None and session.end.outcome == "bridge_error"
    assert session.end.reason.startswith("twilio stopped reading")
    assert session.call.fallback_reason is FallbackReason.TWILIO_NOT_READING
    assert session.call.stats.overflows == {"twilio_queue": 1}  # reported once


def test_a_twilio_that_stops_reading_is_bounded_by_audio_bytes_not_only_by_items() -> None:
    """Large agent chunks fill few items but much memory: the byte bound drops the oldest."""
    from app.core.events import AgentAudio
    from app.core.options import TWILIO_QUEUE_AUDIO_BYTES

    async def run() -> CallSession:
        session = live_session_with_clock([0.0])
        for _ in range(50):
            session.feed(AgentAudio(b"\xff" * 64_000))  # 8 s of mu-law per agent message
        return session

    session = asyncio.run(run())
    assert session.twilio_out.queued_audio <= TWILIO_QUEUE_AUDIO_BYTES
    unaccounted = 50 * 64_000 - session.twilio_out.queued_audio - session.twilio_out.dropped_bytes
    assert unaccounted in (0, 64_000)  # every chunk queued or dropped, but one the writer may hold
    assert session.end is None  # dropping is not ending: only a peer stuck for long ends the call


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


def test_audio_a_replaced_agent_queue_still_held_counts_as_dropped() -> None:
    async def run() -> CallSession:
        session = live_session_with_clock([0.0])
        session.agent_out.put_nowait(b"\x01" * 160)  # queued for a session that is then lost
        session._renew_agent_queue(session.agent_out.maxsize)
        return session

    session = asyncio.run(run())
    assert session.agent_out.empty() and session.agent_out.dropped_bytes == 160


def test_call_sockets_get_a_small_send_buffer_so_a_stuck_peer_shows_in_seconds() -> None:
    import socket

    from app.agent.client import limit_send_buffer
    from app.core.options import SOCKET_SEND_BUFFER

    left, right = socket.socketpair()
    with left, right:
        limit_send_buffer(left)
        assert SOCKET_SEND_BUFFER <= left.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * SOCKET_SEND_BUFFER
    limit_send_buffer(left)  # closed by now: nothing to do, no error
    limit_send_buffer(None)


class _DirectSocket:
    """The Twilio socket's shortcut: what it wrote, in order."""

    scope: dict[str, Any] = {}

    def __init__(self) -> None:
        self.written: list[str] = []

    def try_send(self, text: str) -> bool:
        self.written.append(text)
        return True


def test_nothing_is_written_past_the_queue_while_the_writer_holds_a_frame() -> None:
    """The writer has taken a frame and waits for the socket to be writable again (its send is
    suspended, the queue is empty): a frame written directly now would overtake it. Media and
    then the barge-in's clear must queue behind it, in order."""

    async def run() -> tuple[list[str], list[str]]:
        direct = _DirectSocket()
        session = live_session()
        session.direct = direct  # type: ignore[assignment]
        held = SendMedia(tm.media(SID, b"held"), 4)
        session.twilio_out.put_nowait(held)
        assert session.twilio_out.get_nowait() is held  # in the writer's hands, not yet sent
        session.perform([SendMedia(tm.media(SID, b"later"), 5)])
        session._clear(ClearTwilio(tm.clear(SID)))
        queued = [session.twilio_out.get_nowait().text for _ in range(session.twilio_out.qsize())]
        for _ in range(1 + len(queued)):  # the writer sends the held frame at last, then the clear
            session.twilio_out.task_done()
        assert session.twilio_out.idle()
        session.perform([SendMedia(tm.media(SID, b"now"), 3)])  # nothing before it: straight out
        return direct.written, queued

    written, queued = asyncio.run(run())
    assert queued == [tm.clear(SID)]  # "later" was dropped by the clear, which waits for "held"
    assert written == [tm.media(SID, b"now")]
