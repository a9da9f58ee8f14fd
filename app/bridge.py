"""Runs one phone call: the Twilio pump, the agent pump and the core ``Call`` between them.

All decisions are the core's (``app/core``): this module only moves frames. It parses what
arrives, feeds the core, and performs the returned actions synchronously and in order. Sends
go through one bounded queue per socket, drained by one writer task each, so the order the
core chose is the order on the wire even when events from both sockets interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, assert_never

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from app.agent.client import AgentConnection, run_session
from app.core.actions import (
    Action,
    BindLogContext,
    ClearTwilio,
    ConnectAgent,
    EndCall,
    HangUpCall,
    Log,
    Measure,
    Notify,
    RedeemStreamToken,
    RedirectCall,
    RunFunction,
    SendMark,
    SendMedia,
    SendToAgent,
    StartRecording,
    TwilioOut,
)
from app.core.call import Call
from app.core.call_control import SteerProblem
from app.core.events import (
    AmdVerdict,
    BridgeFailed,
    BridgeShuttingDown,
    CallGone,
    CallUpdated,
    CallUpdateFailed,
    Event,
    FunctionDone,
    OperatorCommand,
    OutboxFull,
    RecordingFailed,
    StreamEvicted,
    StreamOverCapacity,
    StreamTokenAccepted,
    StreamTokenRefused,
    Tick,
    TwilioClosed,
    TwilioFrameTooLarge,
    TwilioInvalid,
    TwilioMedia,
)
from app.core.options import (
    AMD_GRACE_SECONDS,
    METRICS_FLUSH_SECONDS,
    PEER_STUCK_SECONDS,
    TICK_SECONDS,
    TWILIO_QUEUE_AUDIO_BYTES,
    TWILIO_QUEUE_LIMIT,
    CallOptions,
)
from app.core.stats import CallStats
from app.core.vocabulary import (
    Direction,
    DropReason,
    InvalidKind,
    LiveEventType,
    LogLevel,
    MetricName,
    Outcome,
    Overflow,
    RejectReason,
    RestResult,
)
from app.live.call_view import LiveCall, iso_utc
from app.live.registry import LiveRegistry
from app.observability.call_records import CallRecordSender
from app.observability.log_limit import LogLimiter
from app.observability.logging import get_logger
from app.observability.metrics import Metrics
from app.operator_tools import call_tool
from app.outbound import (
    OutboundRecord,
    OutboundStore,
    StoreUnavailable,
    VerdictBell,
    get_record,
    get_verdict,
    mark_streamed,
)
from app.send_queue import SendQueue
from app.twilio import messages as twilio_msg
from app.twilio.media_socket import direct_socket, received_data
from app.twilio.rest import CallUpdater
from app.twilio.stream_token import StreamTokens
from app.twilio.token_store import RedisTokenStore, TokenStoreUnavailable
from app.twilio.twiml import DIRECTION_PARAMETER, PROFILE_PARAMETER

REFUSAL_EVENTS = frozenset(
    {
        "stream_rejected",
        "stream_token_rejected",
        "twilio_start_rejected",
        "twilio_stream_without_start",
        "twilio_frame_rejected",
        "twilio_wrong_stream_sid",
        "event_out_of_order",
    }
)
"""Log events a peer on the internet can cause at will; logged within ``LogLimiter``'s bound."""

AGENT_DRAIN_SECONDS = 0.25
"""At the end of a call, caller audio already queued for the agent may still reach it for
this long; then the agent socket is closed (within a second in all: the teardown promise)."""
SERVICE_RESTART = 1012  # the close code uvicorn gives every WebSocket when it shuts down
MESSAGE_TOO_BIG = 1009  # uvicorn's close for a frame over its ws_max_size

VERDICT_POLL_SECONDS = 0.25
"""How often a placed call looks for its answering-machine verdict in the shared store."""
LATE_VERDICT_SECONDS = 30.0
"""A verdict is still taken this long after AMD's own timeout (Twilio's callback can be late)."""

FLUSH_EVERY_TICKS = max(1, round(METRICS_FLUSH_SECONDS / TICK_SECONDS))
"""Ticks between two flushes of a call's counters into the metrics."""

REST_IN_FLIGHT: set[asyncio.Future[Any]] = set()
"""Hang-ups and transfers sent to Twilio and not answered yet, whichever call they were for:
held here so that none is dropped by the garbage collector once its call has ended (each is
bounded by the SDK's own timeout)."""


def twilio_audio_bytes(item: TwilioOut) -> int:
    return item.audio_bytes if isinstance(item, SendMedia) else 0


def agent_audio_bytes(item: bytes | str) -> int:
    return len(item) if isinstance(item, bytes) else 0


def agent_queue(limit: int, clock: Callable[[], float]) -> SendQueue[bytes | str]:
    return SendQueue(limit, agent_audio_bytes, clock)


@dataclass
class CallDeps:
    """What every call shares with the service."""

    tokens: StreamTokens
    agent_url: str
    agent_api_key: str | None
    metrics: Metrics = field(default_factory=Metrics)
    records: CallRecordSender | None = None
    record_transcript: bool = False
    token_store: RedisTokenStore | None = None  # REDIS_URL: single use across replicas
    options_for: Callable[[str], CallOptions | None] = lambda profile: None
    """The options of the profile a stream token names ("" is the default profile)."""
    call_updater: CallUpdater | None = None  # Twilio REST; None without credentials
    tools_secret: bytes | None = None  # WEBHOOK_SIGNING_SECRET, signs operator tool requests
    token_verified: Callable[[], None] = lambda: None
    """The stream's token carries our signature for its CallSid (single use still to be checked
    in a shared store): it leaves the token-less pool."""
    claim_place: Callable[[str], bool] = lambda call_sid: True
    """The stream redeemed the token of this CallSid: take its place under MAX_CALLS (the one
    its webhook admission held, or a free one). False: none left, the stream is refused."""
    refusals: LogLimiter = field(default_factory=LogLimiter)  # shared by the process's calls
    shutting_down: Callable[[], bool] = lambda: False
    """True once this process is closing its sockets: a Twilio socket closed then was closed by
    us, not by the caller."""
    live: LiveRegistry | None = None  # the live call API (OPERATOR_TOKEN set): calls show up there
    outbound_store: OutboundStore | None = None  # calls the bridge placed: what every process shares of them
    outbound_options: Callable[[OutboundRecord], CallOptions | None] = lambda record: None
    """A placed call's options, from its shared record (profile, variables, voicemail, AMD)."""
    worker_id: int = 1  # which worker of ``serve --workers N`` (1 for a single process)
    verdict_bell: VerdictBell | None = None  # the AMD callback landed here: look now, not at the next poll


class CallSession:
    def __init__(
        self,
        ws: WebSocket,
        options: CallOptions,
        deps: CallDeps,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ws = ws
        self.direct = direct_socket(ws.scope)  # None when not served by app.serving (no shortcut)
        self.options = options
        self.deps = deps
        self.metrics = deps.metrics
        self.clock = clock
        self.wall_started = time.time()
        self.log: Any = get_logger()
        self.call = Call(options, now=clock())
        self.twilio_out: SendQueue[TwilioOut] = SendQueue(
            TWILIO_QUEUE_LIMIT, twilio_audio_bytes, clock, audio_limit=TWILIO_QUEUE_AUDIO_BYTES
        )
        self.agent_out: SendQueue[bytes | str] = agent_queue(options.agent_queue_limit, clock)
        self.agent_ws: AgentConnection | None = None
        self.tasks: set[asyncio.Task[Any]] = set()  # running ones only: a long call spawns many
        self.done = asyncio.Event()
        self.end: EndCall | None = None
        self._event_at = 0.0
        self._clear_requested_at = 0.0
        self.clear_latency_max_ms: float | None = None  # the slowest clear of the call (the metric has them all)
        self.twilio_dropped_on_clear = 0
        self.twilio_bytes_dropped_on_clear = 0
        self._flushed = CallStats()  # what the metrics have been given so far
        self._flushed_drops: dict[tuple[DropReason, Direction], int] = {}  # bytes dropped, flushed so far
        self._overflowed: Overflow | None = None
        self._twilio_writer_task: asyncio.Task[None] | None = None
        self._agent_writer_task: asyncio.Task[None] | None = None
        self._agent_session = 0  # which agent session is current (reconnects start new ones)
        self._agent_stuck_session: int | None = None  # the session last dropped for not reading (once each)
        self._twilio_stuck_reported = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._ticks = 0
        self._agent_writer_for: AgentConnection | None = None
        self.live: LiveCall | None = None  # created once the call is accepted, when the live API is on

    # --- feeding the core and performing its actions ---------------------------------------

    def feed(self, event: Event) -> None:
        self._event_at = now = self.clock()
        self.perform(self.call.handle(event, now))

    def perform(self, actions: list[Action]) -> None:
        """Carry out the core's actions in order. Nothing more is sent once the call has
        ended; a full queue is reported to the core once, after the list (so the core is
        never re-entered in the middle of it)."""
        for action in actions:
            match action:
                case SendToAgent(data=data):
                    if self.end is None:
                        self._send_agent(data)
                case SendMedia():
                    if self.end is None:
                        self._send_twilio(action)
                        live = self.live
                        if live is not None and live.listening:
                            live.agent_media(action.text)
                case SendMark():
                    if self.end is None:
                        self._send_twilio(action)
                case ClearTwilio():
                    if self.end is None:
                        self._clear(action)
                case Log(level=level, event=event, fields=fields):
                    self._log(level, event, fields)
                case BindLogContext(fields=fields):
                    self.log = self.log.bind(**fields)
                case ConnectAgent():
                    self._connect_agent()
                case RunFunction():
                    self._spawn(self._run_function(action))
                case HangUpCall(call_sid=call_sid):
                    self._update_call(call_sid, None)
                case RedirectCall(call_sid=call_sid, twiml=twiml):
                    self._update_call(call_sid, twiml)
                case StartRecording():
                    self._spawn(self._start_recording(action))
                case RedeemStreamToken(token=token, call_sid=call_sid, profile=profile):
                    if self.deps.token_store is None:
                        self._token_checked(call_sid, profile, self.deps.tokens.redeem(token, call_sid, profile))
                    else:
                        self._spawn(self._redeem_shared(action, self.deps.token_store))
                case Measure(metric=metric, value=value, label=label):
                    self.metrics.record(metric, value, label)
                case Notify(type=kind, fields=fields):
                    self._notify(kind, fields)
                case EndCall():
                    if self.end is None:
                        self.end = action
                        self.done.set()
                        self._stop_twilio_writer()
                case _:
                    assert_never(action)
        if self._overflowed is not None and self.end is None:
            which, self._overflowed = self._overflowed, None
            self._peer_not_reading(which)

    # --- the live call API ---------------------------------------------------------------------

    def _notify(self, kind: LiveEventType, fields: dict[str, Any]) -> None:
        """A live event for the console; the call shows up in the live API once accepted (a
        stream without a redeemed token is nobody's business and holds nothing there)."""
        live = self.live
        if live is None:
            registry = self.deps.live
            if registry is None or not self.call.accepted:
                return
            live = self.live = registry.opened(self, self.call.playback.stream_started_at)
        live.event(kind.value, fields, self.clock())

    def live_summary(self) -> dict[str, Any]:
        """This call's line in ``GET /api/calls``."""
        call = self.call
        parameters = call.custom_parameters
        return {
            "call_sid": call.call_sid,
            "stream_sid": call.stream_sid,
            "from": parameters.get("from", ""),
            "to": parameters.get("to", ""),
            "profile": parameters.get(PROFILE_PARAMETER, "") or "default",
            "state": call.state.value,
            "started_at": iso_utc(self.wall_started),
            "seconds": round(self.clock() - call.playback.stream_started_at, 1),
            "worker": self.deps.worker_id,
            "barge_ins": call.stats.barge_ins,
            "last_response_ms": call.responses.latest_ms,
        }

    def steer(self, command: OperatorCommand) -> tuple[SteerProblem, str] | None:
        """An operator's command: refused in words (the API's 400/409), or carried out now."""
        if self.end is not None:
            return SteerProblem.NOT_NOW, "the call has ended"
        refusal = self.call.steer_refusal(command)
        if refusal is None:
            try:
                self.feed(command)
            except Exception as exc:  # a bug must end the call loudly, never leave it half-steered
                self._crashed("operator_command", exc)
        return refusal

    def _log(self, level: LogLevel, event: str, fields: dict[str, Any]) -> None:
        if event in REFUSAL_EVENTS:  # an attacker can cause these at will: bounded per process
            self.deps.refusals.warn(self.log, event, **fields)
            return
        match level:
            case LogLevel.DEBUG:
                self.log.debug(event, **fields)
            case LogLevel.INFO:
                self.log.info(event, **fields)
            case LogLevel.WARNING:
                self.log.warning(event, **fields)
            case LogLevel.ERROR:
                self.log.error(event, **fields)
            case _:
                assert_never(level)

    def _send_agent(self, data: bytes | str) -> None:
        """Written at once when nothing waits before it (queued, or held by the writer until
        the socket is writable again) and the agent socket takes it without waiting (the common
        case: no task hop); else queued for the writer, in order."""
        ws = self.agent_ws
        if ws is None or not self.agent_out.idle() or not ws.try_send(data):
            self._put(self.agent_out, data, Overflow.AGENT_QUEUE)

    def _send_twilio(self, item: TwilioOut) -> None:
        """As ``_send_agent``, for the Twilio socket."""
        direct = self.direct
        if direct is None or not self.twilio_out.idle() or not direct.try_send(item.text):
            self._put(self.twilio_out, item, Overflow.TWILIO_QUEUE)
        elif isinstance(item, ClearTwilio):
            self._clear_sent()

    def _put(self, queue: SendQueue[Any], item: Any, which: Overflow) -> None:
        """Queue ``item``; a full queue drops its oldest audio (logged once per direction).
        Only a queue full of control messages is reported to the core (after the list)."""
        dropped_before = queue.dropped_bytes
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            self._overflowed = self._overflowed or which
            return
        self._start_writer(which)
        if queue.dropped_bytes and not dropped_before:
            self.log.warning("audio_dropped_peer_not_reading", queue=which.value, peer_stuck_after_s=PEER_STUCK_SECONDS)

    def _start_writer(self, which: Overflow) -> None:
        """A writer task only once something had to be queued: sends are written at once
        while the socket takes them, so most calls never need one (a task is ~1.5 KiB)."""
        if which is Overflow.TWILIO_QUEUE:
            if self._twilio_writer_task is None and self.end is None:
                self._twilio_writer_task = self._spawn(self._twilio_writer())
        elif self._agent_writer_task is None and self._agent_writer_for is not None:
            self._agent_writer_task = self._spawn(self._agent_writer(self._agent_writer_for))

    def _clear(self, clear: ClearTwilio) -> None:
        """Barge-in, the pump's half (the core's is ``Playback.barge_in``): drop the media and
        marks still queued here, then make ``clear`` the next frame out."""
        queue = self.twilio_out
        while not queue.empty():
            item = queue.get_nowait()
            queue.task_done()
            match item:
                case SendMedia(audio_bytes=size):
                    self.twilio_dropped_on_clear += 1
                    self.twilio_bytes_dropped_on_clear += size
                case SendMark():
                    pass  # its audio is gone; the core has forgotten the mark
                case ClearTwilio():
                    pass  # not sent yet, and the new one does the same
                case _:
                    assert_never(item)
        self._clear_requested_at = self._event_at
        self._send_twilio(clear)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        task.add_done_callback(self._task_finished)
        self.tasks.add(task)
        return task

    def _task_finished(self, task: asyncio.Task[Any]) -> None:
        """A pump that dies of a bug must end the call loudly, never leave it hanging."""
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        self._crashed(task.get_coro().__qualname__, exc)  # type: ignore[union-attr]

    def _crashed(self, where: str, exc: BaseException) -> None:
        self.log.error("call_task_crashed", task=where, exc_info=exc)
        self.feed(BridgeFailed(f"internal error: {type(exc).__name__}"))

    def _stop_twilio_writer(self) -> None:
        """The call has ended: not one more frame to Twilio, whatever is still queued."""
        if self._twilio_writer_task is not None:
            self._twilio_writer_task.cancel()

    def evict(self) -> None:
        """The pool of token-less sockets is full and this one is its oldest: refused. Called
        from the newcomer's handler: a bug here ends this call, not the newcomer's."""
        if self.end is None:
            try:
                self.feed(StreamEvicted())
            except Exception as exc:
                self._crashed("evict", exc)

    def _token_checked(self, call_sid: str, profile: str, problem: str | None) -> None:
        if self.end is not None:  # evicted, closed or timed out while a shared store answered
            return
        if problem is not None:
            self.feed(StreamTokenRefused(problem))
            return
        if not self.deps.claim_place(call_sid):
            self.feed(StreamOverCapacity())
            return
        store = self.deps.outbound_store
        if store is not None and self.call.custom_parameters.get(DIRECTION_PARAMETER) == "outbound":
            self._spawn(self._outbound_accepted(call_sid, store))  # its record first: maybe another process's
            return
        options = self.deps.options_for(profile)
        if options is not None:  # nothing was sent to the agent yet: size its queue anew
            self._renew_agent_queue(options.agent_queue_limit)
        self.feed(StreamTokenAccepted(options))

    async def _outbound_accepted(self, call_sid: str, store: OutboundStore) -> None:
        """A call we placed: its options come from its shared record (the token vouched for the
        call); then Twilio's answering-machine verdict is watched for."""
        try:
            record = await asyncio.wait_for(get_record(store, call_sid), 2.0)
            await asyncio.wait_for(mark_streamed(store, call_sid), 2.0)
        except (StoreUnavailable, TimeoutError) as exc:
            self.log.error("outbound_record_unavailable", detail=str(exc)[:200])
            record = None
        if self.end is not None:
            return
        options = self.deps.outbound_options(record) if record is not None else None
        if options is None:  # no record: greeted as an inbound call would be (logged)
            self.log.warning("outbound_record_missing", then="treated as an answered call")
            options = self.deps.options_for(self.call.custom_parameters.get("profile", ""))
        else:
            self._renew_agent_queue(options.agent_queue_limit)
        self.feed(StreamTokenAccepted(options))
        spec = options.outbound if options is not None else None
        if spec is not None and spec.amd:
            self._spawn(self._watch_verdict(call_sid, store, spec.amd_timeout))

    async def _watch_verdict(self, call_sid: str, store: OutboundStore, amd_timeout: float) -> None:
        """Twilio's AMD callback may land on any process: its verdict is read from the shared
        store, every ``VERDICT_POLL_SECONDS``, or at once when it lands in this process (the
        bell), until it comes or can no longer matter."""
        deadline = self.clock() + amd_timeout + AMD_GRACE_SECONDS + LATE_VERDICT_SECONDS
        bell = self.deps.verdict_bell
        rung = bell.listen(call_sid) if bell is not None else asyncio.Event()
        try:
            while self.end is None and self.clock() < deadline:
                try:
                    verdict = await get_verdict(store, call_sid)
                except StoreUnavailable:
                    verdict = None
                if verdict is not None:
                    self.feed(AmdVerdict(*verdict))
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rung.wait(), VERDICT_POLL_SECONDS)
                rung.clear()
        finally:
            if bell is not None:
                bell.forget(call_sid)

    async def _redeem_shared(self, redeem: RedeemStreamToken, store: RedisTokenStore) -> None:
        """Single use across replicas. A store that cannot answer does not cost the caller the
        call: single use is then checked in this process, and the outage logged and counted."""
        tokens = self.deps.tokens
        verified = tokens.verify(redeem.token, redeem.call_sid, redeem.profile)
        if isinstance(verified, str):
            self._token_checked(redeem.call_sid, redeem.profile, verified)
            return
        # signed by us for this CallSid: no longer anyone's socket, so it leaves the token-less
        # pool now, not after the store's answer (a flood could push it out meanwhile)
        self.deps.token_verified()
        try:
            first = await store.use_once(verified.nonce, verified.expires)
            problem = None if first else "already used"
        except TokenStoreUnavailable as exc:
            self.metrics.token_store_errors.inc()
            where = "on this machine" if tokens.machine is not None else "in this process"
            self.log.error("token_store_unavailable", detail=str(exc), fallback=f"single use checked {where}")
            problem = tokens.use_locally(verified)
        self._token_checked(redeem.call_sid, redeem.profile, problem)

    async def _run_function(self, run: RunFunction) -> None:
        """An operator tool, in its own task: the audio and barge-in never wait for it. The
        core keeps its deadline; this one only frees the request a little later."""
        try:
            content, failed = await asyncio.wait_for(
                call_tool(run.url, run.payload, self.deps.tools_secret, run.timeout), run.timeout + 1.0
            )
        except TimeoutError:
            return  # the core has answered the agent already
        except Exception as exc:  # a bug in the tool client must not end the call
            self.log.error("function_crashed", name=run.name, exc_info=exc)
            content, failed = f"{run.name} failed: internal error.", True
        self.feed(FunctionDone(run.id, run.name, content, failed))

    def _update_call(self, call_sid: str, twiml: str | None) -> None:
        """Hang up (``twiml`` None) or transfer through Twilio's REST API. The request starts
        now and is not one of the call's tasks: a call that ends at once (a dead stream) still
        has Twilio complete it, and Twilio's ``stop``, which usually ends the call before the
        answer arrives, does not cancel it. Its answer is counted and fed to the core (which
        ignores it once the call has ended)."""
        updater = self.deps.call_updater
        if updater is None:
            # a hang-up still happens (closing the stream ends the call); new TwiML cannot
            result: CallUpdated | CallGone | CallUpdateFailed = (
                CallUpdated(RestResult.NO_CREDENTIALS, "no Twilio REST credentials: the stream is closed")
                if twiml is None
                else CallUpdateFailed("no Twilio REST credentials (TWILIO_ACCOUNT_SID) to change the call")
            )
            self._count_update(result)
            asyncio.get_running_loop().call_soon(self.feed, result)  # not inside the action list
            return
        request = asyncio.ensure_future(
            updater.hang_up(call_sid) if twiml is None else updater.transfer(call_sid, twiml)
        )
        REST_IN_FLIGHT.add(request)
        request.add_done_callback(REST_IN_FLIGHT.discard)
        request.add_done_callback(self._update_answered)

    def _update_answered(self, request: asyncio.Future[CallUpdated | CallGone | CallUpdateFailed]) -> None:
        """Twilio's answer, in a done-callback: a bug here must still end the call loudly."""
        if request.cancelled():  # the process is stopping
            return
        try:
            exc = request.exception()
            if exc is not None:  # CallUpdater answers every failure as an event: this is a bug
                self.log.error("call_update_crashed", exc_info=exc)
                self.feed(CallUpdateFailed(f"internal error: {type(exc).__name__}"))
                return
            result = request.result()
            self._count_update(result)
            self.feed(result)
        except Exception as exc:
            self._crashed("call_update_answered", exc)

    async def _start_recording(self, start: StartRecording) -> None:
        updater = self.deps.call_updater
        if updater is None:
            self.feed(RecordingFailed("no Twilio REST credentials (TWILIO_ACCOUNT_SID) to record the call"))
            return
        self.feed(await updater.start_recording(start.call_sid, start.status_callback_url))

    def _count_update(self, result: CallUpdated | CallGone | CallUpdateFailed) -> None:
        match result:
            case CallUpdated(result=label):
                pass
            case CallGone():
                label = RestResult.ALREADY_ENDED
            case CallUpdateFailed():
                label = RestResult.FAILED
            case _:
                assert_never(result)
        self.metrics.record(MetricName.CALL_UPDATES, 1, label.value)

    def _connect_agent(self) -> None:
        """Open an agent session. A reconnect first lets go of the lost one: its socket is
        closed, its writer stopped, its unsent queue dropped (its Settings-less audio cannot go
        to the new session: the caller's audio since the loss is in the core's pre-buffer), and
        anything its reader still says is ignored."""
        self._agent_session += 1
        session = self._agent_session
        if self.agent_ws is not None:
            old, self.agent_ws = self.agent_ws, None
            self._spawn(self._close_quietly(old))
        self._agent_writer_for = None
        if self._agent_writer_task is not None:
            self._agent_writer_task.cancel()
            self._agent_writer_task = None
            self._renew_agent_queue(self.agent_out.maxsize)

        def feed_current(event: Event) -> None:
            if session == self._agent_session:
                self.feed(event)

        def opened(ws: AgentConnection) -> None:
            if session == self._agent_session:
                self.agent_ws = ws
                self._agent_writer_for = ws
                if not self.agent_out.empty():
                    self._start_writer(Overflow.AGENT_QUEUE)

        self._spawn(run_session(self.deps.agent_url, self.deps.agent_api_key, feed_current, opened))

    def _renew_agent_queue(self, limit: int) -> None:
        """A fresh agent queue (a new profile's size, or a new session): what the old one still
        held is never sent, so it counts as dropped, and its count carries on."""
        old = self.agent_out
        self.agent_out = agent_queue(limit, self.clock)
        self.agent_out.dropped_bytes = old.dropped_bytes + old.queued_audio

    @staticmethod
    async def _close_quietly(ws: AgentConnection) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 1.0)

    # --- tasks -----------------------------------------------------------------------------

    def _twilio_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            event = twilio_msg.parse(message)
            self.feed(event)
            live = self.live
            if live is not None and live.listening and type(event) is TwilioMedia and not self.end:
                live.caller_audio(event.payload)
        else:
            self.feed(TwilioInvalid(InvalidKind.BINARY_FRAME, f"{len(message)} bytes"))

    def _twilio_message_delivered(self, message: str | bytes) -> None:
        """``_twilio_message`` in the socket's callback, where a bug must still end the call
        loudly (as in a task: ``_task_finished``) and not break the connection."""
        try:
            self._twilio_message(message)
        except Exception as exc:
            self._crashed("twilio_message", exc)

    async def _twilio_reader(self) -> None:
        """With the shortcut, messages arrive in the socket's callback and only the disconnect
        comes here; without it, everything does."""
        if self.direct is not None:
            self.direct.deliver_to(self._twilio_message_delivered)
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code")
                if code == MESSAGE_TOO_BIG:  # the server refused a frame over serving.WS_MAX_SIZE
                    self.feed(TwilioFrameTooLarge())
                    return
                ours = code == SERVICE_RESTART and self.deps.shutting_down()  # uvicorn closing at exit
                self.feed(BridgeShuttingDown() if ours else TwilioClosed(code))
                return
            self._twilio_message(received_data(message))

    async def _twilio_writer(self) -> None:
        """Sends what could not be written at once (``_send_twilio``), waiting as needed."""
        queue = self.twilio_out
        try:
            while True:
                item = await queue.get()
                await self.ws.send_text(item.text)
                queue.task_done()
                if isinstance(item, ClearTwilio):
                    self._clear_sent()
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.feed(BridgeShuttingDown() if self.deps.shutting_down() else TwilioClosed(None))

    def _clear_sent(self) -> None:
        latency = self.clock() - self._clear_requested_at
        self.clear_latency_max_ms = max(latency * 1000, self.clear_latency_max_ms or 0.0)
        self.metrics.clear_latency.observe(latency)
        self.log.debug("barge_in_clear_sent", latency_ms=round(latency * 1000, 3))  # the core logs barge_in

    async def _agent_writer(self, ws: AgentConnection) -> None:
        queue = self.agent_out
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(await queue.get())
                queue.task_done()

    def _tick(self) -> None:
        """The call's clock: a timer callback every ``TICK_SECONDS`` rather than a task
        sleeping in a loop (less memory per call, one wake-up either way). A bug ends the call."""
        self._tick_handle = None
        try:
            self.feed(Tick())
            self._check_peers_reading()
            self._ticks += 1
            if self._ticks % FLUSH_EVERY_TICKS == 0:
                self._flush_metrics()
        except Exception as exc:
            self._crashed("ticker", exc)
            return
        if not self.done.is_set():
            self._tick_handle = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def _check_peers_reading(self) -> None:
        """A peer that has taken nothing from its queue for ``PEER_STUCK_SECONDS`` while items
        wait is stuck (its oldest audio was being dropped meanwhile)."""
        for queue, which in ((self.agent_out, Overflow.AGENT_QUEUE), (self.twilio_out, Overflow.TWILIO_QUEUE)):
            if queue.stuck_for() >= PEER_STUCK_SECONDS and self.end is None:
                self._peer_not_reading(which, round(queue.stuck_for(), 1))

    def _peer_not_reading(self, which: Overflow, stuck_s: float | None = None) -> None:
        """Once per stuck peer. An agent that does not read is a lost session: its socket is
        dropped and the core reconnects (or falls back) as for any loss. A Twilio socket that
        does not read cannot carry anything the caller would hear: the core falls back through
        the REST API. A queue full of control messages (``stuck_s`` None) counts the same."""
        if which is Overflow.AGENT_QUEUE:
            ws = self.agent_ws
            if ws is None or self._agent_stuck_session == self._agent_session:
                return
            self._agent_stuck_session = self._agent_session
            self.log.error("peer_not_reading", queue=which.value, stuck_s=stuck_s, then="agent session dropped")
            self.call.stats.count_overflow(which)
            ws.transport.abort()  # the reader sees the loss and says AgentClosed, as for any drop
            return
        if self._twilio_stuck_reported:
            return
        self._twilio_stuck_reported = True
        self.log.error("peer_not_reading", queue=which.value, stuck_s=stuck_s, then="fallback")
        self.feed(OutboxFull(which))

    def _flush_metrics(self) -> None:
        """Move the call's own counters into Prometheus: per tick, not per frame."""
        stats, seen, m = self.call.stats, self._flushed, self.metrics
        for counter, direction, now, before in (
            (m.frames, Direction.CALLER_TO_AGENT, stats.caller_frames, seen.caller_frames),
            (m.frames, Direction.AGENT_TO_CALLER, stats.agent_frames, seen.agent_frames),
            (m.bytes, Direction.CALLER_TO_AGENT, stats.caller_bytes, seen.caller_bytes),
            (m.bytes, Direction.AGENT_TO_CALLER, stats.agent_bytes, seen.agent_bytes),
        ):
            if now > before:
                counter.labels(direction.value).inc(now - before)
        drops = {
            (DropReason.AGENT_NOT_READY, Direction.CALLER_TO_AGENT): stats.caller_bytes_dropped,
            (DropReason.BARGE_IN, Direction.AGENT_TO_CALLER): self.twilio_bytes_dropped_on_clear,
            (DropReason.PEER_NOT_READING, Direction.CALLER_TO_AGENT): self.agent_out.dropped_bytes,
            (DropReason.PEER_NOT_READING, Direction.AGENT_TO_CALLER): self.twilio_out.dropped_bytes,
        }
        for (reason, direction), now in drops.items():
            before = self._flushed_drops.get((reason, direction), 0)
            if now > before:
                m.dropped.labels(direction.value, reason.value).inc(now - before)
        self._flushed_drops = drops
        for kind, count in stats.invalid.items():
            if count > seen.invalid.get(kind, 0):
                m.invalid_inputs.labels(kind.value).inc(count - seen.invalid.get(kind, 0))
        for overflow, count in stats.overflows.items():
            if count > seen.overflows.get(overflow, 0):
                m.overflows.labels(overflow.value).inc(count - seen.overflows.get(overflow, 0))
        self._flushed = stats.snapshot()

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Pump until the core ends the call (or the task is cancelled), then tear down."""
        self._spawn(self._twilio_reader())
        self._tick_handle = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)
        try:
            await self.done.wait()
        finally:
            if self._tick_handle is not None:
                self._tick_handle.cancel()
            await self._teardown()

    async def _teardown(self) -> None:
        """Close the agent (letting queued caller audio reach it, briefly), then Twilio, then
        write the record. Twilio gets nothing more once the call has ended."""
        if self.end is None:  # cancelled from outside (server shutdown)
            self.feed(BridgeShuttingDown())
        if self.live is not None and self.deps.live is not None:  # gone from the live API at once
            try:
                self.deps.live.closed(self, self.clock())
            except Exception as exc:
                self.log.error("live_close_failed", exc_info=exc)
        if self.agent_ws is not None:
            # caller audio already queued still reaches the agent (briefly bounded), then close
            if self.agent_ws.state is State.OPEN:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.agent_out.join(), AGENT_DRAIN_SECONDS)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.agent_ws.close(), 1.0 - AGENT_DRAIN_SECONDS)
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        end = self.end
        if end is None:  # only if the core itself failed: still close, count and record
            self.log.error("call_not_ended_by_core", state=self.call.state.value)
            end = self.end = EndCall(Outcome.BRIDGE_ERROR, "internal error: the call did not end", 1011)
            self.metrics.record(MetricName.ACTIVE_CALLS, -1 if self.call.accepted else 0)
            self.metrics.record(MetricName.CALLS, 1, Outcome.BRIDGE_ERROR.value)
        await self._close_twilio(end.twilio_close_code)
        self._flush_metrics()
        match end.outcome:
            case RejectReason():
                return  # refused before it became a call: logged by the core, no record
            case Outcome():
                pass
            case _:
                assert_never(end.outcome)
        summary = self.call.summary(self.clock())
        if self.clear_latency_max_ms is not None:
            summary["clear_latency_ms_max"] = round(self.clear_latency_max_ms, 3)
        # agent audio is dropped only here, from the Twilio queue, on barge-in
        summary["agent_bytes_dropped"] = summary["agent_bytes_dropped_on_clear"] = self.twilio_bytes_dropped_on_clear
        self.log.info("call_ended", **summary)
        if self.deps.records is not None:
            self.deps.records.submit(self.record(summary))

    def record(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The call record for CALL_EVENTS_URL: ids, parties, the summary, maybe the transcript."""
        call = self.call
        record: dict[str, Any] = {
            "type": "call.ended",
            "direction": "inbound",
            "call_sid": call.call_sid,
            "stream_sid": call.stream_sid,
            "agent_request_id": call.agent.request_id,
            "from": call.custom_parameters.get("from", ""),
            "to": call.custom_parameters.get("to", ""),
            "started_at": datetime.fromtimestamp(self.wall_started, UTC).isoformat(),
            **summary,
        }
        record["utterances"] = call.playback.heard.records(self.clock())  # lengths only: no PII
        if self.deps.record_transcript:
            record["transcript"] = call.conversation.record()
            if call.conversation.turns_dropped:
                record["transcript_turns_dropped"] = call.conversation.turns_dropped
        return record

    async def _close_twilio(self, code: int) -> None:
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)
