"""Random event sequences through the core and the pump's real send queues (no sockets),
checking the invariants a caller and the agent rely on, whatever order the peers choose."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.bridge import CallDeps, CallSession
from app.core.actions import ClearTwilio, SendMark, SendMedia, TwilioOut
from app.core.call import CallOptions
from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentClosed,
    AgentConnected,
    AgentError,
    AgentFunctionCallRequest,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentUnknown,
    AgentUserStartedSpeaking,
    AgentWarning,
    AgentWelcome,
    BridgeShuttingDown,
    Event,
    FunctionCall,
    Tick,
    TwilioClosed,
    TwilioConnected,
    TwilioDtmf,
    TwilioInvalid,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
)
from app.core.states import TRANSITIONS
from app.core.vocabulary import InvalidKind, Overflow
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


def run(script: list[Step]) -> None:
    async def main() -> None:
        tokens = StreamTokens(b"k" * 32)
        clock = [0.0]
        deps = CallDeps(tokens=tokens, agent_url="ws://127.0.0.1:9/", agent_api_key=None)
        options = CallOptions(agent="id", max_prebuffer_seconds=0.5)  # small, so overflow happens
        session = ObservedSession(ws=None, options=options, deps=deps, clock=lambda: clock[0])  # type: ignore[arg-type]
        call = session.call
        seen = Observer()
        ended_at: tuple[int, int] | None = None
        for step in script:
            clock[0] += step.dt
            state = call.state
            if step.kind == "writer":
                send_from_twilio_queue(session, seen, step.count)
                continue
            event = make_event(step, seen, tokens)
            takes_it = type(event) in TRANSITIONS[state]
            if isinstance(event, TwilioMedia) and takes_it and not foreign(event.stream_sid, call.stream_sid):
                seen.accepted_caller += event.payload
            if isinstance(event, AgentFunctionCallRequest) and takes_it:
                seen.functions_owed |= {fn.id for fn in event.functions if fn.client_side}
            clears_before = session.clears_made
            session.feed(event)
            if isinstance(event, AgentAudio):
                seen.audio_generation[int.from_bytes(event.data[:4], "big")] = session.clears_made
            assert session.clears_made >= clears_before
            take_agent_queue(session, seen)

            # no media (nor mark nor clear) for Twilio before the stream's start
            if not call.stream_sid:
                assert session.twilio_items == 0
            # no caller audio to the agent before SettingsApplied
            if call.agent.ready_at is None:
                assert not seen.to_agent_audio
            # nothing lost: what was taken is sent, still held, or dropped and counted
            expected = bytes(seen.accepted_caller[call.stats.caller_bytes_dropped :])
            assert bytes(seen.to_agent_audio) == expected[: len(seen.to_agent_audio)]
            assert len(expected) - len(seen.to_agent_audio) == call.caller.buffered_bytes
            # nothing after the end
            if call.ended:
                produced = (session.twilio_items, len(seen.to_agent_text) + len(seen.to_agent_audio))
                if ended_at is None:
                    ended_at = produced
                assert produced == ended_at and session.done.is_set()
        send_from_twilio_queue(session, seen, 10_000)
        # every client-side function the agent asked for was answered
        answered = {msg["id"] for msg in seen.to_agent_text if msg.get("type") == "FunctionCallResponse"}
        assert seen.functions_owed <= answered
        for task in session.tasks:
            task.cancel()
        await asyncio.gather(*session.tasks, return_exceptions=True)

    asyncio.run(main())


def foreign(sid: str, ours: str) -> bool:
    return bool(sid and ours and sid != ours)


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


def test_a_typical_call_sequence_meets_them_too() -> None:
    """The property above on one hand-written sequence, so a broken checker is noticed."""
    kinds = ["media", "start", "media", "agent_connected", "welcome", "media", "settings_applied", "media"]
    kinds += ["agent_audio", "agent_audio", "user_started_speaking", "writer", "agent_audio", "writer", "function_call"]
    run([Step(k, 0.02, 160, SID, 2) for k in [*kinds, "stop", "media", "agent_audio", "writer"]])
