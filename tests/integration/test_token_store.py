"""Stream tokens are single-use across replicas sharing one Redis: a real redis-server,
started here on a free loopback port, and two bridges that share it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from app.devtools.endpoints import free_port, wait_for_port
from app.devtools.simulated_caller import SimulatedCaller, parse_twiml
from app.twilio import token_store
from app.twilio.token_store import RedisTokenStore, TokenStoreUnavailable
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server); .ci/run installs it")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc, timeout=10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(5)


def test_the_store_says_yes_once_per_nonce_and_forgets_it_at_expiry(redis_url: str) -> None:
    async def run() -> tuple[bool, bool, bool]:
        store = RedisTokenStore(redis_url)
        try:
            # two seconds ahead: a loaded machine may cross a second boundary between the two uses
            soon = int(time.time()) + 2
            first, again = await store.use_once("nonce-a", soon), await store.use_once("nonce-a", soon)
            await asyncio.sleep(max(0.0, soon - time.time()) + 0.2)
            after_expiry = await store.use_once("nonce-a", int(time.time()) + 60)
            return first, again, after_expiry
        finally:
            await store.close()

    assert asyncio.run(run()) == (True, False, True)


def test_an_unreachable_store_is_an_error_the_bridge_can_act_on() -> None:
    async def run() -> None:
        store = RedisTokenStore(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
        try:
            await store.use_once("n", int(time.time()) + 60)
        finally:
            await store.close()

    with pytest.raises(TokenStoreUnavailable):
        asyncio.run(run())


def test_a_token_used_on_one_replica_is_refused_on_another(
    redis_url: str,
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a loaded test machine can take over a second to connect: that is the fallback's case, not this one
    monkeypatch.setattr(token_store, "TIMEOUT_SECONDS", 10.0)
    agent = start_agent()
    first = start_bridge(agent.url, redis_url=redis_url)
    second = start_bridge(agent.url, redis_url=redis_url)  # same STREAM_TOKEN_SECRET, own process memory
    caller = SimulatedCaller(first.base_url, TWILIO_TOKEN)
    _, params = parse_twiml(caller.post_webhook()[1])

    assert stream(second, caller, params) == 1000  # redeemed on the second replica: a call
    assert stream(first, caller, params) == 1008  # replayed on the first: refused
    refused = second.wait_for("stream_token_rejected")  # logging goes to the last bridge's buffer
    assert refused["problem"] == "already used"
    assert len(agent.agent.sessions) == 1


def test_without_redis_answering_a_call_still_goes_through(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    _, params = parse_twiml(caller.post_webhook()[1])
    assert stream(bridge, caller, params) == 1000
    assert bridge.wait_for("token_store_unavailable")["fallback"] == "single use checked in this process"
    assert stream(bridge, caller, params) == 1008  # and single use still holds in this process


def stream(bridge: BridgeHandle, caller: SimulatedCaller, params: dict[str, str]) -> int | None:
    """Open the media stream on ``bridge`` with ``params``, say a little, hang up."""
    url = bridge.base_url.replace("http://", "ws://") + "/twilio/media"

    async def run() -> int | None:
        async with await caller.open_stream(url) as ws:
            await ws.send(caller.start_message(params))
            await asyncio.sleep(0.5)
            with contextlib.suppress(ConnectionClosed):  # a refused stream is closed by now
                stop: dict[str, Any] = {"event": "stop", "streamSid": caller.stream_sid, "stop": {}}
                await ws.send(json.dumps(stop))
                async for _ in ws:
                    pass
            return ws.close_code

    return asyncio.run(asyncio.wait_for(run(), 10))
