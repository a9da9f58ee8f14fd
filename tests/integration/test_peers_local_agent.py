"""The local agent's side of call control: injected messages, function requests and answers,
declared functions. Driven by a plain WebSocket client, so only the agent is under test."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.local_agent import LocalAgentConfig, ScriptStep, declared_function_names
from tests.conformance.sdk_oracle import validate_server_message
from tests.conftest import AgentHandle

pytestmark = pytest.mark.timeout(30)


def settings(greeting: str | None = None, think: Any = None) -> str:
    agent: dict[str, Any] = {
        "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
        "think": think or {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}},
        "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
    }
    if greeting:
        agent["greeting"] = greeting
    audio = {
        "input": {"encoding": "mulaw", "sample_rate": 8000},
        "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
    }
    return json.dumps({"type": "Settings", "audio": audio, "agent": agent})


class Client:
    """A bare Voice Agent client: every JSON message is kept (and must parse with the SDK)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.got: list[dict[str, Any]] = []
        self.audio = 0
        self.seen = 0  # messages already consumed by next()

    async def send(self, msg: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(json.dumps(msg) if isinstance(msg, dict) else msg)

    async def next(self, kind: str, within: float = 3.0) -> dict[str, Any]:
        """The next message of ``kind`` after those already consumed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            for i in range(self.seen, len(self.got)):
                if self.got[i]["type"] == kind:
                    self.seen = i + 1
                    return self.got[i]
            self.seen = len(self.got)
            frame = await asyncio.wait_for(self.ws.recv(), deadline - loop.time())
            if isinstance(frame, bytes):
                self.audio += len(frame)
                continue
            msg = json.loads(frame)
            validate_server_message(msg)
            self.got.append(msg)

    async def quiet(self, seconds: float) -> list[str]:
        """Types of the messages arriving within ``seconds``."""
        start = len(self.got)
        with contextlib.suppress(TimeoutError):
            await self.next("__never__", seconds)
        return [m["type"] for m in self.got[start:]]

    async def ready(self, settings_msg: str) -> None:
        await self.next("Welcome")
        await self.send(settings_msg)
        await self.next("SettingsApplied")


async def session(url: str, body: Callable[[Client], Any]) -> None:
    async with connect(url, proxy=None) as ws:
        await body(Client(ws))


def test_injected_agent_message_is_spoken_when_nobody_speaks(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(speak_rate=0))

    async def body(c: Client) -> None:
        await c.ready(settings())
        await c.send({"type": "InjectAgentMessage", "message": "Still there?"})
        await c.next("AgentStartedSpeaking")
        await c.next("AgentAudioDone")
        said = await c.next("ConversationText")
        assert said == {"type": "ConversationText", "role": "assistant", "content": "Still there?"}
        assert c.audio > 0.5 * 8000 * 0.3  # two words of speech-like audio, mu-law 8 kHz

    asyncio.run(session(agent.url, body))
    record = agent.agent.sessions[0]
    assert [(i.kind, i.text, i.refused) for i in record.injections] == [("InjectAgentMessage", "Still there?", False)]
    assert record.speeches[0].text == "Still there?" and record.speeches[0].done_at is not None


def test_injected_agent_message_is_refused_while_the_agent_speaks(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(speak_rate=1.0))

    async def body(c: Client) -> None:
        await c.ready(settings(greeting="Hello and welcome to the test line"))
        await c.next("AgentStartedSpeaking")
        await c.send({"type": "InjectAgentMessage", "message": "Are you there?"})
        refused = await c.next("InjectionRefused")
        assert refused["message"] == "Agent is currently speaking"
        await c.next("AgentAudioDone", within=5)
        assert (await c.next("ConversationText"))["content"] == "Hello and welcome to the test line"
        await c.send({"type": "InjectAgentMessage", "message": "Are you there?"})
        await c.next("AgentStartedSpeaking")
        assert (await c.next("ConversationText", within=5))["content"] == "Are you there?"

    asyncio.run(session(agent.url, body))
    record = agent.agent.sessions[0]
    assert [i.refused for i in record.injections] == [True, False]
    assert record.injections[0].at < record.injections[1].at


def test_injected_agent_message_is_refused_while_the_user_speaks(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(speak_rate=0))
    speech = synth.encode(synth.speech_like("a rather long sentence is being said"), TWILIO_FORMAT)

    async def body(c: Client) -> None:
        await c.ready(settings())
        for i in range(0, len(speech) // 2, 160):
            await c.send(speech[i : i + 160])
        await c.next("UserStartedSpeaking")
        await c.send({"type": "InjectAgentMessage", "message": "Hello?"})
        assert (await c.next("InjectionRefused"))["message"] == "User is currently speaking"
        assert "AgentStartedSpeaking" not in await c.quiet(0.3)

    asyncio.run(session(agent.url, body))
    assert agent.agent.sessions[0].injections[0].refused


def test_injected_user_message_is_a_user_turn(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(speak_rate=0))

    async def body(c: Client) -> None:
        await c.ready(settings())
        await c.send({"type": "InjectUserMessage", "content": "The caller pressed 1 2 3 4 #"})
        heard = await c.next("ConversationText")
        assert heard == {"type": "ConversationText", "role": "user", "content": "The caller pressed 1 2 3 4 #"}
        await c.next("AgentStartedSpeaking")
        await c.next("AgentAudioDone")
        reply = await c.next("ConversationText")
        assert reply["role"] == "assistant" and "The caller pressed 1 2 3 4 #" in reply["content"]

    asyncio.run(session(agent.url, body))
    record = agent.agent.sessions[0]
    assert record.user_messages == 1 and record.utterances == 0
    assert [(i.kind, i.text) for i in record.injections] == [("InjectUserMessage", "The caller pressed 1 2 3 4 #")]


def test_several_functions_in_one_request_and_the_reply_after_all_answers(
    start_agent: Callable[..., AgentHandle],
) -> None:
    step = ScriptStep.from_dict(
        {
            "on": "settings_applied",
            "do": "function_call",
            "functions": [
                {"name": "lookup_order", "arguments": {"order": "42"}},
                {"name": "end_call", "arguments": "{}"},
            ],
            "reply": "Goodbye!",
        }
    )
    agent = start_agent(LocalAgentConfig(speak_rate=0, script=[step]))

    async def body(c: Client) -> None:
        await c.ready(settings())
        request = await c.next("FunctionCallRequest")
        functions = request["functions"]
        assert [(f["name"], f["arguments"], f["client_side"]) for f in functions] == [
            ("lookup_order", '{"order": "42"}', True),
            ("end_call", "{}", True),
        ]
        ids = [f["id"] for f in functions]
        assert len(set(ids)) == 2 and all(ids)
        await c.send({"type": "FunctionCallResponse", "id": ids[1], "name": "end_call", "content": "ok"})
        assert "AgentStartedSpeaking" not in await c.quiet(0.3)  # still waiting for lookup_order
        record = agent.agent.sessions[0]
        assert [r.name for r in record.unanswered_functions] == ["lookup_order"]
        await c.send({"type": "FunctionCallResponse", "id": ids[0], "name": "lookup_order", "content": '{"x":1}'})
        await c.next("AgentStartedSpeaking")
        assert (await c.next("ConversationText"))["content"] == "Goodbye!"

    asyncio.run(session(agent.url, body))
    record = agent.agent.sessions[0]
    assert record.unanswered_functions == []
    assert [(r.name, r.content, r.matched) for r in record.function_responses] == [
        ("end_call", "ok", True),
        ("lookup_order", '{"x":1}', True),
    ]
    assert record.function_responses[0].at < record.function_responses[1].at
    assert all(r.answered_at is not None for r in record.function_requests)


def test_function_requested_after_an_utterance_replaces_the_echo(start_agent: Callable[..., AgentHandle]) -> None:
    script = [ScriptStep(on="utterance", n=1, do="function_call", name="end_call", arguments='{"reason":"done"}')]
    agent = start_agent(LocalAgentConfig(speak_rate=0, script=script, function_reply="Thanks for calling, bye."))
    speech = synth.encode(synth.speech_like("that is all") + synth.silence(0.6), TWILIO_FORMAT)

    async def body(c: Client) -> None:
        await c.ready(settings())
        for i in range(0, len(speech), 160):
            await c.send(speech[i : i + 160])
        request = await c.next("FunctionCallRequest")
        (function,) = request["functions"]
        assert function["name"] == "end_call" and function["arguments"] == '{"reason":"done"}'
        assert "AgentStartedSpeaking" not in await c.quiet(0.3)  # no echo: the LLM called a function
        # an answer to an id that was never requested is recorded, and changes nothing
        await c.send({"type": "FunctionCallResponse", "id": "call-unknown", "name": "end_call", "content": "?"})
        assert "AgentStartedSpeaking" not in await c.quiet(0.2)
        await c.send({"type": "FunctionCallResponse", "id": function["id"], "name": "end_call", "content": "ok"})
        await c.next("AgentAudioDone")
        assert (await c.next("ConversationText"))["content"] == "Thanks for calling, bye."

    asyncio.run(session(agent.url, body))
    record = agent.agent.sessions[0]
    assert [r.matched for r in record.function_responses] == [False, True]
    assert [s.text for s in record.speeches] == ["Thanks for calling, bye."]


def test_unanswered_and_server_side_functions(start_agent: Callable[..., AgentHandle]) -> None:
    step = ScriptStep(
        on="user_message",
        n=1,
        do="function_call",
        functions=[{"name": "crm_note", "client_side": False}, {"name": "transfer_call", "arguments": "{}"}],
    )
    agent = start_agent(LocalAgentConfig(speak_rate=0, script=[step]))

    async def body(c: Client) -> None:
        await c.ready(settings())
        await c.send({"type": "InjectUserMessage", "content": "put me through to sales"})
        request = await c.next("FunctionCallRequest")
        assert [f["client_side"] for f in request["functions"]] == [False, True]
        answered = await c.next("FunctionCallResponse")  # Deepgram answers its own server-side function
        assert answered["name"] == "crm_note" and answered["id"] == request["functions"][0]["id"]
        assert "AgentStartedSpeaking" not in await c.quiet(0.3)

    asyncio.run(session(agent.url, body))
    record = agent.agent.sessions[0]
    assert [r.name for r in record.unanswered_functions] == ["transfer_call"]
    assert record.function_responses == []


def test_declared_functions_are_recorded_for_a_think_object_or_list(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(speak_rate=0))
    fn = [{"name": "end_call", "description": "Hang up", "parameters": {"type": "object", "properties": {}}}]
    fallback = [
        {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "functions": fn},
        {
            "provider": {"type": "anthropic", "model": "claude-3-5-haiku-latest"},
            "functions": [*fn, {"name": "lookup_order", "endpoint": {"url": "https://ops.example.com/x"}}],
        },
    ]

    async def body(c: Client) -> None:
        await c.ready(settings(think=fallback))

    asyncio.run(session(agent.url, body))
    assert agent.agent.sessions[0].declared_functions == ["end_call", "lookup_order"]
    assert declared_function_names({"think": {"provider": {}, "functions": fn}}) == ["end_call"]
    assert declared_function_names("stored-agent-id") == []


def test_unknown_and_malformed_client_messages_are_errors(start_agent: Callable[..., AgentHandle]) -> None:
    agent = start_agent(LocalAgentConfig(speak_rate=0))

    async def body(c: Client) -> None:
        await c.next("Welcome")
        await c.send({"type": "InjectAgentMessage", "message": "too early"})
        assert (await c.next("Error"))["code"] == "NON_SETTINGS_MESSAGE_BEFORE_SETTINGS"

    asyncio.run(session(agent.url, body))

    async def after_settings(c: Client) -> None:
        await c.ready(settings())
        await c.send({"type": "SomethingTheServiceDoesNotKnow"})
        assert (await c.next("Error"))["code"] == "UNPARSABLE_CLIENT_MESSAGE"
        await c.send({"type": "InjectAgentMessage", "content": "the migration guide's field name"})
        assert (await c.next("Error"))["code"] == "UNPARSABLE_CLIENT_MESSAGE"

    asyncio.run(session(agent.url, after_settings))
    assert agent.agent.sessions[1].injections == []


def test_script_steps_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        ScriptStep.from_dict({"on": "utterance", "do": "function_call", "nmae": "x"})
    with pytest.raises(ValueError, match="'on' must be"):
        ScriptStep.from_dict({"on": "hangup", "do": "close"})
    with pytest.raises(ValueError, match="'do' must be"):
        ScriptStep.from_dict({"on": "utterance", "do": "explode"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        ScriptStep.from_dict({"on": "utterance", "do": "function_call", "functions": [{"arguments": "{}"}]})
    single = ScriptStep.from_dict({"on": "utterance", "do": "function_call", "name": "a", "arguments": "{}"})
    assert single.requested() == [("a", "{}", True)]
