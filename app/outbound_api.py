"""``POST /api/calls``: the bridge places a call (``app.outbound`` has the why and how).

Everything that can be wrong with the request is found before anything is dialled: the token
(401, before the body is read), the body (400, in words, never FastAPI's 422), the service's
readiness to place calls (503: no Twilio credentials or no PUBLIC_URL for Twilio to reach),
capacity (429 with Retry-After: outbound calls take places in MAX_CALLS like the calls it
answers). Only then is Twilio asked to dial, with the answered call's TwiML behind
``PUBLIC_URL/twilio/voice?outbound=<key>`` (fetched, signed, when the callee picks up), a
signed status callback and asynchronous answering-machine detection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from app.config import RuntimeConfig
from app.live.api import bounded_body, json_object
from app.observability.logging import get_logger
from app.operator_auth import refusal
from app.outbound import (
    HOLD_MARGIN_SECONDS,
    RING_TIMEOUT_SECONDS,
    BadRequest,
    OutboundRecord,
    OutboundStore,
    StoreUnavailable,
    checked_variables,
    fill,
    missing_variables,
    put_record,
)
from app.stream_admission import Admission
from app.twilio import webhook
from app.twilio.rest import E164, CallNotPlaced, CallUpdater

log = get_logger(component="outbound_api")

MAX_CALL_BODY = 64 * 1024
"""Bytes of a ``POST /api/calls`` body (variables and a voicemail text fit many times over)."""
MAX_VOICEMAIL_CHARS = 2000
RETRY_AFTER_SECONDS = 10
"""At capacity: try again after this (calls last minutes; a ringing one may not be answered)."""


def parse_call(raw: bytes, config: RuntimeConfig) -> dict[str, Any]:
    """The request's fields, checked; ``BadRequest`` says what is wrong."""
    body = json_object(raw, MAX_CALL_BODY)
    to = body.get("to")
    if not isinstance(to, str) or not E164.fullmatch(to):
        raise BadRequest('"to" must be a phone number in E.164, e.g. +15551234567')
    sender = body.get("from", config.outbound_from)
    if not isinstance(sender, str) or not E164.fullmatch(sender):
        why = "set OUTBOUND_FROM or give" if sender is None else "give"
        raise BadRequest(f'no caller id: {why} "from", a Twilio number in E.164')
    profile = body.get("profile")
    if profile is None:
        profile = sender if sender in config.profiles else ""  # the from number's profile, else the default
    elif not isinstance(profile, str) or profile not in config.profiles:
        known = ", ".join(sorted(config.profiles)) or "(none: set AGENT_PROFILES_DIR)"
        raise BadRequest(f"unknown profile {str(profile)[:64]!r}; known: {known}")
    variables = checked_variables(body.get("variables"))
    voicemail = body.get("voicemail")
    if voicemail is None:
        voicemail = config.outbound_voicemail(profile)
    elif not isinstance(voicemail, str) or len(voicemail) > MAX_VOICEMAIL_CHARS:
        raise BadRequest(f'"voicemail" must be a text of at most {MAX_VOICEMAIL_CHARS} characters')
    amd = body.get("amd", True)
    if not isinstance(amd, bool):
        raise BadRequest('"amd" must be true or false')
    missing = missing_variables(config.profile_named(profile).agent_payload(), voicemail, variables)
    if missing:
        raise BadRequest(f"no value for {', '.join(missing)}", missing)
    return {"to": to, "from": sender, "profile": profile, "variables": variables, "voicemail": voicemail, "amd": amd}


def create_request(record: OutboundRecord, public_url: str, amd_timeout: float) -> dict[str, Any]:
    """``Calls.create``'s arguments (the twilio SDK's names)."""
    base = public_url.rstrip("/")
    request: dict[str, Any] = {
        "to": record.to,
        "from_": record.from_,
        "url": f"{base}{webhook.VOICE_PATH}?{webhook.OUTBOUND_QUERY}={record.key}",
        "method": "POST",
        "status_callback": f"{base}{webhook.STATUS_PATH}",
        "status_callback_event": ["initiated", "ringing", "answered", "completed"],
        "status_callback_method": "POST",
        "timeout": RING_TIMEOUT_SECONDS,
    }
    if record.amd:
        request.update(
            machine_detection="DetectMessageEnd",
            async_amd="true",
            async_amd_status_callback=f"{base}{webhook.AMD_PATH}",
            async_amd_status_callback_method="POST",
            machine_detection_timeout=int(amd_timeout),
        )
    return request


def outbound_routes(
    config: RuntimeConfig,
    token: str | None,
    admission: Admission[Any],
    store: OutboundStore | None,
    updater: Callable[[], CallUpdater | None],
    public_url: str | None,
) -> list[BaseRoute]:
    """``public_url``: where Twilio reaches this bridge (PUBLIC_URL; offline, the loopback address)."""
    settings = config.settings

    async def place(request: Request) -> Response:
        problem = refusal(request, token)  # before the body is read
        if problem is not None:
            return problem
        try:
            fields = parse_call(await bounded_body(request, MAX_CALL_BODY), config)
        except BadRequest as exc:
            body: dict[str, Any] = {"error": str(exc)}
            if exc.missing:
                body["missing"] = exc.missing
            return JSONResponse(body, status_code=400)
        rest = updater()
        if rest is None or not public_url or store is None:
            need = "Twilio REST credentials (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN)" if rest is None else "PUBLIC_URL"
            return JSONResponse({"error": f"cannot place calls without {need}"}, status_code=503)
        profile = fields["profile"]
        amd_timeout = config.profile_named(profile).bridge.outbound.amd_timeout_seconds
        record = OutboundRecord(
            key=OutboundRecord.new_key(),
            to=fields["to"],
            from_=fields["from"],
            profile=profile,
            variables=fields["variables"],
            voicemail=fill(fields["voicemail"], fields["variables"]),
            amd=fields["amd"],
            amd_timeout=amd_timeout,
        )
        hold = RING_TIMEOUT_SECONDS + (amd_timeout if record.amd else 0) + HOLD_MARGIN_SECONDS
        refused = admission.try_admit(record.key, hold=hold)
        if refused is not None:
            log.warning("outbound_refused", reason=refused, max_calls=settings.max_calls)
            return JSONResponse(
                {"error": f"not now: {refused.replace('_', ' ')}"},
                status_code=429,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            await put_record(store, record)
            call_sid = await rest.place_call(create_request(record, public_url, amd_timeout))
        except (StoreUnavailable, CallNotPlaced) as exc:
            admission.release(record.key)
            bad = isinstance(exc, CallNotPlaced) and exc.bad_request
            log.warning("outbound_not_placed", detail=str(exc)[:200])
            return JSONResponse({"error": f"Twilio did not place the call: {exc}"}, status_code=400 if bad else 502)
        admission.rekey(record.key, call_sid)
        record.call_sid = call_sid
        try:
            await put_record(store, record)  # now findable by its CallSid too
        except StoreUnavailable as exc:
            log.error("outbound_record_unavailable", call_sid=call_sid, detail=str(exc)[:200])
        log.info("outbound_placed", call_sid=call_sid, profile=profile or "default", amd=record.amd)
        return JSONResponse({"call_sid": call_sid, "status": "queued"}, status_code=201)

    return [Route("/api/calls", place, methods=["POST"])]
