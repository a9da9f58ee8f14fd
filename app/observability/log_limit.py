"""A bound on log lines an attacker can cause. Refusals (forged webhooks, refused streams,
bad frames) are logged at most ``limit`` times per event name per ``interval``; past that,
one line per interval says how many were left out. The metrics keep the full count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LIMIT = 10
"""Lines per event name per interval: enough to see what is happening and to whom."""
INTERVAL_SECONDS = 10.0


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class LogLimiter:
    def __init__(
        self, limit: int = LIMIT, interval: float = INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.interval = interval
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def allow(self, event: str) -> tuple[bool, int]:
        """Whether to log this line, and how many lines of ``event`` the previous interval left
        out (to say once, when it is more than zero)."""
        now = self._clock()
        window = self._windows.get(event)
        left_out = 0
        if window is None or now - window.started >= self.interval:
            left_out = window.suppressed if window is not None else 0
            window = self._windows[event] = _Window(now)
        if window.logged < self.limit:
            window.logged += 1
            return True, left_out
        window.suppressed += 1
        return False, left_out

    def warn(self, log: Any, event: str, **fields: Any) -> None:
        """``log.warning(event, **fields)`` within the bound."""
        allowed, left_out = self.allow(event)
        if left_out:
            log.warning("log_lines_left_out", left_out_event=event, count=left_out, interval_s=self.interval)
        if allowed:
            log.warning(event, **fields)
