"""Every live call of this instance (whichever worker holds it) and of every replica sharing
``REDIS_URL``, for the live call API (``app.live.api``).

Each process knows its own calls: the pump of each accepted call opens a ``LiveCall`` here
(``opened``) and closes it at the end (``closed``). The other processes' calls are known
through the bus (``app.live.bus``: Redis pub/sub across replicas, the supervisor's broker
between workers, nothing but this process otherwise):

- ``dir``: every process publishes its calls' lines every ``DIRECTORY_SECONDS``, and at once
  when one starts or ends; each keeps the others' latest (``GET /api/calls``);
- ``proc.<id>``: each process's own channel, for requests about its calls (a detail, an
  action, following events, listening) and for the answers to its own requests. Answers
  carry the request's id, so one subscription per process serves them all and no answer can
  race a subscription being set up.

A follower or listener on another process holds a lease, renewed every third of
``LEASE_SECONDS``: one that vanishes (its process died, its client left) costs the owner
nothing after the lease. Nothing here ever makes a call wait: what a slow follower cannot
take is dropped for it, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.core.call_control import SteerProblem
from app.core.events import OperatorCommand
from app.core.vocabulary import LiveEventType, OperatorAction
from app.live.bus import Bus, LocalBus, Subscription
from app.live.call_view import LiveCall
from app.observability.log_limit import LogLimiter
from app.observability.logging import get_logger
from app.observability.metrics import Metrics

log = get_logger(component="live")

DIRECTORY_SECONDS = 1.0
"""How often each process publishes its calls' lines (and drops followers whose lease ran out)."""
DIRECTORY_EXPIRY_SECONDS = 3.0
"""A process not heard from for this long is gone, and its calls with it (a crash, a kill -9)."""
REQUEST_TIMEOUT_SECONDS = 2.0
"""The process that holds a call answers a detail or an action within this, or the API says 504."""
LEASE_SECONDS = 6.0
"""A follower or listener on another process renews its interest every third of this."""
FOLLOW_QUEUE = 1000
"""Events waiting for one follower (an SSE client): a client this far behind is cut off (it can
reconnect and get the events so far again)."""
LISTEN_QUEUE = 100
"""Audio frames waiting for one listener, both tracks (one second of both): past it, frames
are dropped for that listener and counted (``callbridge_listen_frames_dropped_total``)."""
MAX_WATCHES = 200
"""Followers and listeners this process serves for other processes at once."""


PROCESS_ID = re.compile(r"[0-9a-f]{16}")
REQUEST_ID = re.compile(r"[0-9a-f]{32}")


class SteerableCall(Protocol):
    """What the registry needs of a call's pump (``app.bridge.CallSession``)."""

    live: LiveCall | None

    def live_summary(self) -> dict[str, Any]: ...

    def steer(self, command: OperatorCommand) -> tuple[SteerProblem, str] | None: ...


@dataclass
class Answer:
    """The outcome of an operator action, as the HTTP answer will carry it."""

    status: int
    body: dict[str, Any]


@dataclass
class Watch:
    """A follower or listener of one of this process's calls, on another process."""

    call_sid: str
    to_process: str
    request_id: str
    expires: float
    stop: Callable[[], None] = lambda: None


@dataclass
class Pending:
    """A request this process sent; answers arrive on its own channel."""

    on_answer: Callable[[dict[str, Any]], None]
    queue: asyncio.Queue[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def audio_message(track: str, payload: str) -> str:
    """What a listener gets for one frame (``payload`` is base64: nothing in it to escape)."""
    return '{"track":"' + track + '","payload":"' + payload + '"}'


def command_from(fields: dict[str, Any], action_id: str) -> OperatorCommand:
    """An ``OperatorCommand`` from fields the API checked (``app.live.api.parse_action``)."""
    speak = fields.get("speak")
    return OperatorCommand(
        OperatorAction(fields["action"]),
        action_id,
        text=str(fields.get("text", "")),
        speak=speak if isinstance(speak, dict | list) else None,  # type: ignore[arg-type]
        destination=str(fields.get("destination", "")),
    )


class LiveRegistry:
    def __init__(self, bus: Bus, metrics: Metrics) -> None:
        self.bus = bus
        self.metrics = metrics
        self.process = uuid.uuid4().hex[:16]
        self.shared = not isinstance(bus, LocalBus)  # other processes may hold calls
        self.local: dict[str, tuple[SteerableCall, LiveCall]] = {}
        self.remote: dict[str, tuple[float, list[dict[str, Any]]]] = {}  # process -> (heard at, lines)
        self.watches: dict[str, Watch] = {}  # request id -> a remote follower/listener of ours
        self.pending: dict[str, Pending] = {}  # request id -> what to do with its answers
        self.refusals = LogLimiter()
        self._subscriptions: list[Subscription] = []
        self._ticker: asyncio.Task[None] | None = None

    @property
    def channel(self) -> str:
        return f"proc.{self.process}"

    async def start(self) -> None:
        await self.bus.start()
        if self.shared:
            self._subscriptions.append(self.bus.subscribe("dir", self._on_directory))
            self._subscriptions.append(self.bus.subscribe(self.channel, self._on_message))
            self._ticker = asyncio.create_task(self._tick())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.shared:
            self.local.clear()
            self._publish_directory()  # the others forget this process's calls now
        for sub in self._subscriptions:
            sub.close()
        await self.bus.close()

    # --- the pumps' side ---------------------------------------------------------------------

    def opened(self, session: SteerableCall, stream_started: float) -> LiveCall:
        """A call was accepted; ``stream_started`` is its start on the pump's clock."""
        summary = session.live_summary()
        live = LiveCall(session.live_summary, stream_started)
        self.local[summary["call_sid"]] = (session, live)
        if self.shared:
            self._publish_directory()
        return live

    def closed(self, session: SteerableCall, now: float) -> None:
        live = session.live
        if live is None:
            return
        summary = live.summary()
        sid = summary.get("call_sid", "")
        if self.local.get(sid, (None,))[0] is session:
            del self.local[sid]
        if live.last_type != LiveEventType.ENDED.value:
            live.event(LiveEventType.ENDED.value, {"outcome": "unknown"}, now)
        live.close()
        for request_id, watch in list(self.watches.items()):
            if watch.call_sid == sid:
                self._send(watch.to_process, {"re": request_id, "end": True})
                del self.watches[request_id]
        if self.shared:
            self._publish_directory()

    # --- the API's side ----------------------------------------------------------------------

    def calls(self) -> list[dict[str, Any]]:
        """Every live call's line, this process's first-hand and the others' as last published."""
        lines = [live.summary() for _, live in self.local.values()]
        now = time.monotonic()
        for process, (heard_at, theirs) in list(self.remote.items()):
            if now - heard_at > DIRECTORY_EXPIRY_SECONDS:
                del self.remote[process]
                continue
            lines.extend(theirs)
        return sorted(lines, key=lambda line: str(line.get("started_at", "")))

    def owner(self, call_sid: str) -> str | None:
        """The process holding ``call_sid``: this one (its id), another, or None (not live)."""
        if call_sid in self.local:
            return self.process
        now = time.monotonic()
        for process, (heard_at, lines) in self.remote.items():
            if now - heard_at <= DIRECTORY_EXPIRY_SECONDS and any(line.get("call_sid") == call_sid for line in lines):
                return process
        return None

    async def detail(self, call_sid: str) -> dict[str, Any] | None:
        local = self.local.get(call_sid)
        if local is not None:
            return {**local[1].summary(), "events": local[1].events_so_far()}
        process = self.owner(call_sid)
        if process is None:
            return None
        answer = await self._ask(process, {"op": "detail", "call_sid": call_sid})
        return answer.get("detail") if answer is not None else None

    async def act(self, call_sid: str, fields: dict[str, Any]) -> Answer:
        if call_sid in self.local:
            return self._act_here(call_sid, fields)
        process = self.owner(call_sid)
        if process is None:
            return Answer(404, {"error": "no such live call"})
        answer = await self._ask(process, {"op": "act", "call_sid": call_sid, "fields": fields})
        if answer is None:
            return Answer(504, {"error": "the process holding the call did not answer"})
        if answer.get("missing"):  # it ended before the directory said so
            return Answer(404, {"error": "no such live call"})
        return Answer(int(answer.get("status", 500)), dict(answer.get("body", {})))

    def follow(self, call_sid: str) -> AsyncIterator[str] | None:
        """The call's events so far, then each new one, ending after ``ended``; None: not live."""
        local = self.local.get(call_sid)
        if local is not None:
            return self._follow_here(local[1])
        process = self.owner(call_sid)
        return None if process is None else self._follow_there(process, call_sid, "follow", FOLLOW_QUEUE)

    def listen(self, call_sid: str) -> AsyncIterator[str] | None:
        """The call's audio from now on, both tracks in the order it flowed; None: not live."""
        local = self.local.get(call_sid)
        if local is not None:
            return self._listen_here(local[1])
        process = self.owner(call_sid)
        return None if process is None else self._follow_there(process, call_sid, "listen", LISTEN_QUEUE)

    # --- here ------------------------------------------------------------------------------

    def _act_here(self, call_sid: str, fields: dict[str, Any]) -> Answer:
        local = self.local.get(call_sid)
        if local is None:
            return Answer(404, {"error": "no such live call"})
        action_id = "op_" + uuid.uuid4().hex[:20]
        refusal = local[0].steer(command_from(fields, action_id))
        if refusal is None:
            return Answer(202, {"action_id": action_id})
        problem, words = refusal
        return Answer(400 if problem is SteerProblem.INVALID else 409, {"error": words})

    async def _follow_here(self, live: LiveCall) -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(FOLLOW_QUEUE)

        def sink(kind: str, text: str) -> None:
            try:
                queue.put_nowait((kind, text))
            except asyncio.QueueFull:
                stop()
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)  # cut off: too far behind

        def wake() -> None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

        stop = live.follow(sink)
        live.end_callbacks.append(wake)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event[1]
                if event[0] == LiveEventType.ENDED.value:
                    return
        finally:
            stop()
            if wake in live.end_callbacks:
                live.end_callbacks.remove(wake)

    async def _listen_here(self, live: LiveCall) -> AsyncIterator[str]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(LISTEN_QUEUE)

        def sink(track: str, payload: str) -> None:
            try:
                queue.put_nowait(audio_message(track, payload))
            except asyncio.QueueFull:
                self.metrics.listen_dropped.inc()

        def wake() -> None:  # the end goes in even when the queue is full: one frame makes room
            with contextlib.suppress(asyncio.QueueEmpty, asyncio.QueueFull):
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(None)

        def ended(kind: str, text: str) -> None:
            if kind == LiveEventType.ENDED.value:
                wake()

        if live.closed or live.last_type == LiveEventType.ENDED.value:
            return
        stop_audio = live.listen(sink)
        live.event_sinks.append(ended)
        live.end_callbacks.append(wake)
        try:
            while True:
                frame = await queue.get()
                if frame is None:
                    return
                yield frame
        finally:
            stop_audio()
            if ended in live.event_sinks:
                live.event_sinks.remove(ended)
            if wake in live.end_callbacks:
                live.end_callbacks.remove(wake)

    # --- there: requests to other processes ----------------------------------------------------

    def _send(self, process: str, message: dict[str, Any]) -> None:
        self.bus.publish(f"proc.{process}", json.dumps(message, separators=(",", ":")).encode())

    async def _ask(self, process: str, message: dict[str, Any]) -> dict[str, Any] | None:
        request_id = uuid.uuid4().hex
        answered: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_answer(answer: dict[str, Any]) -> None:
            if not answered.done():
                answered.set_result(answer)

        self.pending[request_id] = Pending(on_answer)
        try:
            self._send(process, {**message, "id": request_id, "from": self.process})
            return await asyncio.wait_for(answered, REQUEST_TIMEOUT_SECONDS)
        except TimeoutError:
            return None
        finally:
            self.pending.pop(request_id, None)

    async def _follow_there(self, process: str, call_sid: str, op: str, limit: int) -> AsyncIterator[str]:
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(limit)

        def on_answer(answer: dict[str, Any]) -> None:
            try:
                queue.put_nowait(answer)
            except asyncio.QueueFull:
                if op == "listen":
                    self.metrics.listen_dropped.inc()

        self.pending[request_id] = Pending(on_answer)
        request = {"op": op, "call_sid": call_sid, "id": request_id, "from": self.process}
        self._send(process, request)
        renew = asyncio.create_task(self._renew(process, request_id))
        try:
            while True:
                try:
                    answer = await asyncio.wait_for(queue.get(), LEASE_SECONDS)
                except TimeoutError:
                    if self.owner(call_sid) == process:
                        continue  # a quiet moment: following carries on while the call does
                    if op == "follow":  # its process is gone, and the call with it
                        yield '{"type":"ended","at":0,"outcome":"unknown"}'
                    return
                if answer.get("end") or answer.get("missing"):
                    return
                item = answer.get("item")
                if isinstance(item, str):
                    yield item
                    if answer.get("kind") == LiveEventType.ENDED.value:
                        return
        finally:
            renew.cancel()
            self.pending.pop(request_id, None)
            self._send(process, {"op": "unwatch", "id": request_id, "from": self.process})

    async def _renew(self, process: str, request_id: str) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            self._send(process, {"op": "renew", "id": request_id, "from": self.process})

    # --- there: this process answering the others ------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            if "re" in message:
                pending = self.pending.get(str(message["re"]))
                if pending is not None:
                    pending.on_answer(message)
                return
            self._on_request(message)
        except Exception as exc:  # another process's bug must not break this one's bus
            self.refusals.warn(log, "live_bus_message_rejected", detail=f"{type(exc).__name__}: {exc}"[:200])

    def _on_request(self, message: dict[str, Any]) -> None:
        op, request_id, sender = message.get("op"), str(message.get("id", "")), str(message.get("from", ""))
        if not PROCESS_ID.fullmatch(sender) or not REQUEST_ID.fullmatch(request_id):
            raise ValueError("a request without a well-formed sender and id")
        call_sid = str(message.get("call_sid", ""))
        local = self.local.get(call_sid)
        if op == "renew":
            watch = self.watches.get(request_id)
            if watch is not None:
                watch.expires = time.monotonic() + LEASE_SECONDS
            return
        if op == "unwatch":
            watch = self.watches.pop(request_id, None)
            if watch is not None:
                watch.stop()
            return
        if local is None:
            self._send(sender, {"re": request_id, "missing": True})
            return
        live = local[1]
        if op == "detail":
            self._send(sender, {"re": request_id, "detail": {**live.summary(), "events": live.events_so_far()}})
        elif op == "act":
            answer = self._act_here(call_sid, dict(message.get("fields", {})))
            self._send(sender, {"re": request_id, "status": answer.status, "body": answer.body})
        elif op in ("follow", "listen"):
            if len(self.watches) >= MAX_WATCHES:
                self._send(sender, {"re": request_id, "missing": True})
                return
            watch = Watch(call_sid, sender, request_id, time.monotonic() + LEASE_SECONDS)
            self.watches[request_id] = watch
            if op == "follow":

                def forward(kind: str, text: str) -> None:
                    self._send(sender, {"re": request_id, "kind": kind, "item": text})

                watch.stop = live.follow(forward)
            else:

                def forward_audio(track: str, payload: str) -> None:
                    if not self.bus.publish(
                        f"proc.{sender}",
                        json.dumps({"re": request_id, "item": audio_message(track, payload)}).encode(),
                    ):
                        self.metrics.listen_dropped.inc()

                watch.stop = live.listen(forward_audio)

    # --- the directory ---------------------------------------------------------------------

    def _publish_directory(self) -> None:
        lines = [live.summary() for _, live in self.local.values()]
        message = {"process": self.process, "calls": lines}
        self.bus.publish("dir", json.dumps(message, separators=(",", ":")).encode())

    def _on_directory(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            process = str(message["process"])
            lines = [line for line in message["calls"] if isinstance(line, dict)]
        except Exception as exc:
            self.refusals.warn(log, "live_directory_rejected", detail=f"{type(exc).__name__}"[:200])
            return
        if process != self.process:
            self.remote[process] = (time.monotonic(), lines)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(DIRECTORY_SECONDS)
            try:
                self._publish_directory()
                now = time.monotonic()
                for request_id, watch in list(self.watches.items()):
                    if watch.expires < now:
                        watch.stop()
                        del self.watches[request_id]
            except Exception as exc:  # the directory must keep going whatever one round met
                log.error("live_directory_failed", exc_info=exc)
