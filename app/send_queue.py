"""The bounded send queue of one socket: a peer that stops reading cannot grow memory.

When the queue is full (in items, or in audio bytes), the *oldest audio* makes room for the
new item and is counted; a control message (Settings, a mark, a clear, a function answer) is
never dropped, and only a queue holding nothing but control messages refuses an item. The
queue also says how long items have been waiting without the writer taking any, which is how
the pump tells a stuck peer (``PEER_STUCK_SECONDS`` in ``core/options.py``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class SendQueue(asyncio.Queue[T]):
    def __init__(
        self,
        maxsize: int,
        audio_bytes: Callable[[T], int],
        clock: Callable[[], float],
        audio_limit: int | None = None,
    ) -> None:
        super().__init__(maxsize)
        self._audio_bytes = audio_bytes
        self._clock = clock
        self._audio_limit = audio_limit
        self.queued_audio = 0
        self.dropped_bytes = 0  # audio dropped to make room: the peer was not reading
        self.waiting_since: float | None = None  # since when items wait with none taken
        self.unsent = 0  # items put and not yet done: queued, or taken by the writer and not yet sent

    def put_nowait(self, item: T) -> None:
        size = self._audio_bytes(item)
        if self._audio_limit is not None:
            while self.queued_audio + size > self._audio_limit and self._drop_oldest_audio():
                pass
        if self.full() and not self._drop_oldest_audio():
            raise asyncio.QueueFull
        if self.empty():
            self.waiting_since = self._clock()
        super().put_nowait(item)
        self.queued_audio += size
        self.unsent += 1

    def get_nowait(self) -> T:
        item = super().get_nowait()  # asyncio.Queue.get() ends here too
        self.queued_audio -= self._audio_bytes(item)
        self.waiting_since = self._clock() if not self.empty() else None
        return item

    def task_done(self) -> None:
        super().task_done()
        self.unsent -= 1

    def idle(self) -> bool:
        """Nothing queued and nothing in the writer's hands: a frame written past the queue
        now cannot overtake one (the writer may hold one while the socket is not writable)."""
        return self.unsent == 0

    def _drop_oldest_audio(self) -> int:
        items: deque[T] = self._queue  # type: ignore[attr-defined]
        for index, item in enumerate(items):
            size = self._audio_bytes(item)
            if size:
                del items[index]
                self.task_done()  # it will never be sent: join() must not wait for it
                self.queued_audio -= size
                self.dropped_bytes += size
                if self.empty():
                    self.waiting_since = None
                return size
        return 0

    def stuck_for(self) -> float:
        """Seconds items have waited without the writer taking one (0 when none wait)."""
        return 0.0 if self.waiting_since is None else self._clock() - self.waiting_since
