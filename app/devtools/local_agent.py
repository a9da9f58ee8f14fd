"""A local stand-in for agent.deepgram.com that speaks the Voice Agent V1 protocol.

It has no speech recognition and no LLM: an energy detector finds the caller's utterances,
and the "reply" echoes each utterance back in the session's output format. Everything else
follows the real service: Welcome, Settings checks and errors, SettingsApplied, the greeting
spoken as audio, UserStartedSpeaking (and it stops talking when interrupted),
AgentStartedSpeaking with latencies, AgentAudioDone, ConversationText, KeepAlive, and
CLIENT_MESSAGE_TIMEOUT when the client goes quiet, InjectAgentMessage (spoken, or
InjectionRefused while anyone speaks), InjectUserMessage (a user turn) and FunctionCallResponse
(once every client-side function of a request is answered, it "continues" with a short spoken
reply, as an LLM would). A script makes it misbehave on purpose for tests: request functions,
send an Error or Warning, close abruptly, delay a reply, refuse the upgrade (401, 429, ...),
never send Welcome or SettingsApplied, drop the socket in the middle of a reply, stop reading
the socket; each fault for every session or only some (the first, every one after the first).
Each session's record keeps what the client declared, answered and injected, with arrival
times, for tests to inspect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import select
import socket
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from app.codecs import SUPPORTED_ENCODINGS, AudioFormat, Transcoder
from app.devtools import synth
from app.devtools.endpoints import AGENT_PATH, LOOPBACK, agent_url
from app.devtools.speech import HANGOVER_MS, ONSET_MS, SPEECH_RMS, SpeechDetector, SpeechEvent
from app.observability.logging import get_logger

CLIENT_MESSAGE_TYPES = {
    "KeepAlive",
    "UpdatePrompt",
    "UpdateSpeak",
    "UpdateThink",
    "UpdateListen",
    "InjectUserMessage",
    "InjectAgentMessage",
    "FunctionCallResponse",
}
UPDATE_REPLIES = {
    "UpdatePrompt": "PromptUpdated",
    "UpdateSpeak": "SpeakUpdated",
    "UpdateThink": "ThinkUpdated",
    "UpdateListen": "ListenUpdated",
}


SCRIPT_EVENTS = frozenset({"connect", "settings", "settings_applied", "utterance", "user_message"})
SCRIPT_ACTIONS = frozenset(
    {
        "delay",
        "warning",
        "error",
        "close",
        "function_call",
        "unknown",
        "refuse",
        "stall",
        "stop_reading",
        "drop_mid_reply",
    }
)
TURN_EVENTS = frozenset({"utterance", "user_message"})
STOPPED_READING_RCVBUF = 4096
"""The receive buffer a session that stops reading shrinks its socket to, so the client's
writes back up within seconds instead of after the megabytes loopback TCP would buffer."""
PEER_GONE_POLL_S = 0.2  # how often a session that stopped reading checks its peer is still there


def check_sessions(spec: str) -> None:
    """``all``, ``N``, ``N-`` (N and every later one), ``N-M`` or ``N/K`` (N, N+K, N+2K...),
    sessions counted from 1."""
    sep = "/" if "/" in spec else "-"
    first, _, last = spec.partition(sep)
    if sep == "/":
        ok = first.isdigit() and int(first) >= 1 and last.isdigit() and int(last) >= 1
    else:
        ok = spec == "all" or (
            first.isdigit() and int(first) >= 1 and (not last or (last.isdigit() and int(last) >= int(first)))
        )
    if not ok:
        raise ValueError(f"script step: 'sessions' must be all, N, N-, N-M or N/K (from 1), not {spec!r}")


def in_sessions(spec: str, number: int) -> bool:
    """Whether session ``number`` (the n-th upgrade request, refused ones included) is in ``spec``."""
    if spec == "all":
        return True
    if "/" in spec:
        first, _, every = spec.partition("/")
        return number >= int(first) and (number - int(first)) % int(every) == 0
    first, dash, last = spec.partition("-")
    if not dash:
        return number == int(first)
    return number >= int(first) and (not last or number <= int(last))


@functools.lru_cache(maxsize=32)
def speech_for(text: str) -> bytes:
    """What the agent says for ``text`` (linear16, 8 kHz), kept as a TTS cache would: a long
    greeting is synthesised once, not on the event loop of every session that speaks it."""
    return synth.speech_like(text)


def peer_gone(fd: int) -> bool:
    """Whether the peer of a socket this process is not reading has shut down or reset it."""
    if fd < 0:  # closed meanwhile
        return True
    poller = select.poll()
    poller.register(fd, getattr(select, "POLLRDHUP", 0x2000))  # Linux; errors and hang-ups always count
    return bool(poller.poll(0))


@dataclass
class ScriptStep:
    """One scripted misbehaviour.

    ``on``: "connect" (the upgrade request, then the open socket before Welcome), "settings"
    (before SettingsApplied is sent), "settings_applied" (after it), "utterance" (before the
    reply to the caller's ``n``-th spoken utterance) or "user_message" (before the reply to the
    ``n``-th InjectUserMessage).

    ``do``: function_call, error/warning (``code``, ``description``), close (abrupt, no close
    frame), delay (``seconds`` before the reply), unknown (a message type the client cannot
    know), and the faults the bridge must survive:

    - refuse (on "connect" only): answer the upgrade with HTTP ``status`` (429, 401, 503...);
      no session is opened (the attempt is listed in ``LocalAgent.refused``);
    - stall: send nothing more in this session (on "connect": never Welcome; on "settings":
      never SettingsApplied), while still reading and discarding what the client sends;
    - stop_reading: stop consuming the socket (its receive buffer shrunk to a few KB), so the
      client's writes back up; for ``seconds``, then it reads again (what waited, and the
      client's close if it left meanwhile). A client that resets the connection ends the
      session at once; with ``seconds`` 0 that is the only end, since a client's orderly close
      cannot be seen without reading. Anything already being said goes on;
    - drop_mid_reply (on "utterance"/"user_message" only): start the reply, then drop the
      socket abruptly (no close frame) once ``seconds`` of its audio have gone out (0: after
      the first chunk). ``SessionRecord.dropped_after_bytes`` says how much of ``audio_out`` was
      sent.

    ``sessions``: which sessions the step applies to, counted from 1 over every upgrade request
    (refused ones included): "all" (default), "1" (the first only), "2-" (every one after the
    first: a reconnect never succeeds), "1-3", "3/10" (sessions 3, 13, 23...). ``tag``: only
    sessions whose Settings carry this tag (``tags``; a bridge takes them from the profile, so
    one dialled number can have a faulty agent while the others do not); never on "connect",
    which comes before Settings.

    function_call sends one FunctionCallRequest with ``functions`` (a list of
    ``{"name": .., "arguments": "<JSON string or an object>", "client_side": true}``), or, without
    ``functions``, the single function ``name``/``arguments``. Each gets its own id. A request
    made in reply to a user turn replaces that turn's spoken reply: once every client-side function
    in it is answered, the agent speaks ``reply`` (default: the config's ``function_reply``; ""
    for nothing). Server-side functions (``"client_side": false``) are answered by the agent
    itself with a FunctionCallResponse, as Deepgram does for functions with an ``endpoint``.
    """

    on: str
    do: str
    n: int = 1
    name: str = "lookup"
    arguments: str | dict[str, Any] = "{}"
    functions: list[dict[str, Any]] | None = None
    reply: str | None = None
    code: str = "INTERNAL_SERVER_ERROR"
    description: str = "scripted"
    seconds: float = 0.0
    status: int = 429
    sessions: str = "all"
    tag: str | None = None

    def __post_init__(self) -> None:
        if self.on not in SCRIPT_EVENTS:
            raise ValueError(f"script step: 'on' must be one of {sorted(SCRIPT_EVENTS)}, not {self.on!r}")
        if self.do not in SCRIPT_ACTIONS:
            raise ValueError(f"script step: 'do' must be one of {sorted(SCRIPT_ACTIONS)}, not {self.do!r}")
        if self.do == "refuse" and (self.on != "connect" or not 400 <= self.status <= 599):
            raise ValueError("script step: 'refuse' is for 'on': 'connect', with an HTTP 'status' of 400-599")
        if self.do == "drop_mid_reply" and self.on not in TURN_EVENTS:
            raise ValueError("script step: 'drop_mid_reply' is for 'on': 'utterance' or 'user_message'")
        check_sessions(self.sessions)
        if self.tag is not None and self.on == "connect":
            raise ValueError("script step: 'tag' is known from Settings, after 'connect'")
        for entry in self.functions or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError(f"script step: each of 'functions' needs a 'name': {entry!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScriptStep:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"script step: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def requested(self) -> list[tuple[str, str, bool]]:
        """(name, arguments as a JSON string, client_side) for each function this step requests."""
        entries = self.functions if self.functions is not None else [{"name": self.name, "arguments": self.arguments}]
        out = []
        for entry in entries:
            arguments = entry.get("arguments", "{}")
            text = arguments if isinstance(arguments, str) else json.dumps(arguments)
            out.append((str(entry["name"]), text, bool(entry.get("client_side", True))))
        return out


@dataclass
class LocalAgentConfig:
    vad_threshold: int = SPEECH_RMS  # the speech detector's settings: see app/devtools/speech.py
    vad_start_ms: int = ONSET_MS
    vad_end_ms: int = HANGOVER_MS
    reply_delay: float = 0.05
    speak_rate: float = 4.0  # how much faster than real time audio is streamed out
    chunk_ms: int = 100
    idle_timeout: float = 10.0
    require_key: str | None = None
    script: list[ScriptStep] = field(default_factory=list)
    function_reply: str = "Done."  # spoken once a request's client-side functions are all answered
    server_function_result: str = '{"result": "ok"}'  # content of the agent's own server-side answers


@dataclass
class FunctionRequest:
    """A function the agent asked for. ``answered_at`` is set when the client answers its id."""

    id: str
    name: str
    arguments: str
    client_side: bool
    at: float  # time.monotonic() when the request was sent
    answered_at: float | None = None


@dataclass
class FunctionResponse:
    """A FunctionCallResponse the client sent; ``matched`` if it answered a pending request."""

    id: str
    name: str
    content: str
    at: float  # time.monotonic() when it arrived
    matched: bool


@dataclass
class Injection:
    """An InjectAgentMessage or InjectUserMessage the client sent."""

    kind: str  # "InjectAgentMessage" | "InjectUserMessage"
    text: str  # its ``message`` / ``content``
    at: float  # time.monotonic() when it arrived
    refused: bool = False  # answered with InjectionRefused
    message: dict[str, Any] = field(default_factory=dict)


@dataclass
class Speech:
    """One thing the agent said: the greeting, a reply, an injected message, a function follow-up."""

    text: str
    started_at: float  # AgentStartedSpeaking
    done_at: float | None = None  # AgentAudioDone; None if interrupted (or cut by the close)
    interrupted: bool = False


@dataclass
class SessionRecord:
    """What one client did, for tests to inspect. Times are time.monotonic()."""

    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    audio_in: bytearray = field(default_factory=bytearray)
    audio_out: bytearray = field(default_factory=bytearray)
    keepalives: int = 0
    utterances: int = 0
    user_messages: int = 0
    errors_sent: list[str] = field(default_factory=list)
    declared_functions: list[str] = field(default_factory=list)  # agent.think.functions names
    function_requests: list[FunctionRequest] = field(default_factory=list)
    function_responses: list[FunctionResponse] = field(default_factory=list)
    injections: list[Injection] = field(default_factory=list)
    speeches: list[Speech] = field(default_factory=list)
    closed: bool = False
    close_code: int | None = None
    opened_at: float = field(default_factory=time.monotonic)
    settings_applied_at: float | None = None
    closed_at: float | None = None
    number: int = 0  # which upgrade request this was, from 1 (see ScriptStep.sessions)
    audio_in_at: list[tuple[int, float]] = field(default_factory=list)  # (len(audio_in) after a frame, arrival)
    stopped_reading_at: float | None = None  # a stop_reading step ran
    dropped_after_bytes: int | None = None  # a drop_mid_reply step dropped the socket after this much audio_out

    @property
    def unanswered_functions(self) -> list[FunctionRequest]:
        """Client-side requests the client has not answered (yet)."""
        return [r for r in self.function_requests if r.client_side and r.answered_at is None]


@dataclass
class _Batch:
    """The client-side functions of one request still unanswered, and what to say after."""

    waiting: set[str]
    reply: str


def declared_function_names(agent: Any) -> list[str]:
    """Names in ``agent.think.functions``; ``think`` may be one provider or a list (fallbacks)."""
    think = agent.get("think") if isinstance(agent, dict) else None
    names: list[str] = []
    for provider in think if isinstance(think, list) else [think]:
        functions = provider.get("functions") if isinstance(provider, dict) else None
        for function in functions if isinstance(functions, list) else []:
            name = function.get("name") if isinstance(function, dict) else None
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


class _Session:
    def __init__(self, agent: LocalAgent, ws: ServerConnection, record: SessionRecord) -> None:
        self.agent = agent
        self.cfg = agent.config
        self.ws = ws
        self.rec = record
        self.log = get_logger(component="local_agent", request_id=record.request_id)
        self.in_fmt = AudioFormat("mulaw", 8000)
        self.out_fmt = AudioFormat("mulaw", 8000)
        self.greeting: str | None = None
        self.to_pcm: Transcoder | None = None
        self.carry = b""
        self.frame_bytes = 0
        self.detector = SpeechDetector(self.cfg.vad_threshold, self.cfg.vad_start_ms, self.cfg.vad_end_ms)
        self.utterance = bytearray()  # linear16 at the input rate
        # the frames that made the onset belong to the utterance
        self.preroll: deque[bytes] = deque(maxlen=self.detector.onset_frames)
        self.speaking: asyncio.Task[None] | None = None  # the greeting, or the reply to the last user turn
        self.voice = asyncio.Lock()  # one thing said at a time
        self.voice_owner: asyncio.Task[Any] | None = None  # who is speaking now (barge-in cancels it)
        self.tasks: set[asyncio.Task[None]] = set()
        self.pending: dict[str, FunctionRequest] = {}  # client-side requests not yet answered, by id
        self.batches: list[_Batch] = []
        self.turn_ended_at = 0.0
        self.reading = asyncio.Event()  # the receive loop reads only while set (stop_reading)
        self.reading.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guarded(coro))
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._done, coro))
        return task

    def _done(self, coro: Coroutine[Any, Any, None], task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        coro.close()  # a task cancelled before it started (the session ended) never ran it: no warning
        if not task.cancelled() and task.exception() is not None:
            self.log.error("local_agent_task_failed", error=repr(task.exception()))

    @staticmethod
    async def _guarded(coro: Coroutine[Any, Any, None]) -> None:
        with contextlib.suppress(ConnectionClosed):
            await coro

    async def send_json(self, msg: dict[str, Any]) -> None:
        self.rec.sent.append(msg)
        await self.ws.send(json.dumps(msg))

    async def error(self, code: str, description: str) -> None:
        self.rec.errors_sent.append(code)
        await self.send_json({"type": "Error", "description": description, "code": code})

    def steps(self, on: str, n: int = 0) -> list[ScriptStep]:
        per_turn = on in TURN_EVENTS
        return [
            s
            for s in self.cfg.script
            if s.on == on
            and (not per_turn or s.n == n)
            and in_sessions(s.sessions, self.rec.number)
            and (s.tag is None or s.tag in self.tags())
        ]

    def tags(self) -> list[str]:
        tags = (self.rec.settings or {}).get("tags")
        return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []

    async def run(self) -> None:
        try:
            for step in self.steps("connect"):
                if not await self.perform(step):
                    return
            await self.send_json({"type": "Welcome", "request_id": self.rec.request_id})
            while True:
                await self.reading.wait()  # closed while a stop_reading step holds the socket
                try:
                    message = await asyncio.wait_for(self.ws.recv(), self.cfg.idle_timeout)
                except TimeoutError:
                    await self.error(
                        "CLIENT_MESSAGE_TIMEOUT",
                        "We did not receive audio within our timeout. Please ensure you are sending "
                        "binary messages containing user speech.",
                    )
                    await self.ws.close(1011, "client message timeout")
                    return
                if isinstance(message, bytes):
                    if self.rec.settings is None:
                        await self.error("NON_SETTINGS_MESSAGE_BEFORE_SETTINGS", "Received audio before Settings")
                        await self.ws.close(1008, "audio before settings")
                        return
                    self.rec.audio_in += message
                    self.rec.audio_in_at.append((len(self.rec.audio_in), time.monotonic()))
                    await self.on_audio(message)
                elif not await self.on_text(message):
                    return
        except ConnectionClosed:
            pass
        finally:
            tasks = list(self.tasks)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task

    async def on_text(self, text: str) -> bool:
        try:
            msg = json.loads(text)
            kind = msg["type"]
        except (ValueError, KeyError, TypeError):
            await self.error("UNPARSABLE_CLIENT_MESSAGE", "Could not parse client message")
            return True
        self.rec.messages.append(msg)
        if kind == "Settings":
            if self.rec.settings is not None:
                await self.error("SETTINGS_ALREADY_APPLIED", "Settings can only be sent once")
                return True
            problem = self.apply_settings(msg)
            if problem:
                await self.error("INVALID_SETTINGS", problem)
                await self.ws.close(1008, "invalid settings")
                return False
            for step in self.steps("settings"):
                if not await self.perform(step):
                    return False
            await self.send_json({"type": "SettingsApplied"})
            self.rec.settings_applied_at = time.monotonic()
            return await self.after_settings()
        if kind not in CLIENT_MESSAGE_TYPES:
            await self.error("UNPARSABLE_CLIENT_MESSAGE", f"Unknown message type {str(kind)[:40]}")
            return True
        if kind == "KeepAlive":
            self.rec.keepalives += 1
            return True
        if self.rec.settings is None:
            await self.error("NON_SETTINGS_MESSAGE_BEFORE_SETTINGS", f"Received {kind} before Settings")
            await self.ws.close(1008, "message before settings")
            return False
        if kind in UPDATE_REPLIES:
            await self.send_json({"type": UPDATE_REPLIES[kind]})
        elif kind == "FunctionCallResponse":
            await self.on_function_response(msg)
        elif kind == "InjectAgentMessage":
            await self.on_inject_agent(msg)
        elif kind == "InjectUserMessage":
            await self.on_inject_user(msg)
        return True

    def apply_settings(self, msg: dict[str, Any]) -> str | None:
        try:
            audio = msg["audio"]
            formats = []
            for side in ("input", "output"):
                spec = audio.get(side, {"encoding": "linear16", "sample_rate": 24000 if side == "output" else 16000})
                encoding, rate = spec["encoding"], spec["sample_rate"]
                if encoding not in SUPPORTED_ENCODINGS or type(rate) is not int or rate < 8000:
                    return f"unsupported audio.{side}: {encoding}/{rate}"
                formats.append(AudioFormat(encoding, rate))
            if audio.get("output", {}).get("container", "none") != "none":
                return "the local agent only supports container none"
            agent = msg["agent"]
        except (KeyError, TypeError, AttributeError) as exc:
            return f"malformed Settings: {exc}"
        self.in_fmt, self.out_fmt = formats
        self.to_pcm = Transcoder(self.in_fmt, AudioFormat("linear16", self.in_fmt.sample_rate))
        self.frame_bytes = self.in_fmt.sample_rate * 2 // 50  # 20 ms of linear16
        if isinstance(agent, dict) and isinstance(agent.get("greeting"), str):
            self.greeting = agent["greeting"]
        self.rec.declared_functions = declared_function_names(agent)
        self.rec.settings = msg
        return None

    async def after_settings(self) -> bool:
        for step in self.steps("settings_applied"):
            if not await self.perform(step):
                return False
        if self.greeting:
            self.speaking = self.spawn(self.say(self.greeting, 0.0))
        return True

    async def perform(self, step: ScriptStep) -> bool:
        """Run one scripted step; False when the session is over."""
        if step.do == "error":
            await self.error(step.code, step.description)
            await self.ws.close(1011, "scripted error")
            return False
        if step.do == "warning":
            await self.send_json({"type": "Warning", "description": step.description, "code": step.code})
        elif step.do == "close":
            self.ws.transport.abort()
            return False
        elif step.do == "stall":
            async for _ in self.ws:  # read and discard until the client goes; answer nothing
                pass
            return False
        elif step.do == "stop_reading":
            self.stop_reading(step.seconds)
        elif step.do == "delay":
            await asyncio.sleep(step.seconds)
        elif step.do == "unknown":
            await self.send_json({"type": "SomethingNewFromTheFuture", "detail": "ignore me"})
        elif step.do == "function_call":
            await self.request_functions(step)
        return True

    def stop_reading(self, seconds: float) -> None:
        """Stop consuming the socket: the receive loop waits, the transport stops reading, and
        the kernel buffer is shrunk so the client's side fills within seconds."""
        transport = self.ws.transport
        if transport.is_closing():  # the client left first
            return
        self.rec.stopped_reading_at = time.monotonic()
        self.reading.clear()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STOPPED_READING_RCVBUF)
        transport.pause_reading()
        self.spawn(self.resume_reading(seconds))

    async def resume_reading(self, seconds: float) -> None:
        """After ``seconds`` (0: never) read again; a client that resets the connection (seen
        without reading: the socket is polled) ends the session at once."""
        transport = self.ws.transport
        sock = transport.get_extra_info("socket")
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while seconds <= 0 or loop.time() < until:
            await asyncio.sleep(PEER_GONE_POLL_S)
            if sock is None or transport.is_closing() or peer_gone(sock.fileno()):
                transport.abort()
                break
        if not transport.is_closing():
            transport.resume_reading()
        self.reading.set()

    # --- functions and injected messages -------------------------------------------------

    async def request_functions(self, step: ScriptStep) -> None:
        """Send one FunctionCallRequest; never waits for the answers (they arrive as messages)."""
        now = time.monotonic()
        wire: list[dict[str, Any]] = []
        server_side: list[FunctionRequest] = []
        waiting: set[str] = set()
        for name, arguments, client_side in step.requested():
            request = FunctionRequest(f"call-{uuid.uuid4().hex[:12]}", name, arguments, client_side, now)
            self.rec.function_requests.append(request)
            wire.append({"id": request.id, "name": name, "arguments": arguments, "client_side": client_side})
            if client_side:
                self.pending[request.id] = request
                waiting.add(request.id)
            else:
                server_side.append(request)
        reply = self.cfg.function_reply if step.reply is None else step.reply
        self.log.info("function_call_requested", functions=[f["name"] for f in wire])
        await self.send_json({"type": "FunctionCallRequest", "functions": wire})
        for request in server_side:  # Deepgram calls the endpoint and reports the result itself
            request.answered_at = time.monotonic()
            await self.send_json(
                {
                    "type": "FunctionCallResponse",
                    "id": request.id,
                    "name": request.name,
                    "content": self.cfg.server_function_result,
                }
            )
        if waiting:
            self.batches.append(_Batch(waiting, reply))
        elif reply:
            self.spawn(self.say(reply, 0.05))

    async def on_function_response(self, msg: dict[str, Any]) -> None:
        call_id, name, content = msg.get("id"), msg.get("name"), msg.get("content")
        if not isinstance(name, str) or not isinstance(content, str) or not isinstance(call_id, str | None):
            await self.error("UNPARSABLE_CLIENT_MESSAGE", "FunctionCallResponse needs string name and content")
            return
        now = time.monotonic()
        request = self.pending.pop(call_id, None) if call_id is not None else None
        self.rec.function_responses.append(FunctionResponse(call_id or "", name, content, now, request is not None))
        self.log.info("function_call_answered", function=name, matched=request is not None)
        if request is None:
            return
        request.answered_at = now
        for batch in list(self.batches):
            batch.waiting.discard(request.id)
            if not batch.waiting:
                self.batches.remove(batch)
                if batch.reply:  # the LLM goes on with the results: a short spoken reply
                    self.spawn(self.say(batch.reply, 0.05))

    def busy(self) -> str | None:
        """Why an agent message cannot be injected now, as the real service words it."""
        if self.voice.locked():
            return "Agent is currently speaking"
        if self.detector.in_speech:
            return "User is currently speaking"
        return None

    async def on_inject_agent(self, msg: dict[str, Any]) -> None:
        text = msg.get("message")
        if not isinstance(text, str):
            await self.error("UNPARSABLE_CLIENT_MESSAGE", "InjectAgentMessage needs a string message")
            return
        refusal = self.busy()
        self.rec.injections.append(Injection("InjectAgentMessage", text, time.monotonic(), refusal is not None, msg))
        self.log.info("inject_agent_message", refused=refusal is not None)
        if refusal is not None:
            await self.send_json({"type": "InjectionRefused", "message": refusal})
            return
        self.spawn(self.say(text, 0.0))

    async def on_inject_user(self, msg: dict[str, Any]) -> None:
        text = msg.get("content")
        if not isinstance(text, str):
            await self.error("UNPARSABLE_CLIENT_MESSAGE", "InjectUserMessage needs a string content")
            return
        self.rec.injections.append(Injection("InjectUserMessage", text, time.monotonic(), False, msg))
        self.rec.user_messages += 1
        self.turn_ended_at = time.monotonic()
        await self.send_json({"type": "ConversationText", "role": "user", "content": text})
        self.interrupt_reply()
        reply = f"[reply to: {text[:80]}]"
        self.speaking = self.spawn(self.respond("user_message", self.rec.user_messages, reply, None))

    # --- listening -----------------------------------------------------------------------

    async def on_audio(self, data: bytes) -> None:
        assert self.to_pcm is not None
        pcm = self.carry + self.to_pcm.convert(data)
        n = len(pcm) - len(pcm) % self.frame_bytes
        self.carry = pcm[n:]
        for i in range(0, n, self.frame_bytes):
            await self.on_frame(pcm[i : i + self.frame_bytes])

    async def on_frame(self, pcm: bytes) -> None:
        """The speech detector on 20 ms frames of linear16; utterances are kept as linear16."""
        event = self.detector.feed(pcm)
        if event is SpeechEvent.ONSET:
            self.preroll.append(pcm)
            self.utterance = bytearray(b"".join(self.preroll))
            self.preroll.clear()
            await self.send_json({"type": "UserStartedSpeaking"})
            self.interrupt_reply()  # interrupted: stop talking at once
            if self.voice_owner is not None and not self.voice_owner.done():
                self.voice_owner.cancel()
            return
        if event is None and not self.detector.in_speech:  # still quiet
            self.preroll.append(pcm)
            return
        self.utterance += pcm  # speech, or its hangover up to and including the offset frame
        if event is SpeechEvent.OFFSET:
            # the quiet hangover frames are not part of what was said
            spoken = bytes(self.utterance[: len(self.utterance) - self.detector.hangover_frames * len(pcm)])
            self.rec.utterances += 1
            self.turn_ended_at = time.monotonic()
            self.interrupt_reply()
            n = self.rec.utterances
            seconds = len(spoken) / (2 * self.in_fmt.sample_rate)
            await self.send_json(
                {"type": "ConversationText", "role": "user", "content": f"[utterance {n}: {seconds:.2f} s]"}
            )
            self.speaking = self.spawn(self.respond("utterance", n, f"[echo of utterance {n}]", spoken))

    def interrupt_reply(self) -> None:
        if self.speaking is not None and not self.speaking.done():
            self.speaking.cancel()

    # --- speaking ------------------------------------------------------------------------

    async def respond(self, on: str, n: int, text: str, pcm: bytes | None) -> None:
        """The reply to a user turn: scripted steps first; a function request replaces the reply."""
        await asyncio.sleep(self.cfg.reply_delay)
        requested = False
        drop_after: float | None = None
        for step in self.steps(on, n):
            requested |= step.do == "function_call"
            if step.do == "drop_mid_reply":
                drop_after = step.seconds
            elif not await self.perform(step):
                return
        if requested:
            return  # the reply comes once the functions are answered
        think_s = time.monotonic() - self.turn_ended_at
        if pcm is None:
            await self.say(text, think_s, drop_after=drop_after)
        else:
            await self.say(text, think_s, pcm, self.in_fmt.sample_rate, drop_after=drop_after)

    async def say(
        self,
        text: str,
        think_s: float,
        pcm: bytes | None = None,
        rate: int = synth.SAMPLE_RATE,
        drop_after: float | None = None,
    ) -> None:
        """Speak once nothing else is being said; ``pcm`` (linear16) defaults to ``text`` synthesised."""
        async with self.voice:
            self.voice_owner = asyncio.current_task()
            try:
                audio = speech_for(text) if pcm is None else pcm
                await self.speak(audio, rate, text, think_s, drop_after)
            finally:
                self.voice_owner = None

    async def speak(self, pcm: bytes, rate: int, text: str, think_s: float, drop_after: float | None = None) -> None:
        audio = synth.encode(pcm, self.out_fmt, rate)
        speech = Speech(text, time.monotonic())
        self.rec.speeches.append(speech)
        await self.send_json(
            {
                "type": "AgentStartedSpeaking",
                "total_latency": round(think_s + 0.01, 3),
                "tts_latency": 0.01,
                "ttt_latency": round(think_s, 3),
            }
        )
        chunk = self.out_fmt.bytes_for(self.cfg.chunk_ms / 1000)
        pace = (self.cfg.chunk_ms / 1000) / self.cfg.speak_rate if self.cfg.speak_rate > 0 else 0.0
        start = time.monotonic()
        drop_at = None if drop_after is None else max(1, self.out_fmt.bytes_for(drop_after))
        try:
            for i, offset in enumerate(range(0, len(audio), chunk)):
                piece = audio[offset : offset + chunk]
                self.rec.audio_out += piece
                await self.ws.send(piece)
                if drop_at is not None and offset + len(piece) >= drop_at:
                    speech.interrupted = True
                    self.rec.dropped_after_bytes = len(self.rec.audio_out)
                    self.ws.transport.abort()  # mid-reply, no close frame: the client sees a lost connection
                    return
                delay = start + (i + 1) * pace - time.monotonic()
                await asyncio.sleep(max(0.0, delay))
        except asyncio.CancelledError:
            speech.interrupted = True
            raise
        await self.send_json({"type": "AgentAudioDone"})
        speech.done_at = time.monotonic()
        await self.send_json({"type": "ConversationText", "role": "assistant", "content": text})


class LocalAgent:
    """Serve the protocol on ``host:port``; ``sessions`` records each client."""

    def __init__(self, config: LocalAgentConfig | None = None) -> None:
        self.config = config or LocalAgentConfig()
        self.sessions: list[SessionRecord] = []
        self.refused: list[tuple[int, int]] = []  # (upgrade number, HTTP status) of each refused upgrade
        self.upgrades = 0  # upgrade requests so far: the number ScriptStep.sessions counts
        self._numbers: dict[ServerConnection, int] = {}
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return agent_url(self.port)

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != AGENT_PATH:
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        self.upgrades += 1
        number = self.upgrades
        key = self.config.require_key
        status = 401 if key is not None and request.headers.get("Authorization") != f"Token {key}" else None
        for step in self.config.script:
            if status is None and step.do == "refuse" and in_sessions(step.sessions, number):
                status = step.status
        if status is not None:
            self.refused.append((number, status))
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = "Refused"
            return Response(status, reason, Headers([("Content-Length", "0")]), b"")
        self._numbers[conn] = number
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        record = SessionRecord(request_id=str(uuid.uuid4()), number=self._numbers.pop(ws, 0))
        if ws.request is not None:
            record.headers = {k.lower(): v for k, v in ws.request.headers.raw_items() if k.lower() != "authorization"}
            record.headers["authorization-present"] = str("Authorization" in ws.request.headers)
        self.sessions.append(record)
        try:
            await _Session(self, ws, record).run()
        finally:
            record.closed = True
            record.close_code = ws.close_code
            record.closed_at = time.monotonic()

    async def start(self, host: str = LOOPBACK, port: int = 0) -> int:
        self._server = await serve(
            self._handle, host, port, process_request=self._check_request, compression=None, max_size=2**20
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
