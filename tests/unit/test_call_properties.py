"""Random event sequences through the core and the pump's real send queues (no sockets),
checking the invariants a caller and the agent rely on, whatever order the peers choose.

What the call should do is written here apart from the code (``Model``: the protocol's
phases as a caller and the agent see them), so a wrong row in ``states.py`` fails too."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketState

from app.bridge import CallDeps, CallSession, agent_queue, twilio_audio_bytes
from app.core.actions import ClearTwilio, SendMark, SendMedia, TwilioOut
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
    Event,
    FunctionCall,
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
from app.core.options import CALL_UPDATE_TIMEOUT_SECONDS as CALL_UPDATE_TIMEOUT
from app.core.options import CallOptions, Telephony
from app.core.states import CallState
from app.core.vocabulary import InvalidKind, Outcome, Overflow
from app.send_queue import SendQueue
from app.twilio.stream_token import StreamTokens

SID = "MZ" + "a" * 32
CALL = "CA" + "b" * 32

KINDS = [
    "media",
    "media",
    "media",
    "agent_audio",
    "agent_audio",
    "start",
    "bad_token_start",
    "agent_connected",
    "welcome",
    "settings_applied",
    "audio_done",
    "user_started_speaking",
    "started_speaking",
    "function_call",
    "mark",
    "dtmf",
    "invalid",
    "twilio_connected",
    "warning",
    "unknown",
    "tick",
    "writer",
    "writer",
    "stop",
    "closed",
    "agent_error",
    "agent_closed",
    "shutdown",
    "bad_start",
    "connect_failed",
    "bridge_failed",
    "thinking",
    "conversation_text",
    "info",
    "agent_invalid",
]


@dataclass
class Step:
    kind: str
    dt: float
    size: int
    sid: str
    count: int


steps = st.builds(
    Step,
    kind=st.sampled_from(KINDS),
    dt=st.floats(min_value=0.0, max_value=3.0),
    size=st.integers(min_value=1, max_value=400),
    sid=st.sampled_from([SID, SID, SID, "", "MZ" + "f" * 32]),
    count=st.integers(min_value=1, max_value=3),
)


class ObservedSession(CallSession):
    """The real pump, counting what it is asked to send to Twilio and every clear."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.twilio_items = 0
        self.clears_made = 0

    def _put(self, queue: asyncio.Queue[Any], item: Any, which: Overflow) -> None:
        if queue is self.twilio_out:
            self.twilio_items += 1
        super()._put(queue, item, which)

    def _clear(self, clear: ClearTwilio) -> None:
        self.twilio_items += 1
        self.clears_made += 1
        super()._clear(clear)


READY_TIMEOUT, START_TIMEOUT, MEDIA_TIMEOUT = 10.0, 5.0, 10.0  # CallOptions' defaults, used by run()
WAITING_FOR_AGENT = ("connecting", "awaiting_welcome", "awaiting_settings")
WATCHED = (*WAITING_FOR_AGENT, "live", "agent_down")  # the dead-stream watchdog's phases


@dataclass
class Model:
    """The call's phases as the protocol describes them: a reference, not the code's table."""

    phase: str = "awaiting_start"
    stream_sid: str = ""
    accepted_at: float = 0.0
    fallback_at: float = 0.0
    last_media: float = 0.0

    def foreign(self, event: Event) -> bool:
        with_sid = isinstance(event, TwilioMedia | TwilioMark | TwilioDtmf | TwilioStop)
        sid = event.stream_sid if with_sid else ""  # type: ignore[union-attr]
        return bool(sid and self.stream_sid and sid != self.stream_sid)

    def takes_media(self, event: TwilioMedia) -> bool:
        return self.phase != "ended" and not self.foreign(event)

    def answers_functions(self) -> bool:
        return self.phase in ("awaiting_settings", "live")

    def step(self, event: Event, now: float, token_ok: bool) -> None:
        phase = self.phase
        if phase == "ended" or self.foreign(event):
            return
        if isinstance(event, TwilioMedia):
            self.last_media = now
        match event:
            case TwilioStart() if phase == "awaiting_start":
                self.stream_sid = event.stream_sid
                self.phase, self.accepted_at = ("connecting", now) if token_ok else ("ended", now)
                self.last_media = now  # the dead-stream watchdog counts from the start of the call
            case TwilioBadStart() if phase == "awaiting_start":
                self.phase = "ended"
            case TwilioStop() | TwilioClosed() | BridgeShuttingDown() | BridgeFailed():
                self.phase = "ended"
            case AgentConnected() if phase == "connecting":
                self.phase = "awaiting_welcome"
            case AgentConnectFailed() if phase == "connecting":
                self.phase = "agent_down"
            case AgentWelcome() if phase == "awaiting_welcome":
                self.phase = "awaiting_settings"
            case AgentSettingsApplied() if phase == "awaiting_settings":
                self.phase = "live"
            case AgentError() | AgentClosed() if phase in (*WAITING_FOR_AGENT, "live"):
                self.phase = "agent_down"
            case Tick() if (
                phase in (*WAITING_FOR_AGENT, "live", "agent_down") and now - self.last_media >= MEDIA_TIMEOUT
            ):
                self.phase = "ended"  # no media for media_timeout: the stream is dead
            case Tick() if phase == "agent_down":  # no reconnect budget here: the fallback
                self.phase, self.fallback_at = "falling_back", now
            case Tick() if phase == "awaiting_start" and now >= START_TIMEOUT:
                self.phase = "ended"
            case Tick() if phase in WAITING_FOR_AGENT and now >= self.accepted_at + READY_TIMEOUT:
                self.phase = "agent_down"
            case Tick() if phase == "falling_back" and now >= self.fallback_at + CALL_UPDATE_TIMEOUT:
                self.phase = "ended"  # Twilio never answered the redirect (none is sent here)


@dataclass
class Observer:
    """The test's own account of what went in, against which the outputs are checked."""

    accepted_caller: bytearray = field(default_factory=bytearray)
    to_agent_audio: bytearray = field(default_factory=bytearray)
    to_agent_text: list[dict[str, Any]] = field(default_factory=list)
    functions_owed: set[str] = field(default_factory=set)
    audio_generation: dict[int, int] = field(default_factory=dict)  # agent chunk -> clears made before it
    clears_sent: int = 0
    seq: int = 0


class StubTwilioSocket:
    """Only what teardown touches: the state and ``close``; every frame goes through the queue."""

    scope: dict[str, Any] = {}  # no MediaSocket shortcut: every frame goes through the queue

    def __init__(self) -> None:
        self.application_state = WebSocketState.CONNECTED
        self.closed_with: int | None = None

    async def close(self, code: int) -> None:
        self.closed_with = code
        self.application_state = WebSocketState.DISCONNECTED


def run(script: list[Step], queue_size: int | None = None) -> None:
    """Feed ``script`` to a real CallSession; with ``queue_size`` its send queues are that
    small, so peers that stop reading (queues that fill) are part of the sequence."""

    async def main() -> None:
        tokens = StreamTokens(b"k" * 32)
        clock = [0.0]
        deps = CallDeps(tokens=tokens, agent_url="ws://127.0.0.1:9/", agent_api_key=None)
        # a small pre-buffer, so it overflows; no silence check-in or time limit (their own tests),
        # so the call's phases are only the protocol's
        telephony = Telephony(silence_check_in=0, max_call=1e9)
        # no reconnects either (their own tests): a lost agent goes straight to the fallback
        options = CallOptions(agent="id", max_prebuffer_seconds=0.5, telephony=telephony, reconnect_attempts=0)
        ws = StubTwilioSocket()
        session = ObservedSession(ws=ws, options=options, deps=deps, clock=lambda: clock[0])  # type: ignore[arg-type]
        if queue_size is not None:
            session.agent_out = agent_queue(queue_size, session.clock)
            session.twilio_out = SendQueue(queue_size, twilio_audio_bytes, session.clock)
        call, model, seen = session.call, Model(), Observer()
        ended_at: tuple[int, int] | None = None
        for step in script:
            clock[0] += step.dt
            if step.kind == "writer":
                send_from_twilio_queue(session, seen, step.count)
                continue
            event = make_event(step, seen, tokens)
            if isinstance(event, TwilioMedia) and model.takes_media(event):
                seen.accepted_caller += event.payload
            if isinstance(event, AgentFunctionCallRequest) and model.answers_functions():
                seen.functions_owed |= {fn.id for fn in event.functions if fn.client_side}
            token_ok = isinstance(event, TwilioStart) and event.custom_parameters["stream_token"] != "forged"
            model.step(event, clock[0], token_ok)
            session.feed(event)
            if isinstance(event, AgentAudio):
                seen.audio_generation[int.from_bytes(event.data[:4], "big")] = session.clears_made
            take_agent_queue(session, seen)
            overflowed = any(kind is not Overflow.CALLER_PREBUFFER for kind in call.stats.overflows)
            if overflowed:  # a peer stopped reading: the bridge ends the call, as its own fault
                assert call.outcome is Outcome.BRIDGE_ERROR
                model.phase = "ended"

            # the call is where the protocol says it is
            assert call.ended == (model.phase == "ended"), (model.phase, call.state)
            assert (call.state is CallState.LIVE) == (model.phase == "live"), (model.phase, call.state)
            # no media (nor mark nor clear) for Twilio before the stream's start
            if not model.stream_sid:
                assert session.twilio_items == 0
            # no caller audio to the agent before SettingsApplied
            if call.agent.ready_at is None:
                assert not seen.to_agent_audio
            # nothing lost: what was taken is sent, still held, or dropped and counted
            expected = bytes(seen.accepted_caller[call.stats.caller_bytes_dropped :])
            queue_dropped = session.agent_out.dropped_bytes  # a full queue drops its oldest audio
            if not queue_dropped:
                assert bytes(seen.to_agent_audio) == expected[: len(seen.to_agent_audio)]
            if not overflowed:
                unsent = len(expected) - len(seen.to_agent_audio) - queue_dropped
                assert unsent == call.caller.buffered_bytes
            # nothing after the end
            if call.ended:
                produced = (session.twilio_items, len(seen.to_agent_text) + len(seen.to_agent_audio))
                ended_at = ended_at or produced
                assert produced == ended_at and session.done.is_set()
        send_from_twilio_queue(session, seen, 10_000)
        # every client-side function the agent asked for was answered (while it could be sent)
        answered = {msg["id"] for msg in seen.to_agent_text if msg.get("type") == "FunctionCallResponse"}
        if not call.stats.overflows.get(Overflow.AGENT_QUEUE):
            assert seen.functions_owed <= answered
        # the end: the gauge of active calls comes back to zero, Twilio's socket gets its code
        await session._teardown()
        assert session.end is not None and ws.closed_with == session.end.twilio_close_code
        assert session.metrics.registry.get_sample_value("callbridge_active_calls") == 0
        done = session.metrics.registry.get_sample_value("callbridge_calls_total", {"outcome": str(call.outcome)})
        assert done == (1 if call.accepted else None)

    asyncio.run(main())


def make_event(step: Step, seen: Observer, tokens: StreamTokens) -> Event:
    match step.kind:
        case "media":
            return TwilioMedia(bytes([step.size % 256]) * step.size, step.sid)
        case "agent_audio":
            seen.seq += 1
            return AgentAudio(seen.seq.to_bytes(4, "big") + b"\x00" * step.size)
        case "start":
            return TwilioStart(SID, CALL, custom_parameters={"stream_token": tokens.mint(CALL)})
        case "bad_token_start":
            return TwilioStart(SID, CALL, custom_parameters={"stream_token": "forged"})
        case "agent_connected":
            return AgentConnected()
        case "welcome":
            return AgentWelcome("req")
        case "settings_applied":
            return AgentSettingsApplied()
        case "audio_done":
            return AgentAudioDone()
        case "user_started_speaking":
            return AgentUserStartedSpeaking()
        case "started_speaking":
            return AgentStartedSpeaking(total_latency=0.4)
        case "function_call":
            seen.seq += 1
            functions = tuple(
                FunctionCall(f"fn-{seen.seq}-{i}", "lookup", "{}", client_side=(i + step.size) % 3 != 0)
                for i in range(step.count)
            )
            return AgentFunctionCallRequest(functions)
        case "mark":
            return TwilioMark(f"agent-audio-{step.count}", step.sid)
        case "dtmf":
            return TwilioDtmf("7", step.sid)
        case "invalid":
            return TwilioInvalid(InvalidKind.BAD_JSON, "{")
        case "twilio_connected":
            return TwilioConnected()
        case "warning":
            return AgentWarning("W", "w")
        case "unknown":
            return AgentUnknown("Novel")
        case "tick":
            return Tick()
        case "stop":
            return TwilioStop(step.sid)
        case "closed":
            return TwilioClosed(1000)
        case "agent_error":
            return AgentError("INTERNAL_SERVER_ERROR", "e")
        case "agent_closed":
            return AgentClosed(1011, "bye")
        case "shutdown":
            return BridgeShuttingDown()
        case "bad_start":
            return TwilioBadStart("callSid missing")
        case "connect_failed":
            return AgentConnectFailed("HTTP 429")
        case "bridge_failed":
            return BridgeFailed("internal error: KeyError")
        case "thinking":
            return AgentThinking("hmm")
        case "conversation_text":
            return AgentConversationText("user", "hello")
        case "info":
            return AgentInfo("History", {})
        case "agent_invalid":
            return AgentInvalid("bad JSON")
    raise AssertionError(step.kind)


def take_agent_queue(session: CallSession, seen: Observer) -> None:
    """The agent writer: everything queued goes out (the agent reads promptly here)."""
    while not session.agent_out.empty():
        item = session.agent_out.get_nowait()
        session.agent_out.task_done()
        if isinstance(item, bytes):
            seen.to_agent_audio += item
        else:
            seen.to_agent_text.append(json.loads(item))


def send_from_twilio_queue(session: CallSession, seen: Observer, count: int) -> None:
    """The Twilio writer, sending ``count`` items: no media older than a clear sent before it."""
    for _ in range(count):
        if session.twilio_out.empty():
            return
        item: TwilioOut = session.twilio_out.get_nowait()
        session.twilio_out.task_done()
        match item:
            case ClearTwilio():
                seen.clears_sent += 1
            case SendMedia(text=text):
                msg = json.loads(text)
                assert msg["streamSid"] == SID
                chunk = int.from_bytes(base64.b64decode(msg["media"]["payload"])[:4], "big")
                assert seen.audio_generation.get(chunk, session.clears_made) >= seen.clears_sent
            case SendMark(text=text):
                assert json.loads(text)["streamSid"] == SID


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, min_size=1, max_size=60))
def test_random_event_sequences_keep_the_call_invariants(script: list[Step]) -> None:
    run(script)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, min_size=1, max_size=60), st.integers(min_value=1, max_value=6))
def test_the_invariants_hold_when_a_peer_stops_reading(script: list[Step], queue_size: int) -> None:
    run(script, queue_size)


def test_a_typical_call_sequence_meets_them_too() -> None:
    """The property above on one hand-written sequence, so a broken checker is noticed."""
    kinds = ["media", "start", "media", "agent_connected", "welcome", "media", "settings_applied", "media"]
    kinds += ["agent_audio", "agent_audio", "user_started_speaking", "writer", "agent_audio", "writer", "function_call"]
    run([Step(k, 0.02, 160, SID, 2) for k in [*kinds, "stop", "media", "agent_audio", "writer"]])
