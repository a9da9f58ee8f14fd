"""Under load, the event loop wakes at most once per ``LOOP_BATCH_MS`` and handles at once
every socket that became ready meanwhile.

Each caller frame arrives on its own (50 a second per call, at unrelated moments), so an idle
loop is woken from ``epoll_wait`` for nearly every frame, and each wake-up is the kernel
switching the process in and out: at 50 calls that switching was about a fifth of the
bridge's CPU, more than all of its Python. With batching on, a callback at the end of each
pass of the loop sleeps ``LOOP_BATCH_MS``; the next poll then returns everything that arrived
in the meantime, without blocking. One switch serves several frames.

The price is latency: a frame may wait up to ``LOOP_BATCH_MS`` (on average half) before it is
read. (That holds on uvloop, which ``callbridge serve`` runs on; on the plain asyncio loop the
sleep runs before the I/O callbacks of the same pass, so a frame may wait up to twice that.)
Callers cannot hear a millisecond (the phone network adds tens), but a lightly loaded bridge
has no CPU to save, so batching is on only from ``LOOP_BATCH_MIN_CALLS`` calls in this process
and off again below half that (the gap keeps it from flapping). ``LOOP_BATCH_MS=0`` turns it
off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

CHECK_SECONDS = 1.0
"""How often the process's call count is looked at to turn batching on or off."""


class LoopBatching:
    def __init__(self, interval_s: float, min_calls: int, calls: Callable[[], int], log: Any) -> None:
        self.interval_s = interval_s
        self.min_calls = min_calls
        self._calls = calls
        self._log = log
        self.on = False
        self.passes = 0  # loop passes paced so far (for tests and curiosity)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._woke = 0.0  # when the last pass's sleep ended

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.interval_s > 0:
            self._loop = loop
            self._timer = loop.call_later(CHECK_SECONDS, self.check)

    def stop(self) -> None:
        self.on = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def check(self) -> None:
        assert self._loop is not None
        calls = self._calls()
        if not self.on and calls >= self.min_calls:
            self.on = True
            self._log.info("loop_batching_on", calls=calls, batch_ms=self.interval_s * 1000)
            self._loop.call_soon(self._pace)
        elif self.on and calls < max(1, self.min_calls // 2):
            self.on = False
            self._log.info("loop_batching_off", calls=calls)
        self._timer = self._loop.call_later(CHECK_SECONDS, self.check)

    def _pace(self) -> None:
        """Runs once per pass of the loop while on: the sleep is the batching. A pass that
        already took the interval (a busy process) is not made to wait more."""
        if not self.on or self._loop is None:
            return
        self.passes += 1
        rest = self.interval_s - (time.monotonic() - self._woke)
        if rest > 0:
            time.sleep(rest)
        self._woke = time.monotonic()
        self._loop.call_soon(self._pace)
