"""The AMD verdict's bell: a callback landing in the process of the call wakes its watcher at
once; nothing is kept for calls nobody watches."""

from __future__ import annotations

import asyncio

from app.outbound import VerdictBell


def test_a_ring_wakes_the_watcher_of_that_call_only() -> None:
    async def run() -> tuple[bool, bool]:
        bell = VerdictBell()
        mine, other = bell.listen("CA1"), bell.listen("CA2")
        waiter = asyncio.create_task(mine.wait())
        bell.ring("CA1")
        await asyncio.wait_for(waiter, 60)  # woken by the ring, not a timeout
        return mine.is_set(), other.is_set()

    assert asyncio.run(run()) == (True, False)


def test_a_ring_for_a_call_nobody_watches_keeps_nothing() -> None:
    bell = VerdictBell()
    bell.ring("CA-unknown")  # a forged or late callback
    assert bell._waiting == {}
    bell.listen("CA1")
    bell.forget("CA1")
    assert bell._waiting == {}
