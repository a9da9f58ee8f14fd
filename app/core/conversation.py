"""What was said: the transcript kept for the call record, turns and agent latencies, and the
privacy rule for logs. Utterances, the agent's thinking and keypad digits are PII (PINs,
card numbers): their text reaches the log only with ``log_transcripts``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from app.core.actions import Action, Log, Measure
from app.core.events import AgentConversationText, AgentStartedSpeaking, AgentThinking, TwilioDtmf
from app.core.heard import Utterance
from app.core.stats import CallStats
from app.core.vocabulary import LogLevel, MetricName

FUNCTION_CALL_FIELDS: dict[str, type] = {
    "id": str,
    "name": str,
    "client_side": bool,
    "arguments": str,
    "response": str,
}
"""What a function call in Deepgram's History holds (all of it is needed to give it back)."""

MAX_TRANSCRIPT_TURNS = 1000
"""Turns of the transcript the call record keeps: the latest ones (the earlier are counted as
``transcript_turns_dropped``). A turn every few seconds for an hour is about this many; each
is one ConversationText, so at most a few hundred KB in all."""

MAX_CONTEXT_MESSAGES = 200
"""History messages kept to give a reconnected agent the conversation so far: the latest
ones. The agent's model has a context window of its own; this is far more than a model uses
and keeps a four-hour call's reconnect from carrying (and a Settings message from growing
with) every word of it."""


class Conversation:
    __slots__ = ("_log_text", "_started_at", "_stats", "context", "cut_short", "keep", "transcript", "turns_dropped")

    def __init__(self, log_transcripts: bool, stats: CallStats, started_at: float, keep: bool = True) -> None:
        self.keep = keep  # the transcript is kept for the posted call record (CALL_EVENTS_TRANSCRIPT)
        self._log_text = log_transcripts
        self._stats = stats
        self._started_at = started_at
        # (seconds into the call, role, text), the latest MAX_TRANSCRIPT_TURNS
        self.transcript: deque[tuple[float, str, str]] = deque(maxlen=MAX_TRANSCRIPT_TURNS)
        self.turns_dropped = 0  # the earliest turns that no longer fit
        # turn number (counted from the first, dropped or not) of an assistant turn -> what was heard
        self.cut_short: dict[int, Utterance] = {}
        # the conversation as Deepgram's History messages, in order: the turns and the function
        # calls with their answers; a new session after a loss is given it in agent.context
        self.context: deque[dict[str, Any]] = deque(maxlen=MAX_CONTEXT_MESSAGES)

    def interrupted(self, utterance: Utterance) -> None:
        """The caller cut the agent short: the latest assistant turn is the one they heard part of."""
        for index in range(len(self.transcript) - 1, -1, -1):
            if self.transcript[index][1] == "assistant":  # the first cut of a turn is what counts
                self.cut_short.setdefault(self.turns_dropped + index, utterance)
                return

    def record(self) -> list[dict[str, Any]]:
        """The transcript for the call record (where allowed): each turn kept, and what of an
        assistant turn was heard when the caller talked over it."""
        turns: list[dict[str, Any]] = []
        for number, (t, role, text) in enumerate(self.transcript, start=self.turns_dropped):
            turn: dict[str, Any] = {"t": t, "role": role, "content": text}
            cut = self.cut_short.get(number)
            if cut is not None:
                turn.update(cut.as_record())
            turns.append(turn)
        return turns

    def text(self, event: AgentConversationText, now: float) -> list[Action]:
        if self.keep:
            if len(self.transcript) == MAX_TRANSCRIPT_TURNS:  # the oldest turn goes, and what was heard of it
                self.cut_short.pop(self.turns_dropped, None)
                self.turns_dropped += 1
            self.transcript.append((round(now - self._started_at, 3), event.role, event.content))
        if event.role in ("user", "assistant") and event.content:
            self.context.append({"type": "History", "role": event.role, "content": event.content})
        fields: dict[str, Any] = {"role": event.role, "chars": len(event.content)}
        if self._log_text:  # the operator asked to see the conversation: at INFO, with the words
            fields["content"] = event.content
            return [Log(LogLevel.INFO, "conversation_text", fields)]
        return [Log(LogLevel.DEBUG, "conversation_text", fields)]  # per turn: DEBUG, as docs/operations.md says

    def history(self, body: dict[str, Any]) -> None:
        """Deepgram's own History message. Its turns are the ConversationText already kept;
        its function calls (ours and the server-side ones, each with its answer) are not, and
        a reconnected agent must know what it already did (a transfer looked up, an order placed)."""
        calls = body.get("function_calls")
        if not isinstance(calls, list):
            return
        kept = [
            {key: call[key] for key in FUNCTION_CALL_FIELDS}
            for call in calls
            if isinstance(call, dict) and all(isinstance(call.get(k), t) for k, t in FUNCTION_CALL_FIELDS.items())
        ]
        if kept:
            self.context.append({"type": "History", "function_calls": kept})

    def thinking(self, event: AgentThinking) -> list[Action]:
        fields = {"content": event.content} if self._log_text else {}
        return [Log(LogLevel.DEBUG, "agent_thinking", fields)]

    def keypad(self, event: TwilioDtmf) -> list[Action]:
        fields = {"digit": event.digit} if self._log_text else {}
        return [Log(LogLevel.INFO, "dtmf_received", fields)]

    def agent_turn(self, event: AgentStartedSpeaking) -> list[Action]:
        stats = self._stats
        stats.turns += 1
        actions: list[Action] = []
        for kind, value in (("total", event.total_latency), ("ttt", event.ttt_latency), ("tts", event.tts_latency)):
            if value is not None:
                actions.append(Measure(MetricName.AGENT_LATENCY, value, kind))
        if event.total_latency is not None:
            stats.agent_latency_sum += event.total_latency
            stats.agent_latency_count += 1
        actions.append(
            Log(
                LogLevel.DEBUG,  # per turn; the latencies are in the metric and the call record
                "agent_started_speaking",
                {
                    "turn": stats.turns,
                    "total_latency": event.total_latency,
                    "tts_latency": event.tts_latency,
                    "ttt_latency": event.ttt_latency,
                },
            )
        )
        return actions
