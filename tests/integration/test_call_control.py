"""Call control end to end on 127.0.0.1: a real bridge, the local agent scripted to call
functions, the simulated Twilio caller, Twilio's REST API stand-in and an operator tool
server. What the agent asks, what Twilio is told, and when."""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import app
from app import signing
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.local_agent import LocalAgentConfig, ScriptStep
from app.devtools.simulated_caller import CallResult, SimulatedCaller
from app.devtools.twilio_api import TwilioApiStandIn
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, rest_env, wait_until

pytestmark = pytest.mark.timeout(90)

SIGNING_SECRET = "tool-signing-secret-0123456789"
SALES = "+15551230001"


def caller_audio(*parts: tuple[str, float | str]) -> bytes:
    pcm = b""
    for kind, value in parts:
        pcm += synth.silence(float(value)) if kind == "silence" else synth.speech_like(str(value))
    return synth.encode(pcm, TWILIO_FORMAT)


def profile(telephony: dict[str, Any] | None = None, tools: dict[str, Any] | None = None) -> dict[str, Any]:
    base: dict[str, Any] = json.loads((Path(app.__file__).parent / "profiles" / "default.json").read_text())
    base["bridge"]["telephony"] = {"silence_check_in_seconds": 0, **(telephony or {})}
    if tools:
        base["bridge"]["tools"] = tools
        base["agent"]["think"]["functions"] = [
            {"name": name, "description": f"the operator's {name}", "parameters": {"type": "object", "properties": {}}}
            for name in tools
        ]
    return base


def call(bridge: BridgeHandle, audio: bytes, **kwargs: Any) -> CallResult:
    return asyncio.run(SimulatedCaller(bridge.base_url, TWILIO_TOKEN, **kwargs).run(audio))


def metrics_text(bridge: BridgeHandle) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(bridge.base_url + "/metrics") as response:
        text: str = response.read().decode()
        return text


def note_times(result: CallResult, text: str) -> list[float]:
    return [entry.t for entry in result.timeline if text in entry.text]


# --- end_call and transfer_call through Twilio's REST API -----------------------------------


def test_end_call_hangs_up_through_rest_only_after_the_goodbye_has_played(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    script = [
        ScriptStep(on="utterance", n=1, do="function_call", name="end_call", reply="Goodbye, thanks for calling!")
    ]
    agent = start_agent(LocalAgentConfig(script=script))
    bridge = start_bridge(agent.url, profile(), **rest_env(twilio_api))
    audio = caller_audio(("silence", 0.3), ("speech", "that is all thank you bye"))
    result = call(bridge, audio, tail=15.0, max_tail=15.0, twilio_api=twilio_api)

    assert result.ended_by == "twilio_rest"
    updates = twilio_api.call_updates(result.call_sid)
    assert [u.form for u in updates] == [{"Status": "completed"}]
    goodbye_played = note_times(result, "audio finished")[-1]
    hung_up = note_times(result, "REST update: hang up")[0]
    assert hung_up >= goodbye_played  # never before the caller heard the goodbye
    session = agent.agent.sessions[0]
    assert "end_call" in session.declared_functions
    assert [r.name for r in session.function_responses] == ["end_call"] and not session.unanswered_functions
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "completed" and ended["hangup_reason"] == "end_call" and ended["ended_by"] == "agent"


def test_transfer_to_an_unlisted_destination_is_refused_and_nothing_is_dialled(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    args = '{"destination": "+15559999999"}'
    script = [ScriptStep(on="utterance", n=1, do="function_call", name="transfer_call", arguments=args)]
    agent = start_agent(LocalAgentConfig(script=script))
    bridge = start_bridge(agent.url, profile({"transfer": {"sales": SALES}}), **rest_env(twilio_api))
    result = call(bridge, caller_audio(("silence", 0.3), ("speech", "put me through")), tail=2.0, twilio_api=twilio_api)

    assert result.ended_by == "caller" and twilio_api.call_updates(result.call_sid) == []
    session = agent.agent.sessions[0]
    (answer,) = session.function_responses
    assert "no transfer destination" in answer.content and "sales" in answer.content
    assert bridge.wait_for("call_ended")["outcome"] == "caller_hangup"


def test_transfer_to_a_listed_name_dials_exactly_that_number(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    args = '{"destination": "sales"}'
    steps = [
        ScriptStep(on="utterance", n=1, do="function_call", name="transfer_call", arguments=args, reply="Hold on.")
    ]
    agent = start_agent(LocalAgentConfig(script=steps))
    bridge = start_bridge(agent.url, profile({"transfer": {"sales": SALES}}), **rest_env(twilio_api))
    audio = caller_audio(("silence", 0.3), ("speech", "sales please"))
    result = call(bridge, audio, tail=15.0, max_tail=15.0, twilio_api=twilio_api)

    assert result.ended_by == "transfer"
    assert result.redirected_to is not None and f"<Dial><Number>{SALES}</Number></Dial>" in result.redirected_to
    (update,) = twilio_api.call_updates(result.call_sid)
    assert set(update.form) == {"Twiml"}
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "transferred" and ended["transferred_to"] == "sales"
    # Twilio's stop ended the call before its answer to the REST request: still counted
    assert wait_until(lambda: 'callbridge_call_updates_total{result="ok"} 1.0' in metrics_text(bridge), timeout=5)


# --- operator tools -----------------------------------------------------------------------


class ToolServer:
    """The operator's endpoint: records each request with its headers; behaviour per path."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests.append(
                    {"path": self.path, "body": body, "headers": dict(self.headers), "at": time.time()}
                )
                if self.path == "/slow":
                    time.sleep(5.0)
                if self.path == "/broken":
                    self.send_response(500)
                    self.end_headers()
                    return
                answer = json.dumps({"status": "shipped", "eta_days": 2}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tools() -> Iterator[ToolServer]:
    server = ToolServer()
    yield server
    server.close()


def test_a_signed_tool_and_an_unknown_function_in_one_request_are_both_answered(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], tools: ToolServer
) -> None:
    functions = [{"name": "lookup_order", "arguments": '{"order": "42"}'}, {"name": "get_weather", "arguments": "{}"}]
    agent = start_agent(
        LocalAgentConfig(script=[ScriptStep(on="utterance", n=1, do="function_call", functions=functions)])
    )
    tool_profile = profile(tools={"lookup_order": {"url": tools.url + "/orders", "timeout_seconds": 5}})
    bridge = start_bridge(agent.url, tool_profile, webhook_signing_secret=SIGNING_SECRET)
    call(bridge, caller_audio(("silence", 0.3), ("speech", "where is my order")), tail=2.5)

    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    answers = {r.name: r for r in session.function_responses}
    assert json.loads(answers["lookup_order"].content) == {"status": "shipped", "eta_days": 2}
    assert "There is no function called get_weather" in answers["get_weather"].content
    assert all(r.matched for r in session.function_responses) and not session.unanswered_functions
    (request,) = tools.requests
    payload = json.loads(request["body"])
    assert payload["function"] == "lookup_order" and payload["arguments"] == {"order": "42"}
    assert payload["from"] == "+15550000001" and payload["call_sid"].startswith("CA")
    # the receiver's check from docs/call-control.md accepts it, and would refuse a tampered body
    timestamp, signature = request["headers"]["X-Callbridge-Timestamp"], request["headers"]["X-Callbridge-Signature"]
    assert signing.verify(SIGNING_SECRET.encode(), timestamp, request["body"], signature)
    assert not signing.verify(SIGNING_SECRET.encode(), timestamp, request["body"].replace(b"42", b"43"), signature)


def test_tools_that_fail_time_out_or_cannot_be_reached_are_answered_in_words(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], tools: ToolServer
) -> None:
    functions = [{"name": n, "arguments": "{}"} for n in ("broken", "slow", "gone")]
    agent = start_agent(
        LocalAgentConfig(script=[ScriptStep(on="utterance", n=1, do="function_call", functions=functions)])
    )
    tool_profile = profile(
        tools={
            "broken": {"url": tools.url + "/broken"},
            "slow": {"url": tools.url + "/slow", "timeout_seconds": 1},
            "gone": {"url": "http://127.0.0.1:9/nothing-listens-here"},
        }
    )
    bridge = start_bridge(agent.url, tool_profile)
    call(bridge, caller_audio(("silence", 0.3), ("speech", "check everything")), tail=4.0)

    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    answers = {r.name: r.content for r in session.function_responses}
    assert answers["broken"] == "broken failed: the service answered HTTP 500."
    assert answers["slow"] == "slow did not answer within 1 seconds."
    assert answers["gone"].startswith("gone could not be reached")
    assert not session.unanswered_functions


def test_a_five_second_tool_does_not_delay_a_barge_in_clear(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], tools: ToolServer
) -> None:
    script = [ScriptStep(on="utterance", n=1, do="function_call", name="lookup_order")]
    agent = start_agent(LocalAgentConfig(script=script))
    bridge = start_bridge(
        agent.url, profile(tools={"lookup_order": {"url": tools.url + "/slow", "timeout_seconds": 8}})
    )
    # utterance 1 starts the 5 s tool; 2 s later the agent says it is working on it; the caller
    # talks over that hold message while the tool is still running
    audio = caller_audio(
        ("silence", 0.3), ("speech", "where is my order"), ("silence", 3.2), ("speech", "hello are you there still")
    )
    call(bridge, audio, tail=6.0, max_tail=8.0)

    assert wait_until(lambda: len(tools.requests) == 1)
    tool_from = tools.requests[0]["at"]
    barge_ins = [
        r
        for r in bridge.records("barge_in")
        if tool_from < datetime.datetime.fromisoformat(r["timestamp"]).timestamp() < tool_from + 5.0
    ]
    assert barge_ins, "no barge-in while the tool was running"
    assert bridge.wait_for("call_ended")["clear_latency_ms_max"] < 50  # every clear of the call
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    assert any(i.kind == "InjectAgentMessage" and "One moment" in i.text for i in session.injections)
    assert [r.name for r in session.function_responses] == ["lookup_order"]


# --- keypad, silence, time limit ----------------------------------------------------------------


def test_keypad_digits_reach_the_agent_as_one_message(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url, profile())
    call(bridge, caller_audio(("silence", 1.0)), keys=[(1.0, "1234#")], tail=2.0)

    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    keypad = [i.text for i in session.injections if i.kind == "InjectUserMessage"]
    assert keypad == ["The caller pressed 1 2 3 4 #"]


def test_silence_gets_a_check_in_then_a_goodbye_then_the_line_closes(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url, profile({"silence_check_in_seconds": 2}))  # no REST: the stream is closed
    result = call(bridge, caller_audio(("silence", 0.5)), tail=25.0, max_tail=25.0)

    assert result.ended_by == "bridge"
    session = agent.agent.sessions[0]
    assert wait_until(lambda: session.closed)
    spoken = [i.text for i in session.injections if i.kind == "InjectAgentMessage" and not i.refused]
    assert spoken[0] == "Are you still there?" and spoken[-1].endswith("Goodbye!")
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "completed" and ended["hangup_reason"] == "silence" and ended["ended_by"] == "bridge"


def test_the_maximum_duration_ends_the_call(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], twilio_api: TwilioApiStandIn
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url, profile({"max_call_seconds": 4}), **rest_env(twilio_api))
    result = call(bridge, caller_audio(("silence", 0.5)), tail=20.0, max_tail=20.0, twilio_api=twilio_api)

    assert result.ended_by == "twilio_rest"
    session = agent.agent.sessions[0]
    assert any("time limit" in i.text for i in session.injections)
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "completed" and ended["hangup_reason"] == "max_duration"
    assert 4.0 <= ended["duration_s"] < 20.0


# --- one deployment, several numbers ------------------------------------------------------------


def test_each_dialled_number_gets_its_own_profile_and_others_the_default(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], tmp_path: Path
) -> None:
    sales = profile({"dtmf": False})
    sales["agent"]["greeting"] = "Sales desk, how can I help?"
    numbers = tmp_path / "numbers"
    numbers.mkdir()
    (numbers / "+15551230001.json").write_text(json.dumps(sales))
    agent = start_agent()
    bridge = start_bridge(agent.url, profile(), agent_profiles_dir=numbers)
    audio = caller_audio(("silence", 0.5))
    to_sales = call(bridge, audio, callee="+15551230001", tail=0.5)
    to_other = call(bridge, audio, callee="+15559990000", tail=0.5)

    assert 'name="profile" value="+15551230001"' in to_sales.twiml and 'name="profile"' not in to_other.twiml
    assert wait_until(lambda: len(agent.agent.sessions) == 2 and all(s.closed for s in agent.agent.sessions))
    greetings = [s.settings["agent"]["greeting"] for s in agent.agent.sessions if s.settings is not None]
    assert greetings == ["Sales desk, how can I help?", "Hello! Thanks for calling. How can I help you today?"]
