"""The call's side of the agent session: open it, send the one Settings, know when it is
ready, and keep it alive. Which of these happens when is decided by ``states.py``; this part
holds the session's facts (times, request id) and builds its messages.
"""

from __future__ import annotations

from typing import Any

from app.agent import messages as agent_msg
from app.core.actions import Action, BindLogContext, ConnectAgent, Log, Measure, SendToAgent
from app.core.call_control import with_functions
from app.core.options import CallOptions
from app.core.stats import CallStats
from app.core.vocabulary import LogLevel, MetricName


class AgentLink:
    __slots__ = ("_options", "_stats", "connect_started", "last_sent", "ready_at", "request_id")

    def __init__(self, options: CallOptions, stats: CallStats, now: float) -> None:
        self._options = options
        self._stats = stats
        self.request_id = ""
        self.connect_started = now
        self.ready_at: float | None = None
        self.last_sent = now  # anything sent to the agent, audio included, defers the keep-alive

    def configure(self, options: CallOptions) -> None:
        """The call's profile is known (before the session is opened)."""
        self._options = options

    def connect(self, now: float) -> list[Action]:
        self.connect_started = now
        return [ConnectAgent()]

    def connected(self, now: float) -> list[Action]:
        return [Log(LogLevel.INFO, "agent_connected", {"connect_s": round(now - self.connect_started, 3)})]

    def send_settings(self, request_id: str, now: float, history: list[dict[str, Any]] | None = None) -> list[Action]:
        """The session's one Settings. ``history`` (a reconnect: Deepgram History messages,
        turns and function calls, see ``Conversation.context``) goes in ``agent.context``
        after the profile's own, and the greeting is left out."""
        self.request_id = request_id
        options = self._options
        agent = with_functions(options.agent, options.telephony)
        if history is not None and isinstance(agent, dict):
            context = agent.get("context", {})
            agent = {key: value for key, value in agent.items() if key != "greeting"}
            agent["context"] = {**context, "messages": [*context.get("messages", []), *history]}
        settings = agent_msg.settings(agent, options.agent_input, options.agent_output, tags=list(options.tags))
        self.last_sent = now
        return [BindLogContext({"request_id": request_id}), SendToAgent(settings)]

    def ready(self, now: float, buffered_bytes: int) -> list[Action]:
        self.ready_at = now
        self.last_sent = now
        took = now - self.connect_started
        return [
            Measure(MetricName.AGENT_CONNECT, took),
            Log(LogLevel.INFO, "agent_ready", {"ready_s": round(took, 3), "buffered_caller_bytes": buffered_bytes}),
        ]

    def keepalive_at(self) -> float:
        return self.last_sent + self._options.keepalive_after

    def ready_deadline(self) -> float:
        return self.connect_started + self._options.agent_ready_timeout

    def keepalive(self, now: float) -> list[Action]:
        self.last_sent = now
        self._stats.keepalives += 1
        return [SendToAgent(agent_msg.KEEP_ALIVE)]

    def not_ready(self, state_name: str) -> list[Action]:
        return [
            Log(
                LogLevel.ERROR, "agent_not_ready", {"state": state_name, "timeout_s": self._options.agent_ready_timeout}
            )
        ]
