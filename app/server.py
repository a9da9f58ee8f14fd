"""The FastAPI application: the Twilio webhook, the Media Streams socket, the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response, WebSocket
from twilio.request_validator import RequestValidator

from app.bridge import POLICY_VIOLATION, CallSession
from app.config import RuntimeConfig
from app.devtools.local_agent import LocalAgent
from app.observability.logging import get_logger
from app.twilio import webhook
from app.twilio.messages import SID_PATTERN
from app.twilio.stream_token import StreamTokens

log = get_logger(component="server")


@dataclass
class AppState:
    config: RuntimeConfig
    tokens: StreamTokens
    validator: RequestValidator | None
    agent_url: str = ""
    local_agent: LocalAgent | None = None
    calls: set[asyncio.Task[None]] = field(default_factory=set)


def create_app(config: RuntimeConfig) -> FastAPI:
    settings = config.settings
    state = AppState(
        config=config,
        tokens=StreamTokens(config.stream_token_secret, settings.stream_token_ttl_seconds),
        validator=RequestValidator(config.twilio_auth_token) if config.twilio_auth_token else None,
        agent_url=config.agent_url or "",
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
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
            for task in list(state.calls):
                task.cancel()
            await asyncio.gather(*state.calls, return_exceptions=True)
            if state.local_agent is not None:
                await state.local_agent.stop()
            log.info("service_stopped")

    app = FastAPI(title="callbridge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.bridge = state

    @app.post(webhook.VOICE_PATH)
    async def twilio_voice(request: Request) -> Response:
        form = await request.form()
        params = {key: str(value) for key, value in form.items()}
        if state.validator is not None and settings.twilio_validate_signature:
            url = webhook.signed_url(request, settings.public_url)
            signature = request.headers.get("X-Twilio-Signature", "")
            if not webhook.signature_ok(state.validator, url, params, signature):
                log.warning("webhook_signature_invalid", url=url, has_signature=bool(signature))
                return Response("invalid signature\n", status_code=403, media_type="text/plain")
        else:
            log.warning("webhook_signature_not_checked", detail="TWILIO_VALIDATE_SIGNATURE is off")
        call_sid = params.get("CallSid", "")
        if not SID_PATTERN.fullmatch(call_sid):
            log.warning("webhook_without_call_sid")
            return Response("missing CallSid\n", status_code=400, media_type="text/plain")
        base = webhook.public_base_url(request, settings.public_url)
        twiml = webhook.connect_twiml(
            webhook.stream_url(base),
            state.tokens.mint(call_sid),
            params.get("From", ""),
            params.get("To", ""),
        )
        log.info("call_answered", call_sid=call_sid, direction=params.get("Direction", ""))
        return Response(twiml, media_type="application/xml")

    @app.websocket(webhook.MEDIA_PATH)
    async def twilio_media(ws: WebSocket) -> None:
        signature = ws.headers.get("x-twilio-signature")
        if signature is not None and state.validator is not None and settings.twilio_validate_signature:
            url = webhook.stream_url(webhook.public_base_url(ws, settings.public_url))
            if not webhook.signature_ok(state.validator, url, {}, signature):
                log.warning("media_stream_signature_invalid", url=url)
                await ws.close(POLICY_VIOLATION)
                return
        await ws.accept()
        session = CallSession(
            ws,
            config.call_options(),
            state.tokens,
            state.agent_url,
            config.deepgram_api_key,
        )
        task = asyncio.current_task()
        assert task is not None
        state.calls.add(task)
        try:
            await session.run()
        finally:
            state.calls.discard(task)

    return app
