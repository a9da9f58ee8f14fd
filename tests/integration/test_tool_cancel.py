"""An operator tool request still pending when the call ends: the bridge's teardown cancels
it and the tool server sees its connection close at once (not at the tool's time limit), with
a real bridge, the local agent, the simulated caller and a tool server that never answers."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator

import pytest

from app.devtools.local_agent import LocalAgentConfig, ScriptStep
from tests.conftest import AgentHandle, BridgeHandle, wait_until
from tests.integration.test_call_control import call, caller_audio, profile
from tests.tool_server import ToolServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tools() -> Iterator[ToolServer]:
    server = ToolServer()
    yield server
    server.close()


def test_the_callers_hang_up_closes_a_pending_tool_request_at_once(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], tools: ToolServer
) -> None:
    script = [ScriptStep(on="utterance", n=1, do="function_call", name="lookup_order")]
    agent = start_agent(LocalAgentConfig(script=script))
    # 30 s: neither the core's deadline nor the request's own can end it during the call
    bridge = start_bridge(
        agent.url, profile(tools={"lookup_order": {"url": tools.url + "/hang", "timeout_seconds": 30}})
    )
    # the caller asks, then hangs up 3 s later while the tool has not answered
    call(bridge, caller_audio(("silence", 0.3), ("speech", "where is my order")), tail=3.0, max_tail=3.0)
    hung_up = time.time()

    request = tools.wait_for_request("/hang", timeout=1.0)
    connection = request.connection
    assert connection.closed.wait(3.0), "the tool server still holds the request of a call that has ended"
    assert connection.closed_wall is not None
    assert connection.closed_wall - request.wall > 2.0  # it was pending until the caller hung up
    assert connection.closed_wall - hung_up < 2.0
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "caller_hangup"
    # the teardown closed it before writing the call's record
    assert connection.closed_wall <= datetime.datetime.fromisoformat(ended["timestamp"]).timestamp() + 0.5
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert [r.name for r in session.function_responses] == []  # the call ended first
    assert len(tools.requests) == 1
