"""app.operator_tools against a real HTTP server on 127.0.0.1 (tests/tool_server.py): the
answers turned into content or sentences, timeouts, the size cap, proxies, the pool of each
loop, and cancellation closing the connection at once without any thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app import signing
from app.devtools.endpoints import free_port
from app.operator_tools import MAX_ANSWER_BYTES, aclose_clients, call_tool
from tests.tool_server import ANSWER, ToolServer

pytestmark = pytest.mark.timeout(30)

PAYLOAD: dict[str, Any] = {
    "call_sid": "CA0123",
    "from": "+15550000001",
    "to": "+15550000002",
    "function": "lookup_order",
    "arguments": {"order": "42"},
}
SECRET = b"tool-signing-secret-0123456789"


@pytest.fixture
def tools() -> Iterator[ToolServer]:
    server = ToolServer()
    yield server
    server.close()


def call(url: str, limit_s: float = 5.0, secret: bytes | None = None) -> tuple[str, bool]:
    return asyncio.run(call_tool(url, PAYLOAD, secret, limit_s))


async def wait_for(predicate: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# --- answers --------------------------------------------------------------------------------


def test_a_json_answer_is_passed_on_compact_and_the_request_is_signed_json(tools: ToolServer) -> None:
    assert call(tools.url + "/json", secret=SECRET) == (json.dumps(ANSWER, separators=(",", ":")), False)
    (request,) = tools.requests
    assert json.loads(request.body) == PAYLOAD
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "callbridge"
    assert request.headers["accept-encoding"] == "identity"
    timestamp, signature = request.headers["x-callbridge-timestamp"], request.headers["x-callbridge-signature"]
    assert signing.verify(SECRET, timestamp, request.body, signature)


def test_without_a_secret_nothing_is_signed(tools: ToolServer) -> None:
    assert call(tools.url + "/json")[1] is False
    assert not any(name.startswith("x-callbridge") for name in tools.requests[0].headers)


def test_a_text_answer_is_passed_as_it_is_and_invalid_json_is_a_failure(tools: ToolServer) -> None:
    assert call(tools.url + "/text") == ("Order 42 ships on Monday.", False)
    assert call(tools.url + "/invalid-json") == ("lookup_order answered with invalid JSON.", True)


@pytest.mark.parametrize("status", [500, 404, 302, 307])
def test_a_status_other_than_2xx_is_a_failure_and_a_redirect_is_not_followed(tools: ToolServer, status: int) -> None:
    assert call(tools.url + f"/status/{status}") == (f"lookup_order failed: the service answered HTTP {status}.", True)
    assert [r.path for r in tools.requests] == [f"/status/{status}"]


def test_a_tool_nobody_listens_for_cannot_be_reached() -> None:
    content, failed = call(f"http://127.0.0.1:{free_port()}/nothing")
    assert failed and content == "lookup_order could not be reached (ConnectionRefusedError)."


def test_an_answer_larger_than_the_cap_is_refused_declared_or_streamed(tools: ToolServer) -> None:
    refused = (f"lookup_order answered with more than {MAX_ANSWER_BYTES // 1024} KB, which is too much to use.", True)
    assert call(tools.url + "/big") == refused
    started = time.monotonic()
    assert call(tools.url + "/endless", limit_s=10.0) == refused
    assert time.monotonic() - started < 2.0  # stopped reading at the cap, not at the deadline
    endless = tools.wait_for_request("/endless").connection
    assert endless.closed.wait(2.0)  # and that connection was closed, not pooled


# --- time limits and cancellation -------------------------------------------------------------


def test_a_slow_tool_is_answered_with_the_timeout_sentence_and_left(tools: ToolServer) -> None:
    started = time.monotonic()
    assert call(tools.url + "/slow", limit_s=0.5) == ("lookup_order did not answer within 0.5 seconds.", True)
    assert 0.4 < time.monotonic() - started < 1.5
    assert tools.wait_for_request("/slow").connection.closed.wait(2.0)


def test_an_answer_dripping_in_is_cut_at_the_deadline_of_the_whole_request(tools: ToolServer) -> None:
    # each byte comes 0.2 s after the last (no single read waits 1 s); 100 of them take 20 s
    started = time.monotonic()
    assert call(tools.url + "/drip", limit_s=1.0) == ("lookup_order did not answer within 1 seconds.", True)
    assert 0.9 < time.monotonic() - started < 2.0
    assert tools.wait_for_request("/drip").connection.closed.wait(2.0)


def test_cancelling_the_awaiting_task_closes_the_connection_at_once(tools: ToolServer) -> None:
    async def scenario() -> float:
        task = asyncio.create_task(call_tool(tools.url + "/hang", PAYLOAD, SECRET, 30.0))
        await wait_for(lambda: tools.requests)
        await asyncio.sleep(0.1)  # the request is pending: the server holds its answer
        assert not task.done()
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the loop goes on (nothing closes the pool behind the test's back)
        assert await call_tool(tools.url + "/json", PAYLOAD, None, 5.0) == (
            json.dumps(ANSWER, separators=(",", ":")),
            False,
        )
        return cancelled_at

    cancelled_at = asyncio.run(scenario())
    hang, after = tools.requests
    assert hang.connection.closed.wait(2.0), "the tool server never saw the connection close"
    assert hang.connection.closed_at is not None and hang.connection.closed_at - cancelled_at < 0.5
    assert after.connection is not hang.connection  # never handed back to the pool half-read


def test_no_thread_is_started_by_requests_timeouts_or_cancellation(tools: ToolServer) -> None:
    async def scenario() -> tuple[int, int]:
        before = threading.active_count()
        await call_tool(tools.url + "/json", PAYLOAD, SECRET, 5.0)
        await call_tool(tools.url + "/slow", PAYLOAD, SECRET, 0.2)
        await call_tool(f"http://127.0.0.1:{free_port()}/", PAYLOAD, SECRET, 5.0)
        task = asyncio.create_task(call_tool(tools.url + "/hang", PAYLOAD, SECRET, 30.0))
        await wait_for(lambda: any(r.path == "/hang" for r in tools.requests))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return before, threading.active_count()

    before, after = asyncio.run(scenario())
    assert after == before, [t.name for t in threading.enumerate()]


# --- clients: one pool per loop -----------------------------------------------------------------


def test_a_loop_reuses_its_connection_and_closes_it_when_the_loop_ends(tools: ToolServer) -> None:
    async def twice() -> None:
        for _ in range(2):
            assert (await call_tool(tools.url + "/json", PAYLOAD, None, 5.0))[1] is False

    asyncio.run(twice())
    first, second = tools.requests
    assert first.connection is second.connection
    assert first.connection.closed.wait(2.0)  # asyncio.run's end closed the pool


def test_aclose_clients_closes_the_running_loops_pooled_connections(tools: ToolServer) -> None:
    async def scenario() -> None:
        assert (await call_tool(tools.url + "/json", PAYLOAD, None, 5.0))[1] is False
        connection = tools.requests[0].connection
        await asyncio.sleep(0.1)
        assert not connection.closed.is_set()  # kept alive for the next request
        await aclose_clients()
        await wait_for(connection.closed.is_set, within=2.0)
        await aclose_clients()  # twice is harmless
        assert (await call_tool(tools.url + "/json", PAYLOAD, None, 5.0))[1] is False  # a new client

    asyncio.run(scenario())
    assert tools.requests[1].connection is not tools.requests[0].connection


def test_loops_in_several_threads_each_use_their_own_client(tools: ToolServer) -> None:
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(3)

    async def scenario() -> None:
        for _ in range(3):
            results.append(await call_tool(tools.url + "/json", PAYLOAD, None, 5.0))
            await asyncio.sleep(0)

    def worker() -> None:
        barrier.wait(5)
        asyncio.run(scenario())

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 9 and not any(failed for _, failed in results)
    assert len({r.connection.number for r in tools.requests}) == 3  # one pooled connection per loop
    assert all(c.closed.wait(2.0) for c in tools.connections)


# --- proxies --------------------------------------------------------------------------------------


def test_a_loopback_tool_is_reached_directly_whatever_the_proxy_variables(
    tools: ToolServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    assert call(tools.url + "/json")[1] is False


def test_another_host_is_reached_through_the_environments_proxy(
    tools: ToolServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", tools.url)  # the tool server answers as a forward proxy
    assert call("http://tools.example.invalid/json")[1] is False
    (request,) = tools.requests
    assert request.target == "http://tools.example.invalid/json"
