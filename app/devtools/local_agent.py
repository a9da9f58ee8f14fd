"""A local stand-in for agent.deepgram.com that speaks the Voice Agent V1 protocol.

It has no speech recognition and no LLM: an energy detector finds the caller's utterances,
and the "reply" echoes each utterance back in the session's output format. Everything else
follows the real service: Welcome, Settings checks and errors, SettingsApplied, the greeting
spoken as audio, UserStartedSpeaking (and it stops talking when interrupted),
AgentStartedSpeaking with latencies, AgentAudioDone, ConversationText, KeepAlive, and
CLIENT_MESSAGE_TIMEOUT when the client goes quiet. A script makes it misbehave on purpose for
tests: request a function call, send an Error or Warning, close abruptly, delay a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
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


@dataclass
class ScriptStep:
    """One scripted misbehaviour. ``on`` is "settings" (before SettingsApplied is sent),
    "settings_applied" (after it) or "utterance" (before the reply to utterance ``n``).

    ``do``: function_call (``name``, ``arguments``), error/warning (``code``, ``description``),
    close (abrupt, no close frame), delay (``seconds`` before the reply), unknown (a message
    type the client cannot know).
    """

    on: str
    do: str
    n: int = 1
    name: str = "lookup"
    arguments: str = "{}"
    code: str = "INTERNAL_SERVER_ERROR"
    description: str = "scripted"
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScriptStep:
        return cls(**data)


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


@dataclass
class SessionRecord:
    """What one client did, for tests to inspect."""

    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    audio_in: bytearray = field(default_factory=bytearray)
    audio_out: bytearray = field(default_factory=bytearray)
    keepalives: int = 0
    utterances: int = 0
    errors_sent: list[str] = field(default_factory=list)
    closed: bool = False
    close_code: int | None = None
    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None


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
        self.speaking: asyncio.Task[None] | None = None
        self.function_replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=16)
        self.utterance_ended_at = 0.0

    async def send_json(self, msg: dict[str, Any]) -> None:
        self.rec.sent.append(msg)
        await self.ws.send(json.dumps(msg))

    async def error(self, code: str, description: str) -> None:
        self.rec.errors_sent.append(code)
        await self.send_json({"type": "Error", "description": description, "code": code})

    def steps(self, on: str, n: int = 0) -> list[ScriptStep]:
        return [s for s in self.cfg.script if s.on == on and (on != "utterance" or s.n == n)]

    async def run(self) -> None:
        await self.send_json({"type": "Welcome", "request_id": self.rec.request_id})
        try:
            while True:
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
                    await self.on_audio(message)
                elif not await self.on_text(message):
                    return
        except ConnectionClosed:
            pass
        finally:
            if self.speaking:
                self.speaking.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await self.speaking

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
            with contextlib.suppress(asyncio.QueueFull):
                self.function_replies.put_nowait(msg)
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
        self.rec.settings = msg
        return None

    async def after_settings(self) -> bool:
        for step in self.steps("settings_applied"):
            if not await self.perform(step):
                return False
        if self.greeting:
            pcm = synth.speech_like(self.greeting)
            self.speaking = asyncio.create_task(self.speak(pcm, synth.SAMPLE_RATE, self.greeting, 0.0))
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
        elif step.do == "delay":
            await asyncio.sleep(step.seconds)
        elif step.do == "unknown":
            await self.send_json({"type": "SomethingNewFromTheFuture", "detail": "ignore me"})
        elif step.do == "function_call":
            call_id = f"call-{uuid.uuid4().hex[:12]}"
            await self.send_json(
                {
                    "type": "FunctionCallRequest",
                    "functions": [{"id": call_id, "name": step.name, "arguments": step.arguments, "client_side": True}],
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.function_replies.get(), 5.0)
        return True

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
            if self.speaking and not self.speaking.done():
                self.speaking.cancel()  # interrupted: stop talking at once
            return
        if event is None and not self.detector.in_speech:  # still quiet
            self.preroll.append(pcm)
            return
        self.utterance += pcm  # speech, or its hangover up to and including the offset frame
        if event is SpeechEvent.OFFSET:
            # the quiet hangover frames are not part of what was said
            spoken = bytes(self.utterance[: len(self.utterance) - self.detector.hangover_frames * len(pcm)])
            self.rec.utterances += 1
            self.utterance_ended_at = time.monotonic()
            if self.speaking and not self.speaking.done():
                self.speaking.cancel()
            self.speaking = asyncio.create_task(self.reply(self.rec.utterances, spoken))

    # --- speaking ------------------------------------------------------------------------

    async def reply(self, n: int, pcm: bytes) -> None:
        rate = self.in_fmt.sample_rate
        seconds = len(pcm) / (2 * rate)
        await self.send_json(
            {"type": "ConversationText", "role": "user", "content": f"[utterance {n}: {seconds:.2f} s]"}
        )
        await asyncio.sleep(self.cfg.reply_delay)
        for step in self.steps("utterance", n):
            if not await self.perform(step):
                return
        think_s = time.monotonic() - self.utterance_ended_at
        await self.speak(pcm, rate, f"[echo of utterance {n}]", think_s)

    async def speak(self, pcm: bytes, rate: int, text: str, think_s: float) -> None:
        audio = synth.encode(pcm, self.out_fmt, rate)
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
        for i, offset in enumerate(range(0, len(audio), chunk)):
            piece = audio[offset : offset + chunk]
            self.rec.audio_out += piece
            await self.ws.send(piece)
            delay = start + (i + 1) * pace - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
        await self.send_json({"type": "AgentAudioDone"})
        await self.send_json({"type": "ConversationText", "role": "assistant", "content": text})


class LocalAgent:
    """Serve the protocol on ``host:port``; ``sessions`` records each client."""

    def __init__(self, config: LocalAgentConfig | None = None) -> None:
        self.config = config or LocalAgentConfig()
        self.sessions: list[SessionRecord] = []
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return agent_url(self.port)

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != AGENT_PATH:
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        key = self.config.require_key
        if key is not None and request.headers.get("Authorization") != f"Token {key}":
            return Response(401, "Unauthorized", Headers([("Content-Length", "0")]), b"")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        record = SessionRecord(request_id=str(uuid.uuid4()))
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
