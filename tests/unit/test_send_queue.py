"""The pump's bounded send queue: a peer that stops reading costs bounded memory."""

from __future__ import annotations

import asyncio

import pytest

from app.send_queue import SendQueue


def queue(maxsize: int, now: list[float], audio_limit: int | None = None) -> SendQueue[bytes | str]:
    return SendQueue(maxsize, lambda item: len(item) if isinstance(item, bytes) else 0, lambda: now[0], audio_limit)


def test_a_full_queue_drops_its_oldest_audio_and_never_a_control_message() -> None:
    q = queue(3, [0.0])
    for item in ("settings", b"a1", b"a2"):
        q.put_nowait(item)
    q.put_nowait(b"a3")  # full: the oldest audio, a1, makes room
    q.put_nowait("answer")  # and a2 for a control message
    assert list(q._queue) == ["settings", b"a3", "answer"]  # type: ignore[attr-defined]
    assert q.dropped_bytes == 4 and q.queued_audio == 2
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait("too")  # b"a3" goes; then nothing but control messages: refused
        q.put_nowait("many")


def test_the_audio_bound_holds_whatever_the_item_count() -> None:
    q = queue(100, [0.0], audio_limit=10)
    for _ in range(5):
        q.put_nowait(b"x" * 4)
    assert q.queued_audio <= 10 and q.dropped_bytes == 12 and q.qsize() == 2


def test_waiting_time_counts_from_when_items_wait_untaken() -> None:
    now = [100.0]
    q = queue(10, now)
    assert q.stuck_for() == 0.0
    q.put_nowait(b"a")
    now[0] = 103.0
    q.put_nowait(b"b")
    assert q.stuck_for() == 3.0  # since the first item waited, not since the last put
    q.get_nowait()
    assert q.stuck_for() == 0.0  # taken just now; b waits from now on
    now[0] = 104.0
    assert q.stuck_for() == 1.0
    q.get_nowait()
    assert q.stuck_for() == 0.0
