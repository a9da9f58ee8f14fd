"""The voice webhook's pieces: which URL Twilio signed, the signature check, its paths (the TwiML
it answers is built in ``app.twilio.twiml``)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import HTTPConnection, Request
from twilio.request_validator import RequestValidator

# the TwiML documents live in a module without I/O, which the core imports too
from app.twilio.twiml import (
    DEFAULT_FALLBACK_SAY,
    Fallback,
    connect_twiml,
    fallback_twiml,
    hangup_twiml,
    transfer_twiml,
)

MEDIA_PATH = "/twilio/media"
VOICE_PATH = "/twilio/voice"
STATUS_PATH = "/twilio/status"
AMD_PATH = "/twilio/amd"  # Twilio's asynchronous answering-machine verdicts for calls we placed
OUTBOUND_QUERY = "outbound"  # VOICE_PATH?outbound=<key>: the TwiML of a call we placed
RECORDING_STATUS_PATH = "/twilio/recording-status"
MAX_WEBHOOK_BODY = 64 * 1024  # Twilio's form posts are a few KB; read at most this (413 beyond)


async def read_form(request: Request) -> dict[str, str] | None:
    """The url-encoded body Twilio posts, read with a size cap; None when over the cap."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_WEBHOOK_BODY:
            return None
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def public_base_url(conn: HTTPConnection, configured: str | None) -> str:
    """The base URL Twilio used: PUBLIC_URL when set, else what the request says (which,
    behind a trusted proxy with proxy headers enabled, reflects X-Forwarded-Proto/Host)."""
    if configured:
        return configured
    scheme = conn.url.scheme
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return f"{scheme}://{conn.url.netloc}"


def signed_url(conn: HTTPConnection, configured: str | None) -> str:
    url = public_base_url(conn, configured) + conn.url.path
    return f"{url}?{conn.url.query}" if conn.url.query else url


def stream_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{MEDIA_PATH}"


def signature_ok(validator: RequestValidator, url: str, params: Mapping[str, str], signature: str) -> bool:
    if not signature:
        return False
    return bool(validator.validate(url, dict(params), signature))


__all__ = [
    "DEFAULT_FALLBACK_SAY",
    "Fallback",
    "connect_twiml",
    "fallback_twiml",
    "hangup_twiml",
    "public_base_url",
    "read_form",
    "signature_ok",
    "signed_url",
    "stream_url",
    "transfer_twiml",
]
