"""The FastAPI application: the Twilio webhook, the Media Streams socket, the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from starlette.routing import WebSocketRoute
from twilio.request_validator import RequestValidator

from app import machine_db
from app.bridge import CallDeps, CallSession
from app.config import RuntimeConfig
from app.core.endings import POLICY_VIOLATION
from app.core.options import CallOptions
from app.core.vocabulary import RejectReason
from app.live.api import ListenTickets, live_routes
from app.live.bus import broker_path_from_env, bus_for
from app.live.registry import LiveRegistry
from app.observability.call_records import CallRecordSender
from app.observability.log_limit import LogLimiter
from app.observability.logging import get_logger
from app.observability.metrics import CONTENT_TYPE, Metrics
from app.offline_agent import OfflineAgent, start_offline_agent
from app.operator_tools import aclose_clients
from app.outbound import (
    AMD_STATUSES,
    FINAL_STATUSES,
    OutboundRecord,
    OutboundStore,
    StoreUnavailable,
    VerdictBell,
    get_record,
    put_record,
    put_verdict,
    store_for,
    was_streamed,
)
from app.outbound_api import outbound_routes
from app.stream_admission import ADMISSION_HOLD_SECONDS, Admission
from app.twilio import webhook
from app.twilio.messages import SID_PATTERN
from app.twilio.rest import CallUpdater
from app.twilio.stream_token import StreamTokens
from app.twilio.token_store import MachineTokenStore, RedisTokenStore
from app.workers import InstanceLoad, WorkerContext

log = get_logger(component="server")


AGENT_CHECK_TTL = 30.0


@dataclass
class AppState:
    config: RuntimeConfig
    tokens: StreamTokens
    validator: RequestValidator | None
    metrics: Metrics
    records: CallRecordSender
    admission: Admission[CallSession]
    agent_url: str = ""
    local_agent: OfflineAgent | None = None
    sockets: set[asyncio.Task[None]] = field(default_factory=set)  # every media socket's task, token or not
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while no call is in progress here
    stopping: bool = False  # set when the server starts closing sockets (see serving.py)
    token_store: RedisTokenStore | None = None  # REDIS_URL: stream tokens single-use across replicas
    refusals: LogLimiter = field(default_factory=LogLimiter)  # bounded log lines for what we refuse
    loop: asyncio.AbstractEventLoop | None = None
    agent_check: tuple[float, str | None] = (0.0, None)  # (checked at, problem or None)
    worker: WorkerContext | None = None  # serve --workers N: this worker's place
    live: LiveRegistry | None = None  # the live call API (OPERATOR_TOKEN): every call of the instance
    outbound: OutboundStore | None = None  # calls placed by POST /api/calls (OPERATOR_TOKEN)
    verdict_bell: VerdictBell = field(default_factory=VerdictBell)  # AMD verdicts, to this process's calls

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admission.draining = value

    async def agent_problem(self) -> str | None:
        """Can this pod reach the agent host? A TCP connect, cached: no session is opened."""
        checked_at, problem = self.agent_check
        if time.monotonic() - checked_at < AGENT_CHECK_TTL:
            return problem
        parts = urlsplit(self.agent_url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        problem = None
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), 2.0)
            writer.close()
            await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            problem = f"agent host {parts.hostname}:{port} unreachable: {type(exc).__name__}"
        self.agent_check = (time.monotonic(), problem)
        return problem

    def active_calls(self) -> int:
        """Calls in progress on this instance (token redeemed): every worker's, when there are several."""
        return self.admission.active()

    @property
    def calls(self) -> set[CallSession]:
        """This process's calls in progress (token redeemed): what a drain waits for."""
        return self.admission.calls

    def claim_place(self, session: CallSession, call_sid: str) -> bool:
        taken = self.admission.claim(session, call_sid)
        if taken:
            self.idle.clear()
        return taken

    def socket_closed(self, task: asyncio.Task[None], session: CallSession) -> None:
        self.sockets.discard(task)
        self.admission.socket_closed(session)
        if not self.admission.calls:
            self.idle.set()

    async def drain(self, limit_s: float) -> None:
        """Stop being ready, then wait (bounded) for the calls in progress to end, and for the
        streams of calls the webhook admitted just before to start (and end) too."""
        self.draining = True
        log.info("drain_started", active_calls=len(self.calls), timeout_s=limit_s)
        deadline = time.monotonic() + limit_s
        with contextlib.suppress(TimeoutError):
            while True:
                await asyncio.wait_for(self.idle.wait(), max(0.0, deadline - time.monotonic()))
                if not self.admission.waiting():
                    break
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= deadline:
                    break
        log.info("drain_finished", calls_left=len(self.calls))


def create_app(config: RuntimeConfig, worker: WorkerContext | None = None) -> FastAPI:
    """The app of the one process, or (``worker``) of one of ``serve --workers N``'s workers,
    which share single use of stream tokens, the call count and the local agent."""
    settings = config.settings
    metrics = Metrics()
    shared_file = machine_db.path_in(worker.multiproc_dir) if worker is not None else None  # see app.machine_db
    refusals = LogLimiter()
    state = AppState(
        config=config,
        tokens=StreamTokens(
            config.stream_token_secret,
            settings.stream_token_ttl_seconds,
            machine=MachineTokenStore(shared_file) if shared_file is not None else None,
        ),
        validator=RequestValidator(config.twilio_auth_token) if config.twilio_auth_token else None,
        metrics=metrics,
        records=CallRecordSender(
            settings.call_events_url,
            config.webhook_signing_secret,
            metrics,
            worker=worker.worker_id if worker is not None else None,
        ),
        agent_url=config.agent_url or "",
        token_store=RedisTokenStore(settings.redis_url) if settings.redis_url else None,
        worker=worker,
        refusals=refusals,
        admission=Admission(
            settings.max_calls,
            settings.max_tokenless_streams,
            InstanceLoad(shared_file, worker.worker_id, ADMISSION_HOLD_SECONDS)
            if worker is not None and shared_file is not None
            else None,
            refusals,
        ),
    )

    operator_token = config.operator_token
    if operator_token:
        state.live = LiveRegistry(
            bus_for(settings.redis_url, broker_path_from_env() if worker is not None else None), metrics
        )
        state.outbound = store_for(settings.redis_url, shared_file)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.idle.set()
        if state.live is not None:
            await state.live.start()
        for warning in config.warnings:
            log.warning("config_warning", detail=warning)
        state.admission.publish()
        metrics.max_calls.set(settings.max_calls)
        if config.use_local_agent and worker is not None and worker.local_agent_url:
            state.agent_url = worker.local_agent_url  # the supervisor's, one for all workers
        elif config.use_local_agent:
            state.local_agent = await start_offline_agent("127.0.0.1", settings.local_agent_port)
            state.agent_url = state.local_agent.url
            log.warning(
                "local_agent_mode",
                detail="no DEEPGRAM_API_KEY or AGENT_URL: calls go to the built-in local agent "
                "(echoes the caller; no speech recognition). Set REQUIRE_DEEPGRAM=1 to forbid this.",
                agent_url=state.agent_url,
            )
        log.info("service_started", agent_url=state.agent_url, public_url=settings.public_url)
        try:
            yield
        finally:
            state.stopping = True
            for task in list(state.sockets):
                task.cancel()
            await asyncio.gather(*state.sockets, return_exceptions=True)
            await aclose_clients()  # this worker's pooled operator-tool connections
            if state.live is not None:
                await state.live.close()
            if state.outbound is not None:
                await state.outbound.close()
            if call_updater is not None:
                call_updater.close()
            await state.records.close()
            if state.token_store is not None:
                await state.token_store.close()
            if state.local_agent is not None:
                await state.local_agent.stop()
            load = state.admission.load
            if load is not None:
                with contextlib.suppress(sqlite3.Error):
                    load.set_active(0)
                load.close()
            if state.tokens.machine is not None:
                state.tokens.machine.close()
            log.info("service_stopped")

    call_updater = (
        CallUpdater(settings.twilio_account_sid or "", config.twilio_auth_token or "", settings.twilio_api_base)
        if config.rest_available
        else None
    )

    profile_options = {name: config.call_options(name) for name in config.profiles}

    def outbound_options(record: OutboundRecord) -> CallOptions | None:
        if record.profile and record.profile not in config.profiles:
            log.warning("profile_unknown_at_stream", profile=record.profile[:40])
            return None
        return config.outbound_call_options(record.profile, record.variables, record.voicemail, record.amd)

    def options_for(profile: str) -> CallOptions | None:
        if not profile:
            return None  # the default profile: what the call was created with
        options = profile_options.get(profile)
        if options is None:  # the token vouches for the name: the profiles changed under the call
            log.warning("profile_unknown_at_stream", profile=profile[:40])
        return options

    app = FastAPI(title="callbridge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.bridge = state

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        problems = []
        if state.draining:
            problems.append("draining: finishing calls before shutdown")
        if not state.agent_url:
            problems.append("agent not configured yet")
        elif settings.readiness_check_agent and not config.use_local_agent:
            problem = await state.agent_problem()
            if problem:
                problems.append(problem)
        body: dict[str, object] = {
            "status": "ready" if not problems else "not ready",
            "active_calls": state.active_calls(),
        }
        if worker is not None:  # which worker answered, and its own share of the calls
            body["worker"] = worker.worker_id
            body["worker_active_calls"] = len(state.calls)
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    async def signed_form(request: Request) -> dict[str, str] | Response:
        """The posted parameters, or the error response when they are unusable or unsigned."""
        params = await webhook.read_form(request)
        if params is None:
            state.refusals.warn(log, "webhook_body_too_large", limit=webhook.MAX_WEBHOOK_BODY)
            metrics.webhooks.labels("bad_request").inc()
            return Response("request too large\n", status_code=413, media_type="text/plain")
        if state.validator is not None and settings.twilio_validate_signature:
            url = webhook.signed_url(request, settings.public_url)
            signature = request.headers.get("X-Twilio-Signature", "")
            if not webhook.signature_ok(state.validator, url, params, signature):
                state.refusals.warn(log, "webhook_signature_invalid", url=url, has_signature=bool(signature))
                metrics.webhooks.labels("bad_signature").inc()
                return Response("invalid signature\n", status_code=403, media_type="text/plain")
        else:
            state.refusals.warn(log, "webhook_signature_not_checked", detail="TWILIO_VALIDATE_SIGNATURE is off")
        return params

    @app.post(webhook.STATUS_PATH)
    async def twilio_status(request: Request) -> Response:
        params = await signed_form(request)
        if isinstance(params, Response):
            return params
        status = params.get("CallStatus", "")
        metrics.call_status(status)
        call_sid = params.get("CallSid", "")[:64]
        log.info("call_status", call_sid=call_sid, status=status, duration_s=params.get("CallDuration"))
        if status in FINAL_STATUSES and state.outbound is not None and SID_PATTERN.fullmatch(call_sid):
            await outbound_status(call_sid, status, params)
        return Response(status_code=204)

    async def outbound_status(call_sid: str, status: str, params: dict[str, str]) -> None:
        """A call we placed will not stream (again): its place is free, and if it never
        streamed, its record ends here with Twilio's status (no-answer, busy, ...)."""
        store = state.outbound
        assert store is not None
        try:
            record = await get_record(store, call_sid)
            streamed = record is not None and await was_streamed(store, call_sid)
        except StoreUnavailable as exc:
            log.error("outbound_record_unavailable", call_sid=call_sid, detail=str(exc)[:200])
            return
        if record is None:
            return  # not ours (an inbound call's status)
        state.admission.release(call_sid)
        if not streamed:  # never answered: its record ends here, as a call's would at its end
            ended = unanswered_record(record, status, params)
            log.info("call_ended", **{k: v for k, v in ended.items() if k != "type"})
            state.records.submit(ended)

    @app.post(webhook.AMD_PATH)
    async def twilio_amd(request: Request) -> Response:
        """Twilio's answering-machine verdict for a call we placed: kept where every process
        finds it (the call's pump reads it from there). 200 whatever the call, as Twilio wants."""
        params = await signed_form(request)
        if isinstance(params, Response):
            return params
        call_sid = params.get("CallSid", "")
        answered_by = params.get("AnsweredBy", "")
        answered_by = answered_by if answered_by in AMD_STATUSES else "unknown"
        duration = params.get("MachineDetectionDuration", "")
        amd_ms = int(duration) if duration.isdigit() and len(duration) < 9 else None
        log.info("amd_verdict", call_sid=call_sid[:64], answered_by=answered_by, amd_ms=amd_ms)
        if state.outbound is not None and SID_PATTERN.fullmatch(call_sid):
            try:
                await put_verdict(state.outbound, call_sid, answered_by, amd_ms)
                state.verdict_bell.ring(call_sid)
            except StoreUnavailable as exc:
                log.error("outbound_record_unavailable", call_sid=call_sid, detail=str(exc)[:200])
        return Response(status_code=200)

    @app.post(webhook.RECORDING_STATUS_PATH)
    async def twilio_recording_status(request: Request) -> Response:
        """Twilio's word on a recording the bridge started after the caller's consent."""
        params = await signed_form(request)
        if isinstance(params, Response):
            return params
        status = params.get("RecordingStatus", "")
        metrics.recording_status_callback(status)
        log.info(
            "recording_status",
            call_sid=params.get("CallSid", "")[:64],
            recording_sid=params.get("RecordingSid", "")[:64],
            status=status[:32],
            duration_s=params.get("RecordingDuration", "")[:16],
            channels=params.get("RecordingChannels", "")[:4],
        )
        return Response(status_code=204)

    @app.post(webhook.VOICE_PATH)
    async def twilio_voice(request: Request) -> Response:
        params = await signed_form(request)
        if isinstance(params, Response):
            return params
        call_sid = params.get("CallSid", "")
        if not SID_PATTERN.fullmatch(call_sid):
            state.refusals.warn(log, "webhook_without_call_sid")
            metrics.webhooks.labels("bad_request").inc()
            return Response("missing CallSid\n", status_code=400, media_type="text/plain")
        base = webhook.public_base_url(request, settings.public_url)
        key = request.query_params.get(webhook.OUTBOUND_QUERY)
        if key is not None:
            return await outbound_answered(key, call_sid, base, params)
        profile = config.profile_for_number(params.get("To", ""))
        refusal = state.admission.try_admit(call_sid)
        if refusal is not None:  # the caller hears the fallback, never a failed call
            state.refusals.warn(
                log, "call_not_admitted", call_sid=call_sid, reason=refusal, max_calls=settings.max_calls
            )
            metrics.webhooks.labels(refusal).inc()
            return Response(config.fallback_twiml(profile), media_type="application/xml")
        twiml = webhook.connect_twiml(
            webhook.stream_url(base),
            state.tokens.mint(call_sid, profile),
            params.get("From", ""),
            params.get("To", ""),
            profile,
            then=config.fallback(profile) if config.rest_available else None,  # should the stream die
        )
        log.info(
            "call_answered", call_sid=call_sid, direction=params.get("Direction", ""), profile=profile or "default"
        )
        metrics.webhooks.labels("answered").inc()
        return Response(twiml, media_type="application/xml")

    async def outbound_answered(key: str, call_sid: str, base: str, params: dict[str, str]) -> Response:
        """The callee of a call we placed picked up: its stream (its place in MAX_CALLS was
        taken when it was dialled). Twilio signed the URL, key included."""
        store = state.outbound
        record: OutboundRecord | None = None
        if store is not None:
            try:
                record = await get_record(store, key[:64])
                if record is not None and not record.call_sid:  # (before the API request heard back)
                    record.call_sid = call_sid
                    await put_record(store, record)
            except StoreUnavailable as exc:
                log.error("outbound_record_unavailable", call_sid=call_sid, detail=str(exc)[:200])
        if record is None or record.call_sid != call_sid:
            state.refusals.warn(log, "outbound_unknown", call_sid=call_sid)
            metrics.webhooks.labels("bad_request").inc()
            return Response(webhook.hangup_twiml(), media_type="application/xml")
        twiml = webhook.connect_twiml(
            webhook.stream_url(base),
            state.tokens.mint(call_sid, record.profile),
            record.from_,
            record.to,
            record.profile,
            then=None,  # a stream that dies ends the call we placed: nobody waits for a fallback
            outbound=True,
        )
        log.info("call_answered", call_sid=call_sid, direction="outbound", profile=record.profile or "default")
        metrics.webhooks.labels("answered").inc()
        return Response(twiml, media_type="application/xml")

    async def twilio_media(ws: WebSocket) -> None:
        """Every socket is accepted (a signature, when present, must be good) and waits for its
        ``start`` in the token-less pool (``app.stream_admission``); MAX_CALLS is checked when
        its stream token is redeemed, not before: a socket with no token holds no call's place."""
        signature = ws.headers.get("x-twilio-signature")
        if signature is not None and state.validator is not None and settings.twilio_validate_signature:
            url = webhook.stream_url(webhook.public_base_url(ws, settings.public_url))
            if not webhook.signature_ok(state.validator, url, {}, signature):
                state.refusals.warn(log, "media_stream_signature_invalid", url=url)
                metrics.streams_rejected.labels(RejectReason.BAD_SIGNATURE.value).inc()
                await ws.close(POLICY_VIOLATION)
                return
        await ws.accept()
        session: CallSession

        def claim_place(call_sid: str) -> bool:
            return state.claim_place(session, call_sid)

        def token_verified() -> None:
            state.admission.token_verified(session)

        deps = CallDeps(
            tokens=state.tokens,
            agent_url=state.agent_url,
            agent_api_key=config.deepgram_api_key,
            metrics=metrics,
            records=state.records,
            record_transcript=settings.call_events_transcript,
            options_for=options_for,
            call_updater=call_updater,
            tools_secret=config.webhook_signing_secret,
            refusals=state.refusals,
            token_store=state.token_store,
            token_verified=token_verified,
            claim_place=claim_place,
            shutting_down=lambda: state.stopping,
            live=state.live,
            worker_id=worker.worker_id if worker is not None else 1,
            outbound_store=state.outbound,
            outbound_options=outbound_options,
            verdict_bell=state.verdict_bell,
        )
        session = CallSession(ws, config.call_options(), deps)
        task = asyncio.current_task()
        assert task is not None
        try:
            state.sockets.add(task)
            evicted = state.admission.socket_opened(session)
            if evicted is not None:  # the oldest token-less socket makes room for this one
                evicted.evict()
            await session.run()
        finally:
            state.socket_closed(task, session)

    # Starlette's own route: FastAPI's would solve dependencies (none here) and keep three exit
    # stacks for the whole call, ~4 KiB a call
    app.router.routes.append(WebSocketRoute(webhook.MEDIA_PATH, twilio_media))
    tickets = (
        ListenTickets(operator_token, settings.listen_ticket_seconds, state.tokens, state.token_store)
        if operator_token
        else None
    )
    app.router.routes.extend(live_routes(state.live, operator_token, tickets, settings.public_url))
    dialer, public_url = call_updater, settings.public_url
    if dialer is None and config.offline_dialer is not None:  # offline: calls placed go to simulated callees
        base, account, public_url = config.offline_dialer
        dialer = CallUpdater(account, config.twilio_auth_token or "", base)
    app.router.routes.extend(
        outbound_routes(config, operator_token, state.admission, state.outbound, lambda: dialer, public_url)
    )
    return app


def unanswered_record(record: OutboundRecord, status: str, params: dict[str, str]) -> dict[str, object]:
    """The call record of a call we placed that never streamed (busy, no answer, failed...)."""
    return {
        "type": "call.ended",
        "call_sid": record.call_sid,
        "direction": "outbound",
        "from": record.from_,
        "to": record.to,
        "profile": record.profile or "default",
        "outcome": status,
        "status": status,
        "answered_by": None,
        "amd_ms": None,
        "voicemail_left": False,
        "duration_s": 0,
        "ring_s": int(params["CallDuration"]) if params.get("CallDuration", "").isdigit() else None,
    }
