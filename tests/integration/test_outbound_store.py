"""What the processes of one instance (workers) and of several (replicas) share about a call
the bridge placed: every backend of ``app.outbound``'s store says the same, against a real
redis-server and the machine's real SQLite file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import machine_db
from app.devtools.endpoints import free_port
from app.outbound import (
    MachineStore,
    MemoryStore,
    OutboundRecord,
    OutboundStore,
    RedisStore,
    StoreUnavailable,
    get_record,
    get_verdict,
    mark_streamed,
    put_record,
    put_verdict,
    was_streamed,
)
from tests.integration.test_token_store import redis_url as redis_server

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def redis_url() -> Iterator[str]:
    yield from redis_server.__wrapped__()  # type: ignore[attr-defined]


def record() -> OutboundRecord:
    return OutboundRecord(
        key=OutboundRecord.new_key(),
        to="+15550100001",
        from_="+15557654321",
        profile="reminders",
        variables={"name": "Ada"},
        voicemail="Hello Ada.",
        amd=True,
        amd_timeout=30,
    )


async def exercise(one: OutboundStore, other: OutboundStore) -> None:
    """Written by one process, read by another, by our key and then by the CallSid."""
    placed = record()
    await put_record(one, placed)
    assert await get_record(other, placed.key) == placed
    assert await get_record(other, "CA" + "1" * 32) is None
    placed.call_sid = "CA" + "1" * 32
    await put_record(one, placed)
    assert await get_record(other, placed.call_sid) == placed
    assert await get_verdict(other, placed.call_sid) is None and not await was_streamed(other, placed.call_sid)
    await put_verdict(other, placed.call_sid, "machine_end_beep", 4100)
    await mark_streamed(one, placed.call_sid)
    assert await get_verdict(one, placed.call_sid) == ("machine_end_beep", 4100)
    assert await was_streamed(other, placed.call_sid)
    await put_verdict(one, "CA" + "2" * 32, "human", None)
    assert await get_verdict(other, "CA" + "2" * 32) == ("human", None)
    # a value past its expiry is gone
    await one.put_value("call:gone", "x", time.time() - 1)
    assert await other.get_value("call:gone") is None


async def exercise_and_close(one: OutboundStore, other: OutboundStore) -> None:
    try:
        await exercise(one, other)
    finally:
        await one.close()
        await other.close()


def test_memory_store() -> None:
    store = MemoryStore()
    asyncio.run(exercise(store, store))


def test_two_workers_share_the_machines_file(tmp_path: Path) -> None:
    machine_db.create(tmp_path)
    path = machine_db.path_in(tmp_path)
    asyncio.run(exercise_and_close(MachineStore(path), MachineStore(path)))


def test_two_replicas_share_redis(redis_url: str) -> None:
    asyncio.run(exercise_and_close(RedisStore(redis_url), RedisStore(redis_url)))


def test_an_unreachable_redis_is_an_error_the_api_can_answer() -> None:
    async def run() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(StoreUnavailable):
            await put_record(store, record())
        with pytest.raises(StoreUnavailable):
            await get_record(store, "ob_x")
        await store.close()

    asyncio.run(run())
