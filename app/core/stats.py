"""What a call counts while it runs. The parts of the call add to one ``CallStats``; the
pump moves the counters into Prometheus each tick (never per frame) and the call's summary
reads them at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.core.vocabulary import InvalidKind, Overflow


@dataclass(slots=True)  # incremented every frame
class CallStats:
    caller_frames: int = 0
    caller_bytes: int = 0
    agent_frames: int = 0
    agent_bytes: int = 0
    caller_bytes_dropped: int = 0  # pre-buffer overflow (DropReason.AGENT_NOT_READY)
    turns: int = 0
    barge_ins: int = 0
    keepalives: int = 0
    marks_played: int = 0
    marks_cleared: int = 0
    ignored_after_end: int = 0
    functions_called: int = 0
    invalid: dict[InvalidKind, int] = field(default_factory=dict)
    overflows: dict[Overflow, int] = field(default_factory=dict)
    agent_latency_sum: float = 0.0  # the agent's own total latency, summed over its turns (for the average)
    agent_latency_count: int = 0

    def count_invalid(self, kind: InvalidKind) -> bool:
        """Count a bad input; True the first time this kind is seen (log once, not per frame)."""
        seen = self.invalid.get(kind, 0)
        self.invalid[kind] = seen + 1
        return seen == 0

    def count_overflow(self, kind: Overflow) -> bool:
        """Count a bound reached; True the first time (log once, not per frame)."""
        seen = self.overflows.get(kind, 0)
        self.overflows[kind] = seen + 1
        return seen == 0

    def snapshot(self) -> CallStats:
        """A copy for the metrics flush to diff against (latencies are not flushed)."""
        return CallStats(
            caller_frames=self.caller_frames,
            caller_bytes=self.caller_bytes,
            agent_frames=self.agent_frames,
            agent_bytes=self.agent_bytes,
            caller_bytes_dropped=self.caller_bytes_dropped,
            invalid=dict(self.invalid),
            overflows=dict(self.overflows),
        )
