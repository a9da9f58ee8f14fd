"""The live call API through real sockets: a real bridge, the local agent, simulated callers;
the routes of ``app.live.api`` as an operator's tools use them."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from tests.conftest import AgentHandle, BridgeHandle, wait_until
from tests.integration.test_faults import CallInThread

pytestmark = pytest.mark.timeout(90)

TOKEN = "operator-token-for-the-live-api-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def talk(seconds: float) -> bytes:
    """A caller who says something every couple of seconds for ``seconds``."""
    pcm = b""
    while len(pcm) < seconds * 16000:
        pcm += synth.silence(1.2) + synth.speech_like("hello there how are you")
    return synth.encode(pcm, TWILIO_FORMAT)


def api(bridge: BridgeHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("headers", AUTH)
    return httpx.request(method, bridge.base_url + path, timeout=5.0, **kwargs)


def live_calls(bridge: BridgeHandle) -> list[dict[str, Any]]:
    response = api(bridge, "GET", "/api/calls")
    assert response.status_code == 200, response.text
    calls: list[dict[str, Any]] = response.json()["calls"]
    return calls


def wait_listed(bridge: BridgeHandle, call_sid: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in live_calls(bridge):
            if line["call_sid"] == call_sid:
                return line
        time.sleep(0.05)
    raise AssertionError(f"{call_sid} not listed within {timeout} s")


class EventReader:
    """``GET /api/calls/{sid}/events`` read on its own thread, as a console does."""

    def __init__(self, bridge: BridgeHandle, call_sid: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.closed_at: float | None = None
        self.ended_at: float | None = None  # when the ``ended`` event arrived
        self.status = 0
        self.content_type = ""
        self.thread = threading.Thread(target=self._read, args=(bridge, call_sid), daemon=True)
        self.thread.start()

    def _read(self, bridge: BridgeHandle, call_sid: str) -> None:
        url = f"{bridge.base_url}/api/calls/{call_sid}/events"
        with httpx.stream("GET", url, headers=AUTH, timeout=httpx.Timeout(5.0, read=60.0)) as response:
            self.status = response.status_code
            self.content_type = response.headers.get("content-type", "")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
                    if self.events[-1]["type"] == "ended":
                        self.ended_at = time.monotonic()
        self.closed_at = time.monotonic()

    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        assert wait_until(lambda: any(predicate(e) for e in self.events), timeout), self.events
        return next(e for e in self.events if predicate(e))


@pytest.fixture
def agent(start_agent: Callable[..., AgentHandle]) -> AgentHandle:
    return start_agent()


@pytest.fixture
def bridge(start_bridge: Callable[..., BridgeHandle], agent: AgentHandle) -> BridgeHandle:
    return start_bridge(agent.url, operator_token=TOKEN, console_transcripts=True)


def client_messages(agent: AgentHandle, kind: str) -> list[dict[str, Any]]:
    return [m for s in agent.agent.sessions for m in s.messages if m.get("type") == kind]


def test_a_live_call_is_listed_followed_and_steered_then_gone(bridge: BridgeHandle, agent: AgentHandle) -> None:
    call = CallInThread(bridge, talk(9.0), tail=0.5)
    started = bridge.wait_for("stream_started")
    started_at = time.monotonic()  # (the log line was read within ~20 ms of being written)
    line = wait_listed(bridge, started["call_sid"], timeout=2.0)
    listed_after = time.monotonic()
    assert set(line) == {
        "call_sid", "stream_sid", "from", "to", "profile", "state", "started_at", "seconds", "worker",
        "barge_ins", "last_response_ms",
    }  # fmt: skip
    assert line["from"] == "+15550000001" and line["to"] == "+15550000002"
    assert line["worker"] == 1 and line["profile"] == "default"
    assert line["started_at"].endswith("Z")
    sid = line["call_sid"]

    detail = api(bridge, "GET", f"/api/calls/{sid}").json()
    assert detail["call_sid"] == sid and isinstance(detail["events"], list)

    reader = EventReader(bridge, sid)
    reader.wait_for(lambda e: e["type"] == "state" and e["state"] == "live")
    assert reader.status == 200 and reader.content_type.startswith("text/event-stream")

    said = "A supervisor has a question for you."
    answer = api(bridge, "POST", f"/api/calls/{sid}/actions", json={"action": "say", "text": said})
    assert answer.status_code == 202, answer.text
    first_id = answer.json()["action_id"]
    assert wait_until(lambda: any(m.get("message") == said for m in client_messages(agent, "InjectAgentMessage")))

    whisper = "Offer the caller a callback tomorrow."
    answer = api(bridge, "POST", f"/api/calls/{sid}/actions", json={"action": "instruct", "text": whisper})
    assert answer.status_code == 202
    instruct_id = answer.json()["action_id"]
    assert instruct_id != first_id
    assert wait_until(lambda: [m["prompt"] for m in client_messages(agent, "UpdatePrompt")] == [whisper])
    reader.wait_for(lambda e: e["type"] == "action" and e["action_id"] == instruct_id and e["result"] == "confirmed")

    as_caller = "I would like to speak to someone."
    assert (
        api(bridge, "POST", f"/api/calls/{sid}/actions", json={"action": "as_caller", "text": as_caller}).status_code
        == 202
    )
    assert wait_until(lambda: any(m.get("content") == as_caller for m in client_messages(agent, "InjectUserMessage")))

    speak = {"provider": {"type": "deepgram", "model": "aura-2-apollo-en"}}
    answer = api(bridge, "POST", f"/api/calls/{sid}/actions", json={"action": "voice", "speak": speak})
    assert answer.status_code == 202
    assert wait_until(lambda: [m["speak"] for m in client_messages(agent, "UpdateSpeak")] == [speak])
    reader.wait_for(
        lambda e: e["type"] == "action" and e["action_id"] == answer.json()["action_id"] and e["result"] == "confirmed"
    )

    # refusals: what is wrong with the request (400), with the moment (409), the call (404)
    bad_bodies: list[Any] = [
        {"action": "dance"},
        {"action": "say"},
        {"action": "say", "text": ""},
        {"action": "voice", "speak": {}},
        {"action": "transfer"},
        [1, 2],
    ]
    for body in bad_bodies:
        bad = api(bridge, "POST", f"/api/calls/{sid}/actions", json=body)
        assert bad.status_code == 400 and bad.json()["error"], body
    assert api(bridge, "POST", f"/api/calls/{sid}/actions", content=b"{not json").status_code == 400
    no_rest = api(bridge, "POST", f"/api/calls/{sid}/actions", json={"action": "transfer", "destination": "sales"})
    assert no_rest.status_code == 409 and "REST" in no_rest.json()["error"]
    assert api(bridge, "POST", "/api/calls/CA0000/actions", json={"action": "hang_up"}).status_code == 404
    assert api(bridge, "GET", "/api/calls/CA0000").status_code == 404
    assert api(bridge, "GET", "/api/calls/CA0000/events").status_code == 404

    result = call.join()
    assert result.ended_by == "caller"
    # gone from the list within two seconds of the end; the event stream closed within one of ``ended``
    assert wait_until(lambda: all(c["call_sid"] != sid for c in live_calls(bridge)), 2.0)
    assert wait_until(lambda: reader.closed_at is not None, 2.0)
    assert reader.ended_at is not None and reader.closed_at is not None
    assert reader.closed_at - reader.ended_at < 1.0
    assert reader.events[-1] == {**reader.events[-1], "type": "ended", "outcome": "caller_hangup"}
    types = reader.types()
    for kind in ("state", "agent_speaking", "agent_done", "transcript", "action", "latency", "ended"):
        assert kind in types, (kind, types)
    assert all(isinstance(e["at"], int | float) and e["at"] >= 0 for e in reader.events)
    latencies = [e["response_ms"] for e in reader.events if e["type"] == "latency"]
    assert latencies and all(0 < ms < 3000 for ms in latencies)
    assert listed_after - started_at < 1.0  # listed within a second of the stream's start

    # the record and the log: the actions audited with what and when
    record = bridge.wait_for("call_ended")
    assert record["response_ms"] == latencies
    actions = record["operator_actions"]
    assert [a["action"] for a in actions] == ["say", "instruct", "as_caller", "voice"]
    # the agent refuses an injection while anyone speaks: then it is retried at the next quiet moment
    assert actions[0]["result"] in ("sent", "refused_retrying")
    assert [a["result"] for a in actions[1:]] == ["confirmed", "sent", "confirmed"]
    assert all("text" not in a for a in actions)  # no CALL_EVENTS_TRANSCRIPT: no text kept
    assert [r["action"] for r in bridge.records("operator_action")] == ["say", "instruct", "as_caller", "voice"]
    assert all("text" not in r for r in bridge.records("operator_action"))  # LOG_TRANSCRIPTS off
    metrics = httpx.get(bridge.base_url + "/metrics").text
    assert 'callbridge_operator_actions_total{action="say"} 1.0' in metrics
    assert "callbridge_response_latency_seconds_count" in metrics


def test_listening_gets_both_tracks_exactly_and_a_ticket_once(bridge: BridgeHandle, agent: AgentHandle) -> None:
    call = CallInThread(bridge, talk(6.0), tail=0.5)
    sid = bridge.wait_for("stream_started")["call_sid"]
    wait_listed(bridge, sid)
    ticket = api(bridge, "POST", f"/api/calls/{sid}/listen")
    assert ticket.status_code == 200
    url = ticket.json()["url"]
    assert url.startswith("ws://127.0.0.1:") and "/api/listen/" in url

    async def refused(target: str) -> int:
        try:
            async with connect(target):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    async def listen() -> tuple[list[dict[str, Any]], int, int]:
        frames: list[dict[str, Any]] = []
        async with connect(url) as ws:
            again = await refused(url)  # used once already, the call still live
            forged = await refused(url[: -len(url.rsplit(".", 1)[1])] + "A" * 43)  # this call, a bad signature
            async for raw in ws:
                frames.append(json.loads(raw))
        return frames, again, forged

    frames, again, forged = asyncio.run(listen())  # until the call ends and the bridge closes the socket
    result = call.join()
    assert again == 403 and forged == 403
    caller = b"".join(base64.b64decode(f["payload"]) for f in frames if f["track"] == "caller")
    heard = b"".join(base64.b64decode(f["payload"]) for f in frames if f["track"] == "agent")
    assert {f["track"] for f in frames} == {"caller", "agent"}
    assert len(caller) > 8000 and caller in bytes(result.sent)  # exactly the caller's audio, from a moment on
    assert len(heard) > 1000 and heard in bytes(result.received)  # exactly what was sent to Twilio


def test_a_listen_ticket_is_signed_for_its_call_and_expires() -> None:
    from app.live.api import LISTEN_PROFILE, ListenTickets
    from app.twilio.stream_token import StreamTokens

    tickets = ListenTickets(TOKEN, 30, StreamTokens(b"s" * 32), None)
    sid = "CA" + "1" * 32
    old = f"{sid}.{tickets.tokens.mint(sid, LISTEN_PROFILE, now=time.time() - 31)}"
    other = tickets.mint("CA" + "2" * 32).split(".", 1)[1]
    fresh = tickets.mint(sid)
    assert asyncio.run(tickets.redeem(old)) == (sid, "expired")
    assert asyncio.run(tickets.redeem(f"{sid}.{other}"))[1] == "bad signature or wrong call"
    assert asyncio.run(tickets.redeem(fresh)) == (sid, None)
    assert asyncio.run(tickets.redeem(fresh)) == (sid, "already used")
    elsewhere = ListenTickets("another-operator-token-of-24+", 30, StreamTokens(b"s" * 32), None)
    assert asyncio.run(elsewhere.redeem(tickets.mint(sid)))[1] == "bad signature or wrong call"


def test_hang_up_from_the_console_says_goodbye_then_ends_the_call(bridge: BridgeHandle, agent: AgentHandle) -> None:
    call = CallInThread(bridge, talk(20.0), tail=0.5)
    sid = bridge.wait_for("stream_started")["call_sid"]
    wait_listed(bridge, sid)
    assert wait_until(
        lambda: (
            bool(bridge.records("agent_ready"))
            or bool(agent.agent.sessions and agent.agent.sessions[0].settings_applied_at)
        ),
        5.0,
    )
    answer = api(bridge, "POST", f"/api/calls/{sid}/actions", json={"action": "hang_up"})
    assert answer.status_code == 202, answer.text
    again = api(bridge, "POST", f"/api/calls/{sid}/actions", json={"action": "hang_up"})
    assert again.status_code == 409  # ending already
    result = call.join()
    assert result.ended_by == "bridge"  # no REST credentials here: the stream was closed
    assert any("goodbye" in m.get("message", "") for m in client_messages(agent, "InjectAgentMessage"))
    ended = bridge.wait_for("call_ended")
    assert ended["outcome"] == "completed" and ended["ended_by"] == "operator"
    assert ended["hangup_reason"] == "operator"
    assert ended["duration_s"] < 15


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": TOKEN},
    ],
)
def test_every_route_wants_the_token(bridge: BridgeHandle, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/api/calls"), ("GET", "/api/calls/CA1"), ("GET", "/api/calls/CA1/events"),
                         ("POST", "/api/calls/CA1/listen"), ("POST", "/api/calls/CA1/actions")):  # fmt: skip
        response = api(bridge, method, path, headers=headers)
        assert response.status_code == 401, (method, path)
    page = httpx.get(bridge.base_url + "/console")
    assert page.status_code == 200 and "<html" in page.text.lower()  # the page asks for the token itself


def test_without_a_token_the_api_and_console_do_not_exist(
    start_bridge: Callable[..., BridgeHandle], agent: AgentHandle
) -> None:
    bridge = start_bridge(agent.url)
    for method, path in (("GET", "/api/calls"), ("POST", "/api/calls/CA1/actions"), ("GET", "/console")):
        assert httpx.request(method, bridge.base_url + path, headers=AUTH).status_code == 404


def test_a_short_operator_token_is_a_configuration_error_naming_it(
    start_bridge: Callable[..., BridgeHandle], agent: AgentHandle
) -> None:
    with pytest.raises(Exception, match="operator_token"):
        start_bridge(agent.url, operator_token="too-short")


@pytest.fixture
def redis_url() -> Iterator[str]:
    from tests.integration.test_token_store import redis_url as start_redis

    yield from start_redis.__wrapped__()  # type: ignore[attr-defined]


def test_two_replicas_sharing_redis_see_and_steer_each_others_calls(
    start_bridge: Callable[..., BridgeHandle], agent: AgentHandle, redis_url: str
) -> None:
    first = start_bridge(agent.url, operator_token=TOKEN, redis_url=redis_url)
    second = start_bridge(agent.url, operator_token=TOKEN, redis_url=redis_url)
    call = CallInThread(first, talk(8.0), tail=0.5)
    sid = second.wait_for("stream_started")["call_sid"]  # (one log for the test process: the latest bridge's buffer)
    line = wait_listed(second, sid, timeout=2.0)  # held by the first, listed by the second
    assert line["state"] in ("connecting_agent", "awaiting_welcome", "awaiting_settings_applied", "live")
    assert api(second, "GET", f"/api/calls/{sid}").json()["call_sid"] == sid

    reader = EventReader(second, sid)
    reader.wait_for(lambda e: e["type"] == "state" and e["state"] == "live")
    said = "This is the other replica speaking."
    answer = api(second, "POST", f"/api/calls/{sid}/actions", json={"action": "say", "text": said})
    assert answer.status_code == 202, answer.text
    assert wait_until(lambda: any(m.get("message") == said for m in client_messages(agent, "InjectAgentMessage")))
    reader.wait_for(lambda e: e["type"] == "action" and e["action_id"] == answer.json()["action_id"])

    url = api(second, "POST", f"/api/calls/{sid}/listen").json()["url"]

    async def listen(count: int) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        async with connect(url) as ws:
            while len(frames) < count:
                frames.append(json.loads(await ws.recv()))
        return frames

    frames = asyncio.run(listen(50))
    assert {f["track"] for f in frames} >= {"caller"}
    call.join()
    assert wait_until(lambda: all(c["call_sid"] != sid for c in live_calls(second)), 2.0)
    assert wait_until(lambda: reader.closed_at is not None, 1.5)
    assert reader.events[-1]["type"] == "ended"
