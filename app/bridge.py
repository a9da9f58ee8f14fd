"""Runs one phone call: the Twilio pump, the agent pump and the core ``Call`` between them.

All decisions are the core's. This module only moves frames: it parses what arrives, feeds
the core, and performs the returned actions synchronously and in order. Sends go through one
bounded queue per socket, drained by one writer task each, so the order the core chose is
the order on the wire even when events from both sockets interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from app.agent.client import run_session
from app.core.actions import (
    Action,
    BindLogContext,
    ClearTwilio,
    ConnectAgent,
    EndCall,
    Log,
    Measure,
    SendToAgent,
    SendToTwilio,
)
from app.core.call import Call, CallOptions, CallStats
from app.core.events import BridgeStopping, Event, Tick, TwilioClosed, TwilioInvalid, TwilioStart
from app.observability.call_records import CallRecordSender
from app.observability.logging import get_logger
from app.observability.metrics import Metrics
from app.twilio import messages as twilio_msg
from app.twilio.stream_token import TOKEN_PARAMETER, StreamTokens

TWILIO_QUEUE_LIMIT = 4000  # messages; agent audio arrives faster than real time in bursts
AGENT_QUEUE_LIMIT = 1500  # 30 s of 20 ms caller frames, more than the pre-buffer flush
START_TIMEOUT = 10.0
TICK_SECONDS = 0.5
DRAIN_SECONDS = 0.25
POLICY_VIOLATION = 1008
MEDIA_PREFIX = '{"event":"media"'


def _media_bytes(message: str) -> int:
    """Audio bytes in one of our own media messages, without decoding it."""
    payload = message[message.index('"payload":"') + 11 : -3]
    return len(payload) * 3 // 4 - payload.count("=")


class QueueOverflow(Exception):
    pass


@dataclass
class CallDeps:
    """What every call shares with the service."""

    tokens: StreamTokens
    agent_url: str
    agent_api_key: str | None
    metrics: Metrics = field(default_factory=Metrics)
    records: CallRecordSender | None = None
    record_transcript: bool = False


class CallSession:
    def __init__(
        self,
        ws: WebSocket,
        options: CallOptions,
        deps: CallDeps,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ws = ws
        self.options = options
        self.deps = deps
        self.metrics = deps.metrics
        self.clock = clock
        self.wall_started = time.time()
        self.log: Any = get_logger()
        self.call = Call(options, now=clock())
        self.twilio_out: asyncio.Queue[str] = asyncio.Queue(TWILIO_QUEUE_LIMIT)
        self.agent_out: asyncio.Queue[bytes | str] = asyncio.Queue(AGENT_QUEUE_LIMIT)
        self.agent_ws: ClientConnection | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.done = asyncio.Event()
        self.end: EndCall | None = None
        self._event_at = 0.0
        self._clear_text: str | None = None
        self._clear_requested_at = 0.0
        self.clear_latencies_ms: list[float] = []
        self.twilio_dropped_on_clear = 0
        self.twilio_bytes_dropped_on_clear = 0
        self._flushed = CallStats()  # what the metrics have been given so far
        self._flushed_cleared_bytes = 0

    # --- feeding the core and performing its actions ---------------------------------------

    def feed(self, event: Event) -> None:
        self._event_at = now = self.clock()
        try:
            self.perform(self.call.handle(event, now))
        except QueueOverflow as exc:
            self.log.error("send_queue_overflow", queue=str(exc))
            self.feed(BridgeStopping(f"{exc} send queue overflow: peer not reading"))

    def perform(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case SendToAgent(data=data):
                    self._put(self.agent_out, data, "agent")
                case SendToTwilio(text=text):
                    self._put(self.twilio_out, text, "twilio")
                case ClearTwilio(text=text):
                    self._clear(text)
                case Log(level=level, event=event, fields=fields):
                    getattr(self.log, level)(event, **fields)
                case BindLogContext(fields=fields):
                    self.log = self.log.bind(**fields)
                case ConnectAgent():
                    self._spawn(
                        run_session(self.deps.agent_url, self.deps.agent_api_key, self.feed, self._agent_opened)
                    )
                case Measure(metric=metric, value=value, label=label):
                    self.metrics.record(metric, value, label)
                case EndCall():
                    self.end = action
                    self.done.set()

    @staticmethod
    def _put(queue: asyncio.Queue[Any], item: Any, name: str) -> None:
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueOverflow(name) from None

    def _clear(self, text: str) -> None:
        """Barge-in: drop media still queued here, then make ``clear`` the next frame out."""
        kept: list[str] = []
        while not self.twilio_out.empty():
            item = self.twilio_out.get_nowait()
            self.twilio_out.task_done()
            if item.startswith(MEDIA_PREFIX):
                self.twilio_dropped_on_clear += 1
                self.twilio_bytes_dropped_on_clear += _media_bytes(item)
            elif not item.startswith('{"event":"mark"'):
                kept.append(item)
        self.twilio_out.put_nowait(text)
        for item in kept:
            self.twilio_out.put_nowait(item)
        self._clear_text = text
        self._clear_requested_at = self._event_at

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(self._task_finished)
        self.tasks.append(task)

    def _task_finished(self, task: asyncio.Task[Any]) -> None:
        """A pump that dies of a bug must end the call loudly, never leave it hanging."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.log.error("call_task_crashed", task=task.get_coro().__qualname__, exc_info=exc)  # type: ignore[union-attr]
        self.feed(BridgeStopping(f"internal error: {type(exc).__name__}"))

    def _agent_opened(self, ws: ClientConnection) -> None:
        self.agent_ws = ws
        self._spawn(self._agent_writer(ws))

    # --- tasks -----------------------------------------------------------------------------

    async def _twilio_reader(self) -> None:
        parse = twilio_msg.parse
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.feed(TwilioClosed(message.get("code")))
                return
            text = message.get("text")
            if text is None:
                self.feed(TwilioInvalid("binary_frame", f"{len(message.get('bytes') or b'')} bytes"))
            else:
                self.feed(parse(text))

    async def _twilio_writer(self) -> None:
        queue = self.twilio_out
        try:
            while True:
                text = await queue.get()
                await self.ws.send_text(text)
                queue.task_done()
                if text is self._clear_text:
                    self._clear_text = None
                    latency = self.clock() - self._clear_requested_at
                    self.clear_latencies_ms.append(latency * 1000)
                    self.metrics.clear_latency.observe(latency)
                    self.log.info("barge_in_clear_sent", latency_ms=round(latency * 1000, 3))
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.feed(TwilioClosed(None))

    async def _agent_writer(self, ws: ClientConnection) -> None:
        queue = self.agent_out
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(await queue.get())
                queue.task_done()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.feed(Tick())
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        """Move the call's own counters into Prometheus: per tick, not per frame."""
        stats, seen, m = self.call.stats, self._flushed, self.metrics
        for counter, direction, now, before in (
            (m.frames, "caller_to_agent", stats.caller_frames, seen.caller_frames),
            (m.frames, "agent_to_caller", stats.agent_frames, seen.agent_frames),
            (m.bytes, "caller_to_agent", stats.caller_bytes, seen.caller_bytes),
            (m.bytes, "agent_to_caller", stats.agent_bytes, seen.agent_bytes),
        ):
            if now > before:
                counter.labels(direction).inc(now - before)
        for reason, direction, now, before in (
            ("agent_not_ready", "caller_to_agent", stats.caller_bytes_dropped, seen.caller_bytes_dropped),
            ("no_stream_or_barge_in", "agent_to_caller", stats.agent_bytes_dropped, seen.agent_bytes_dropped),
            ("barge_in", "agent_to_caller", self.twilio_bytes_dropped_on_clear, self._flushed_cleared_bytes),
        ):
            if now > before:
                m.dropped.labels(direction, reason).inc(now - before)
        for kind, count in stats.invalid.items():
            if count > seen.invalid.get(kind, 0):
                m.invalid_inputs.labels(kind).inc(count - seen.invalid.get(kind, 0))
        self._flushed = dataclasses.replace(stats, invalid=dict(stats.invalid), agent_latencies=[])
        self._flushed_cleared_bytes = self.twilio_bytes_dropped_on_clear

    # --- lifecycle -------------------------------------------------------------------------

    async def _await_start(self) -> TwilioStart | None:
        """Read frames up to ``start``; earlier media is fed to the core, which buffers it."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
            event = twilio_msg.parse(text) if text is not None else TwilioInvalid("binary_frame")
            if isinstance(event, TwilioStart):
                return event
            if isinstance(event, TwilioInvalid) and event.kind == "bad_start":
                self.log.warning("twilio_start_rejected", detail=event.detail)
                return None
            self.feed(event)

    async def run(self) -> None:
        try:
            start = await asyncio.wait_for(self._await_start(), START_TIMEOUT)
        except (TimeoutError, WebSocketDisconnect):
            start = None
        if start is None:
            self.log.warning("twilio_stream_without_start")
            self.metrics.streams_rejected.labels("no_start").inc()
            await self._close_twilio(POLICY_VIOLATION)
            return
        self.log = self.log.bind(call_sid=start.call_sid, stream_sid=start.stream_sid)
        problem = self.deps.tokens.redeem(start.custom_parameters.get(TOKEN_PARAMETER, ""), start.call_sid)
        if problem is not None:
            self.log.warning("stream_token_rejected", reason=problem)
            self.metrics.streams_rejected.labels("bad_token").inc()
            await self._close_twilio(POLICY_VIOLATION)
            return
        self.metrics.active_calls.inc()
        self.feed(start)
        self._spawn(self._twilio_writer())
        self._spawn(self._twilio_reader())
        self._spawn(self._ticker())
        try:
            await self.done.wait()
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        if self.end is None:  # cancelled from outside (server shutdown)
            self.feed(BridgeStopping("bridge shutting down", "bridge_shutdown"))
        if self.agent_ws is not None:
            # caller audio already queued still reaches the agent (briefly bounded), then close
            if self.agent_ws.state is State.OPEN:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.agent_out.join(), DRAIN_SECONDS)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.agent_ws.close(), 1.0 - DRAIN_SECONDS)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._close_twilio(1000)
        self.metrics.active_calls.dec()
        self._flush_metrics()
        summary = self.call.summary(self.clock())
        self.metrics.calls.labels(summary["outcome"]).inc()
        if self.clear_latencies_ms:
            summary["clear_latency_ms_max"] = round(max(self.clear_latencies_ms), 3)
        summary["agent_bytes_dropped_on_clear"] = self.twilio_bytes_dropped_on_clear
        self.log.info("call_ended", **summary)
        if self.deps.records is not None:
            self.deps.records.submit(self.record(summary))

    def record(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The call record for CALL_EVENTS_URL: ids, parties, the summary, maybe the transcript."""
        call = self.call
        record: dict[str, Any] = {
            "type": "call.ended",
            "call_sid": call.call_sid,
            "stream_sid": call.stream_sid,
            "agent_request_id": call.request_id,
            "from": call.custom_parameters.get("from", ""),
            "to": call.custom_parameters.get("to", ""),
            "started_at": datetime.fromtimestamp(self.wall_started, UTC).isoformat(),
            **summary,
        }
        if self.deps.record_transcript:
            record["transcript"] = [{"t": t, "role": role, "content": text} for t, role, text in call.transcript]
        return record

    async def _close_twilio(self, code: int) -> None:
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)
