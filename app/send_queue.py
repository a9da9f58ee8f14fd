"""The bounded send queue of one socket: a peer that stops reading cannot grow memory.

When the queue is full (in items, or in audio bytes), the *oldest audio* makes room for the
new item and is counted; a control message (Settings, a mark, a clear, a function answer) is
never dropped, and only a queue holding nothing but control messages refuses an item. The
queue also says how long items have been waiting without the writer taking any, which is how
the pump tells a stuck peer (``PEER_STUCK_SECONDS`` in ``core/options.py``).

Not an ``asyncio.Queue``: one deque and, only while the writer waits, one future, instead of
three deques and an Event per queue (5 KiB a call for the two queues). One writer per queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SendQueue(Generic[T]):
    __slots__ = (
        "_audio_bytes",
        "_audio_limit",
        "_clock",
        "_getter",
        "_joiner",
        "_queue",
        "dropped_bytes",
        "maxsize",
        "queued_audio",
        "unsent",
        "waiting_since",
    )

    def __init__(
        self,
        maxsize: int,
        audio_bytes: Callable[[T], int],
        clock: Callable[[], float],
        audio_limit: int | None = None,
    ) -> None:
        self.maxsize = maxsize
        self._queue: deque[T] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._joiner: asyncio.Future[None] | None = None
        self._audio_bytes = audio_bytes
        self._clock = clock
        self._audio_limit = audio_limit
        self.queued_audio = 0
        self.dropped_bytes = 0  # audio dropped to make room: the peer was not reading
        self.waiting_since: float | None = None  # since when items wait with none taken
        self.unsent = 0  # items put and not yet done: queued, or taken by the writer and not yet sent

    def qsize(self) -> int:
        return len(self._queue)

    def empty(self) -> bool:
        return not self._queue

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._queue)

    def put_nowait(self, item: T) -> None:
        size = self._audio_bytes(item)
        if self._audio_limit is not None:
            while self.queued_audio + size > self._audio_limit and self._drop_oldest_audio():
                pass
        if self.full() and not self._drop_oldest_audio():
            raise asyncio.QueueFull
        if not self._queue:
            self.waiting_since = self._clock()
        self._queue.append(item)
        self.queued_audio += size
        self.unsent += 1
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    def get_nowait(self) -> T:
        if not self._queue:
            raise asyncio.QueueEmpty
        item = self._queue.popleft()
        self.queued_audio -= self._audio_bytes(item)
        self.waiting_since = self._clock() if self._queue else None
        return item

    async def get(self) -> T:
        while not self._queue:
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        return self.get_nowait()

    def task_done(self) -> None:
        self.unsent -= 1
        joiner = self._joiner
        if self.unsent == 0 and joiner is not None and not joiner.done():
            joiner.set_result(None)

    async def join(self) -> None:
        while self.unsent:
            self._joiner = asyncio.get_running_loop().create_future()
            try:
                await self._joiner
            finally:
                self._joiner = None

    def idle(self) -> bool:
        """Nothing queued and nothing in the writer's hands: a frame written past the queue
        now cannot overtake one (the writer may hold one while the socket is not writable)."""
        return self.unsent == 0

    def _drop_oldest_audio(self) -> int:
        items = self._queue
        for index, item in enumerate(items):
            size = self._audio_bytes(item)
            if size:
                del items[index]
                self.task_done()  # it will never be sent: join() must not wait for it
                self.queued_audio -= size
                self.dropped_bytes += size
                if not items:
                    self.waiting_since = None
                return size
        return 0

    def stuck_for(self) -> float:
        """Seconds items have waited without the writer taking one (0 when none wait)."""
        return 0.0 if self.waiting_since is None else self._clock() - self.waiting_since
