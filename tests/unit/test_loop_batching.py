"""Loop batching on a real event loop: on from the threshold, off below half of it, and while
on, each pass of the loop sleeps once, so what arrives meanwhile is read in one poll."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

from app import loop_batching
from app.loop_batching import LoopBatching


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_on_from_the_threshold_off_below_half_with_one_line_each() -> None:
    calls = [0]
    log = Log()

    async def main() -> LoopBatching:
        batching = LoopBatching(0.001, 20, lambda: calls[0], log)
        batching._loop = asyncio.get_running_loop()
        for count, on in ((19, False), (20, True), (15, True), (10, True), (9, False), (12, False), (25, True)):
            calls[0] = count
            batching.check()
            assert batching.on is on, count
            await asyncio.sleep(0.01)
        batching.stop()
        return batching

    batching = asyncio.run(main())
    assert [event for event, _ in log.lines] == ["loop_batching_on", "loop_batching_off", "loop_batching_on"]
    assert batching.passes > 0


WRITTEN = [0]  # bytes write_for sent


def write_for(sockets: list[socket.socket], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in sockets:
            WRITTEN[0] += sock.send(b"x")
        time.sleep(0.0005)


def test_while_on_the_loop_passes_at_most_once_per_interval_reading_all_that_arrived(monkeypatch: Any) -> None:
    """Ten sockets written every 0.5 ms by another thread. Batched at 20 ms, the loop runs at
    most one pass per 20 ms (by construction, whatever the machine's load: a loop that did not
    sleep would run thousands) and each pass reads several sockets at once; nothing is lost."""
    monkeypatch.setattr(loop_batching, "CHECK_SECONDS", 0.01)

    async def main() -> tuple[int, int, float, int, int]:
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(10)]
        reads, got = [0], [0]

        def readable(sock: socket.socket) -> None:
            got[0] += len(sock.recv(65536))
            reads[0] += 1

        for ours, _ in pairs:
            ours.setblocking(False)
            loop.add_reader(ours, readable, ours)
        batching = LoopBatching(0.02, 1, lambda: 1, Log())
        batching.start(loop)
        await asyncio.sleep(0.05)  # the first check turns it on
        passes_before, reads[0] = batching.passes, 0
        began = time.monotonic()
        writer = threading.Thread(target=write_for, args=([theirs for _, theirs in pairs], 0.3))
        writer.start()
        sent = await asyncio.to_thread(lambda: (writer.join(), WRITTEN[0])[1])
        await asyncio.sleep(0.05)  # the last writes are read
        passes = batching.passes - passes_before
        took = time.monotonic() - began
        batching.stop()
        for ours, theirs in pairs:
            loop.remove_reader(ours)
            ours.close()
            theirs.close()
        return passes, reads[0], took, sent, got[0]

    WRITTEN[0] = 0
    passes, reads, took, sent, got = asyncio.run(main())
    assert passes <= took / 0.02 + 2  # the one in progress at the start, and the one at the end
    assert reads / passes > 3  # each pass found several sockets ready
    assert got == sent  # every byte written was read


def test_a_pass_that_already_took_the_interval_does_not_sleep(monkeypatch: Any) -> None:
    """ "At most once per interval": a busy pass is not made to wait more; a quick one waits
    only the rest of the interval."""
    slept: list[float] = []
    monkeypatch.setattr(loop_batching.time, "sleep", slept.append)

    async def main() -> None:
        batching = LoopBatching(0.002, 1, lambda: 1, Log())
        batching._loop = asyncio.get_running_loop()
        batching.on = True
        batching._woke = time.monotonic() - 0.005  # the pass since the last wake took 5 ms
        batching._pace()
        batching._woke = time.monotonic()  # a pass that took no time
        batching._pace()
        batching.on = False

    asyncio.run(main())
    assert len(slept) == 1 and 0.0015 < slept[0] <= 0.002
