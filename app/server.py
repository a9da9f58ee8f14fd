"""The FastAPI application: the Twilio webhook, the Media Streams socket, the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twilio.request_validator import RequestValidator

from app.bridge import CallDeps, CallSession
from app.config import RuntimeConfig
from app.core.endings import POLICY_VIOLATION, close_code
from app.core.options import CallOptions
from app.core.vocabulary import RejectReason
from app.devtools.local_agent import LocalAgent
from app.observability.call_records import CallRecordSender
from app.observability.log_limit import LogLimiter
from app.observability.logging import get_logger
from app.observability.metrics import Metrics
from app.twilio import webhook
from app.twilio.messages import SID_PATTERN
from app.twilio.rest import CallUpdater
from app.twilio.stream_token import StreamTokens
from app.twilio.token_store import RedisTokenStore

log = get_logger(component="server")


AGENT_CHECK_TTL = 30.0
ADMISSION_HOLD_SECONDS = 10.0
"""How long a call admitted by the webhook holds its place while Twilio opens its stream
(normally well under a second)."""


@dataclass
class AppState:
    config: RuntimeConfig
    tokens: StreamTokens
    validator: RequestValidator | None
    metrics: Metrics
    records: CallRecordSender
    agent_url: str = ""
    local_agent: LocalAgent | None = None
    calls: set[asyncio.Task[None]] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while no call is in progress
    draining: bool = False
    stopping: bool = False  # set when the server starts closing sockets (see serving.py)
    admissions: dict[str, float] = field(default_factory=dict)  # CallSid -> admitted at, stream not started
    token_store: RedisTokenStore | None = None  # REDIS_URL: stream tokens single-use across replicas
    refusals: LogLimiter = field(default_factory=LogLimiter)  # bounded log lines for what we refuse
    loop: asyncio.AbstractEventLoop | None = None
    agent_check: tuple[float, str | None] = (0.0, None)  # (checked at, problem or None)

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

    def admission_problem(self, max_calls: int) -> str | None:
        """Why a new call cannot be taken here ("draining", "over_capacity"), or None. Calls
        admitted whose stream has not started yet count, so a burst cannot overshoot."""
        if self.draining:
            return "draining"
        now = time.monotonic()
        for call_sid, at in list(self.admissions.items()):
            if now - at > ADMISSION_HOLD_SECONDS:  # Twilio never opened that stream
                del self.admissions[call_sid]
        if len(self.calls) + len(self.admissions) >= max_calls:
            return "over_capacity"
        return None

    def admit(self, call_sid: str) -> None:
        self.admissions[call_sid] = time.monotonic()

    def stream_started(self, call_sid: str) -> None:
        self.admissions.pop(call_sid, None)

    async def drain(self, limit_s: float) -> None:
        """Stop being ready, then wait (bounded) for the calls in progress to end."""
        self.draining = True
        log.info("drain_started", active_calls=len(self.calls), timeout_s=limit_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), limit_s)
        log.info("drain_finished", calls_left=len(self.calls))


def create_app(config: RuntimeConfig) -> FastAPI:
    settings = config.settings
    metrics = Metrics()
    state = AppState(
        config=config,
        tokens=StreamTokens(config.stream_token_secret, settings.stream_token_ttl_seconds),
        validator=RequestValidator(config.twilio_auth_token) if config.twilio_auth_token else None,
        metrics=metrics,
        records=CallRecordSender(settings.call_events_url, config.webhook_signing_secret, metrics),
        agent_url=config.agent_url or "",
        token_store=RedisTokenStore(settings.redis_url) if settings.redis_url else None,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.idle.set()
        for warning in config.warnings:
            log.warning("config_warning", detail=warning)
        if config.use_local_agent:
            state.local_agent = LocalAgent()
            await state.local_agent.start("127.0.0.1", settings.local_agent_port)
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
            for task in list(state.calls):
                task.cancel()
            await asyncio.gather(*state.calls, return_exceptions=True)
            await state.records.close()
            if state.token_store is not None:
                await state.token_store.close()
            if state.local_agent is not None:
                await state.local_agent.stop()
            log.info("service_stopped")

    call_updater = (
        CallUpdater(settings.twilio_account_sid or "", config.twilio_auth_token or "", settings.twilio_api_base)
        if config.rest_available
        else None
    )

    profile_options = {name: config.call_options(name) for name in config.profiles}

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
        body: dict[str, object] = {"status": "ready" if not problems else "not ready", "active_calls": len(state.calls)}
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
        log.info(
            "call_status", call_sid=params.get("CallSid", ""), status=status, duration_s=params.get("CallDuration")
        )
        return Response(status_code=204)

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
        profile = config.profile_for_number(params.get("To", ""))
        refusal = state.admission_problem(settings.max_calls)
        if refusal is not None:  # the caller hears the fallback, never a failed call
            state.refusals.warn(
                log, "call_not_admitted", call_sid=call_sid, reason=refusal, max_calls=settings.max_calls
            )
            metrics.webhooks.labels(refusal).inc()
            return Response(config.fallback_twiml(profile), media_type="application/xml")
        state.admit(call_sid)
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

    @app.websocket(webhook.MEDIA_PATH)
    async def twilio_media(ws: WebSocket) -> None:
        if len(state.calls) >= settings.max_calls:  # more streams than calls admitted here
            state.refusals.warn(
                log, "media_stream_over_capacity", active_calls=len(state.calls), max_calls=settings.max_calls
            )
            metrics.streams_rejected.labels(RejectReason.OVER_CAPACITY.value).inc()
            await ws.close(close_code(RejectReason.OVER_CAPACITY))
            return
        signature = ws.headers.get("x-twilio-signature")
        if signature is not None and state.validator is not None and settings.twilio_validate_signature:
            url = webhook.stream_url(webhook.public_base_url(ws, settings.public_url))
            if not webhook.signature_ok(state.validator, url, {}, signature):
                state.refusals.warn(log, "media_stream_signature_invalid", url=url)
                metrics.streams_rejected.labels(RejectReason.BAD_SIGNATURE.value).inc()
                await ws.close(POLICY_VIOLATION)
                return
        await ws.accept()
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
            stream_started=state.stream_started,
            shutting_down=lambda: state.stopping,
        )
        session = CallSession(ws, config.call_options(), deps)
        task = asyncio.current_task()
        assert task is not None
        state.calls.add(task)
        state.idle.clear()
        try:
            await session.run()
        finally:
            state.calls.discard(task)
            if not state.calls:
                state.idle.set()

    return app
