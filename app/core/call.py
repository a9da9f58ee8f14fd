"""The call: a sans-I/O state machine between one Twilio stream and one agent session.

Feed it events (``Call.handle(event, now)``) and perform the actions it returns, in order.
It owns every decision of the bridge: when to open the agent session, when caller audio may
flow, barge-in (``_on_user_started_speaking``), marks, keep-alives and when the call ends.
It never touches a socket or reads a clock, so every behaviour is a plain unit test.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.agent import messages as agent_msg
from app.codecs import TWILIO_FORMAT, AudioFormat, Transcoder
from app.core.actions import (
    Action,
    BindLogContext,
    ClearTwilio,
    ConnectAgent,
    EndCall,
    Log,
    Measure,
    SendToAgent,
    SendToTwilio,
)
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
    BridgeStopping,
    Event,
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
from app.twilio import messages as twilio_msg


@dataclass(frozen=True)
class CallOptions:
    """Per-call settings, derived from the agent profile and the service config."""

    agent: dict[str, Any] | str
    agent_input: AudioFormat = TWILIO_FORMAT
    agent_output: AudioFormat = TWILIO_FORMAT
    tags: tuple[str, ...] = ()
    keepalive_after: float = 5.0
    agent_ready_timeout: float = 10.0
    max_prebuffer_seconds: float = 10.0
    log_transcripts: bool = False


# agent_state values, in the order a healthy session passes through them
IDLE, CONNECTING, AWAITING_SETTINGS_APPLIED, READY, CLOSED = (
    "idle",
    "connecting",
    "awaiting_settings_applied",
    "ready",
    "closed",
)


@dataclass
class CallStats:
    caller_frames: int = 0
    caller_bytes: int = 0
    agent_frames: int = 0
    agent_bytes: int = 0
    caller_bytes_dropped: int = 0
    agent_bytes_dropped: int = 0
    turns: int = 0
    barge_ins: int = 0
    keepalives: int = 0
    marks_played: int = 0
    marks_cleared: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    agent_latencies: list[float] = field(default_factory=list)


class Call:
    def __init__(self, options: CallOptions, now: float) -> None:
        self.options = options
        self.started_at = now
        self.stats = CallStats()
        self.stream_sid = ""
        self.call_sid = ""
        self.request_id = ""
        self.custom_parameters: dict[str, str] = {}
        self.streaming = False
        self.ended = False
        self.outcome = ""
        self.end_reason = ""
        self.agent_state = IDLE
        self.agent_connect_started = 0.0
        self.agent_ready_at: float | None = None
        self.stream_started_at: float | None = None
        self.first_agent_audio_at: float | None = None
        self.transcript: list[tuple[float, str, str]] = []
        self._last_sent_to_agent = now
        self._prebuffer: deque[bytes] = deque()
        self._prebuffer_bytes = 0
        self._prebuffer_limit = options.agent_input.bytes_for(options.max_prebuffer_seconds)
        self._held_agent_audio: deque[bytes] = deque()
        self._held_agent_bytes = 0
        self._held_agent_limit = TWILIO_FORMAT.bytes_for(30.0)
        self._agent_speaking = False
        self._mark_seq = 0
        self._outstanding_marks: dict[str, float] = {}
        self._cleared_marks: set[str] = set()
        self._unknown_types: set[str] = set()
        self._to_agent = (
            None if options.agent_input == TWILIO_FORMAT else Transcoder(TWILIO_FORMAT, options.agent_input)
        )
        self._to_twilio = (
            None if options.agent_output == TWILIO_FORMAT else Transcoder(options.agent_output, TWILIO_FORMAT)
        )
        self._handlers: dict[type, Callable[[Any, float], list[Action]]] = {
            TwilioMedia: self._on_media,
            AgentAudio: self._on_agent_audio,
            TwilioMark: self._on_mark,
            AgentUserStartedSpeaking: self._on_user_started_speaking,
            AgentAudioDone: self._on_agent_audio_done,
            AgentStartedSpeaking: self._on_agent_started_speaking,
            AgentConversationText: self._on_conversation_text,
            AgentThinking: self._on_thinking,
            Tick: self._on_tick,
            TwilioConnected: self._on_connected,
            TwilioStart: self._on_start,
            TwilioDtmf: self._on_dtmf,
            TwilioStop: self._on_stop,
            TwilioClosed: self._on_twilio_closed,
            TwilioInvalid: self._on_twilio_invalid,
            AgentConnected: self._on_agent_connected,
            AgentConnectFailed: self._on_agent_connect_failed,
            AgentWelcome: self._on_welcome,
            AgentSettingsApplied: self._on_settings_applied,
            AgentFunctionCallRequest: self._on_function_call_request,
            AgentWarning: self._on_warning,
            AgentError: self._on_error,
            AgentInfo: self._on_info,
            AgentUnknown: self._on_unknown,
            AgentInvalid: self._on_agent_invalid,
            AgentClosed: self._on_agent_closed,
            BridgeStopping: self._on_bridge_stopping,
        }

    # --- entry point ---------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        if self.ended:
            return []
        return self._handlers[type(event)](event, now)

    @property
    def agent_ready(self) -> bool:
        return self.agent_state == READY

    @property
    def buffered_caller_bytes(self) -> int:
        return self._prebuffer_bytes

    def _end(self, reason: str, outcome: str) -> EndCall:
        self.ended = True
        self.outcome = outcome
        self.end_reason = reason
        self.agent_state = CLOSED
        return EndCall(reason=reason, outcome=outcome)

    def _count_invalid(self, kind: str) -> bool:
        """Count a bad input; True the first time this kind is seen (log once, not per frame)."""
        seen = self.stats.invalid.get(kind, 0)
        self.stats.invalid[kind] = seen + 1
        return seen == 0

    # --- Twilio events -------------------------------------------------------------------

    def _on_connected(self, event: TwilioConnected, now: float) -> list[Action]:
        return []

    def _on_start(self, event: TwilioStart, now: float) -> list[Action]:
        if self.streaming or self.stream_sid:
            return [Log("warning", "twilio_start_repeated", {"stream_sid": event.stream_sid})]
        self.streaming = True
        self.stream_started_at = now
        self.stream_sid = event.stream_sid
        self.call_sid = event.call_sid
        self.custom_parameters = dict(event.custom_parameters)
        actions: list[Action] = [
            BindLogContext({"call_sid": event.call_sid, "stream_sid": event.stream_sid}),
            Log("info", "stream_started", {"caller_audio_buffered": self._prebuffer_bytes}),
        ]
        while self._held_agent_audio:
            actions.append(SendToTwilio(twilio_msg.media(self.stream_sid, self._held_agent_audio.popleft())))
        self._held_agent_bytes = 0
        if self.agent_state == IDLE:
            self.agent_state = CONNECTING
            self.agent_connect_started = now
            actions.append(ConnectAgent())
        return actions

    def _on_media(self, event: TwilioMedia, now: float) -> list[Action]:
        if event.stream_sid and self.stream_sid and event.stream_sid != self.stream_sid:
            return self._wrong_stream("media", event.stream_sid)
        data = event.payload
        stats = self.stats
        stats.caller_frames += 1
        stats.caller_bytes += len(data)
        if self._to_agent is not None:
            data = self._to_agent.convert(data)
            if not data:
                return []
        if self.agent_state == READY:
            self._last_sent_to_agent = now
            return [SendToAgent(data)]
        return self._prebuffer_caller_audio(data)

    def _prebuffer_caller_audio(self, data: bytes) -> list[Action]:
        self._prebuffer.append(data)
        self._prebuffer_bytes += len(data)
        dropped = 0
        while self._prebuffer_bytes > self._prebuffer_limit and len(self._prebuffer) > 1:
            old = self._prebuffer.popleft()
            self._prebuffer_bytes -= len(old)
            dropped += len(old)
        if not dropped:
            return []
        self.stats.caller_bytes_dropped += dropped
        if self._count_invalid("caller_prebuffer_overflow"):
            return [
                Log(
                    "warning",
                    "caller_audio_dropped",
                    {"reason": "agent not ready, pre-buffer full", "limit_bytes": self._prebuffer_limit},
                )
            ]
        return []

    def _on_mark(self, event: TwilioMark, now: float) -> list[Action]:
        if event.stream_sid and event.stream_sid != self.stream_sid:
            return self._wrong_stream("mark", event.stream_sid)
        sent_at = self._outstanding_marks.pop(event.name, None)
        if sent_at is not None:
            self.stats.marks_played += 1
            return [Log("debug", "agent_audio_played", {"mark": event.name, "after_s": round(now - sent_at, 3)})]
        if event.name in self._cleared_marks:
            self._cleared_marks.discard(event.name)
            return []  # returned by Twilio because of a clear: that audio was never heard
        if self._count_invalid("unknown_mark"):
            return [Log("warning", "twilio_unknown_mark", {"mark": event.name[:64]})]
        return []

    def _on_dtmf(self, event: TwilioDtmf, now: float) -> list[Action]:
        # digits can be PINs or card numbers: they are PII like transcripts
        fields = {"digit": event.digit} if self.options.log_transcripts else {}
        return [Log("info", "dtmf_received", fields)]

    def _on_stop(self, event: TwilioStop, now: float) -> list[Action]:
        if event.stream_sid and self.stream_sid and event.stream_sid != self.stream_sid:
            return self._wrong_stream("stop", event.stream_sid)
        return [self._end("caller hung up (stop)", "caller_hangup")]

    def _on_twilio_closed(self, event: TwilioClosed, now: float) -> list[Action]:
        return [self._end(f"twilio socket closed (code {event.code})", "caller_hangup")]

    def _on_twilio_invalid(self, event: TwilioInvalid, now: float) -> list[Action]:
        first = self._count_invalid(event.kind)
        actions: list[Action] = []
        if first or event.kind == "bad_start":
            actions.append(Log("warning", "twilio_frame_rejected", {"kind": event.kind, "detail": event.detail}))
        if event.kind == "bad_start" and not self.streaming:
            actions.append(self._end(f"unusable start message: {event.detail}", "bridge_error"))
        return actions

    def _wrong_stream(self, what: str, got: str) -> list[Action]:
        if self._count_invalid("wrong_stream_sid"):
            return [Log("warning", "twilio_wrong_stream_sid", {"message": what, "got": got[:64]})]
        return []

    # --- agent events --------------------------------------------------------------------

    def _on_agent_connected(self, event: AgentConnected, now: float) -> list[Action]:
        return [Log("info", "agent_connected", {"connect_s": round(now - self.agent_connect_started, 3)})]

    def _on_agent_connect_failed(self, event: AgentConnectFailed, now: float) -> list[Action]:
        return [
            Log("error", "agent_connect_failed", {"reason": event.reason}),
            self._end(f"agent connection failed: {event.reason}", "agent_error"),
        ]

    def _on_welcome(self, event: AgentWelcome, now: float) -> list[Action]:
        if self.agent_state != CONNECTING:
            return [Log("warning", "agent_welcome_unexpected", {"state": self.agent_state})]
        self.request_id = event.request_id
        self.agent_state = AWAITING_SETTINGS_APPLIED
        settings = agent_msg.settings(
            self.options.agent,
            self.options.agent_input,
            self.options.agent_output,
            tags=list(self.options.tags),
        )
        self._last_sent_to_agent = now
        return [BindLogContext({"request_id": event.request_id}), SendToAgent(settings)]

    def _on_settings_applied(self, event: AgentSettingsApplied, now: float) -> list[Action]:
        if self.agent_state != AWAITING_SETTINGS_APPLIED:
            return [Log("warning", "agent_settings_applied_unexpected", {"state": self.agent_state})]
        self.agent_state = READY
        self.agent_ready_at = now
        actions: list[Action] = [
            Measure("agent_connect", now - self.agent_connect_started),
            Log(
                "info",
                "agent_ready",
                {
                    "ready_s": round(now - self.agent_connect_started, 3),
                    "buffered_caller_bytes": self._prebuffer_bytes,
                },
            ),
        ]
        while self._prebuffer:
            actions.append(SendToAgent(self._prebuffer.popleft()))
        self._prebuffer_bytes = 0
        self._last_sent_to_agent = now
        return actions

    def _on_agent_audio(self, event: AgentAudio, now: float) -> list[Action]:
        data = event.data
        if self._to_twilio is not None:
            data = self._to_twilio.convert(data)
            if not data:
                return []
        stats = self.stats
        stats.agent_frames += 1
        stats.agent_bytes += len(data)
        if not self.streaming:
            return self._hold_agent_audio(data)
        send = SendToTwilio(twilio_msg.media(self.stream_sid, data))
        if self.first_agent_audio_at is None and self.stream_started_at is not None:
            self.first_agent_audio_at = now
            return [send, Measure("first_agent_audio", now - self.stream_started_at)]
        return [send]

    def _hold_agent_audio(self, data: bytes) -> list[Action]:
        if self._held_agent_bytes + len(data) > self._held_agent_limit:
            self.stats.agent_bytes_dropped += len(data)
            if self._count_invalid("agent_audio_before_start_overflow"):
                return [Log("warning", "agent_audio_dropped", {"reason": "no Twilio stream yet, hold buffer full"})]
            return []
        self._held_agent_audio.append(data)
        self._held_agent_bytes += len(data)
        return []

    def _on_user_started_speaking(self, event: AgentUserStartedSpeaking, now: float) -> list[Action]:
        """Barge-in: the caller talks over the agent, so Twilio must stop playing at once."""
        interrupted = self._agent_speaking or bool(self._outstanding_marks)
        self._agent_speaking = False
        self._cleared_marks.update(self._outstanding_marks)
        self.stats.marks_cleared += len(self._outstanding_marks)
        self._outstanding_marks.clear()
        if self._held_agent_audio:
            self.stats.agent_bytes_dropped += self._held_agent_bytes
            self._held_agent_audio.clear()
            self._held_agent_bytes = 0
        if not self.streaming:
            return []
        actions: list[Action] = [ClearTwilio(twilio_msg.clear(self.stream_sid))]
        if interrupted:
            self.stats.barge_ins += 1
            actions.append(Log("info", "barge_in", {"turn": self.stats.turns}))
            actions.append(Measure("barge_ins"))
        return actions

    def _on_agent_started_speaking(self, event: AgentStartedSpeaking, now: float) -> list[Action]:
        self._agent_speaking = True
        self.stats.turns += 1
        actions: list[Action] = []
        for kind, value in (("total", event.total_latency), ("ttt", event.ttt_latency), ("tts", event.tts_latency)):
            if value is not None:
                actions.append(Measure("agent_latency", value, kind))
        if event.total_latency is not None:
            self.stats.agent_latencies.append(event.total_latency)
        return [
            *actions,
            Log(
                "info",
                "agent_started_speaking",
                {
                    "turn": self.stats.turns,
                    "total_latency": event.total_latency,
                    "tts_latency": event.tts_latency,
                    "ttt_latency": event.ttt_latency,
                },
            ),
        ]

    def _on_agent_audio_done(self, event: AgentAudioDone, now: float) -> list[Action]:
        self._agent_speaking = False
        if not self.streaming:
            return []
        self._mark_seq += 1
        name = f"agent-audio-{self._mark_seq}"
        self._outstanding_marks[name] = now
        return [SendToTwilio(twilio_msg.mark(self.stream_sid, name))]

    def _on_conversation_text(self, event: AgentConversationText, now: float) -> list[Action]:
        self.transcript.append((round(now - self.started_at, 3), event.role, event.content))
        fields: dict[str, Any] = {"role": event.role, "chars": len(event.content)}
        if self.options.log_transcripts:
            fields["content"] = event.content
        return [Log("info", "conversation_text", fields)]

    def _on_thinking(self, event: AgentThinking, now: float) -> list[Action]:
        fields = {"content": event.content} if self.options.log_transcripts else {}
        return [Log("debug", "agent_thinking", fields)]

    def _on_function_call_request(self, event: AgentFunctionCallRequest, now: float) -> list[Action]:
        actions: list[Action] = []
        for fn in event.functions:
            if not fn.client_side:
                actions.append(Log("info", "agent_server_function_called", {"name": fn.name}))
                continue
            # No client-side functions are offered yet: answer so the agent does not wait forever.
            content = json.dumps({"error": f"function {fn.name!r} is not available"})
            actions.append(Log("warning", "agent_function_unavailable", {"name": fn.name, "id": fn.id}))
            actions.append(SendToAgent(agent_msg.function_call_response(fn.id, fn.name, content)))
            self._last_sent_to_agent = now
        return actions

    def _on_warning(self, event: AgentWarning, now: float) -> list[Action]:
        return [
            Log("warning", "agent_warning", {"code": event.code, "description": event.description}),
            Measure("agent_warnings", 1, event.code),
        ]

    def _on_error(self, event: AgentError, now: float) -> list[Action]:
        return [
            Log("error", "agent_error", {"code": event.code, "description": event.description}),
            Measure("agent_errors", 1, event.code),
            self._end(f"agent error {event.code}", "agent_error"),
        ]

    def _on_info(self, event: AgentInfo, now: float) -> list[Action]:
        return [Log("debug", "agent_message", {"type": event.type})]

    def _on_unknown(self, event: AgentUnknown, now: float) -> list[Action]:
        if event.type in self._unknown_types or len(self._unknown_types) >= 32:
            return []
        self._unknown_types.add(event.type)
        return [Log("info", "agent_message_unknown_ignored", {"type": event.type})]

    def _on_agent_invalid(self, event: AgentInvalid, now: float) -> list[Action]:
        if self._count_invalid("agent_invalid"):
            return [Log("warning", "agent_message_rejected", {"detail": event.detail})]
        return []

    def _on_agent_closed(self, event: AgentClosed, now: float) -> list[Action]:
        return [
            Log("warning", "agent_closed", {"code": event.code, "reason": event.reason}),
            self._end("agent closed the session", "agent_closed"),
        ]

    def _on_bridge_stopping(self, event: BridgeStopping, now: float) -> list[Action]:
        return [
            Log(
                "error" if event.outcome == "bridge_error" else "info", "bridge_stopping_call", {"reason": event.reason}
            ),
            self._end(event.reason, event.outcome),
        ]

    # --- clock ---------------------------------------------------------------------------

    def _on_tick(self, event: Tick, now: float) -> list[Action]:
        state = self.agent_state
        if state == READY:
            if now - self._last_sent_to_agent >= self.options.keepalive_after:
                self._last_sent_to_agent = now
                self.stats.keepalives += 1
                return [SendToAgent(agent_msg.KEEP_ALIVE)]
            return []
        waiting = state in (CONNECTING, AWAITING_SETTINGS_APPLIED)
        if waiting and now - self.agent_connect_started > self.options.agent_ready_timeout:
            return [
                Log("error", "agent_not_ready", {"state": state, "timeout_s": self.options.agent_ready_timeout}),
                self._end("agent session not ready in time", "agent_error"),
            ]
        return []

    # --- record --------------------------------------------------------------------------

    def summary(self, now: float) -> dict[str, Any]:
        s = self.stats
        record: dict[str, Any] = {
            "outcome": self.outcome or "in_progress",
            "end_reason": self.end_reason,
            "duration_s": round(now - self.started_at, 3),
            "turns": s.turns,
            "barge_ins": s.barge_ins,
            "caller_frames": s.caller_frames,
            "caller_bytes": s.caller_bytes,
            "agent_frames": s.agent_frames,
            "agent_bytes": s.agent_bytes,
            "caller_bytes_dropped": s.caller_bytes_dropped,
            "agent_bytes_dropped": s.agent_bytes_dropped,
            "keepalives": s.keepalives,
            "marks_played": s.marks_played,
            "marks_cleared": s.marks_cleared,
            "agent_latency_avg_s": (
                round(sum(s.agent_latencies) / len(s.agent_latencies), 3) if s.agent_latencies else None
            ),
            "invalid_inputs": dict(s.invalid),
        }
        if self.agent_ready_at is not None:
            record["agent_ready_s"] = round(self.agent_ready_at - self.agent_connect_started, 3)
        if self.first_agent_audio_at is not None:
            since = self.stream_started_at if self.stream_started_at is not None else self.started_at
            record["first_agent_audio_s"] = round(self.first_agent_audio_at - since, 3)
        return record
