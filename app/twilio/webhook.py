"""The voice webhook's pieces: which URL Twilio signed, the signature check, the TwiML."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import HTTPConnection, Request
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

from app.twilio.stream_token import PROFILE_PARAMETER, TOKEN_PARAMETER

MEDIA_PATH = "/twilio/media"
VOICE_PATH = "/twilio/voice"
STATUS_PATH = "/twilio/status"
AMD_PATH = "/twilio/amd"  # Twilio's asynchronous answering-machine verdicts for calls we placed
OUTBOUND_QUERY = "outbound"  # VOICE_PATH?outbound=<key>: the TwiML of a call we placed
DIRECTION_PARAMETER = "direction"  # "outbound" on the stream of a call we placed
DEFAULT_FALLBACK_SAY = "Sorry, our assistant is not available right now. Please try again later. Goodbye."
RECORDING_STATUS_PATH = "/twilio/recording-status"
MAX_PARAMETER_VALUE = 400  # Twilio limits a <Parameter> name+value to 500 characters
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


@dataclass(frozen=True)
class Fallback:
    """What a caller hears when the agent cannot take the call: ``say``, then a person at
    ``dial`` (an E.164 number or ``sip:`` URI) or the end of the call."""

    say: str = DEFAULT_FALLBACK_SAY
    dial: str | None = None

    def append_to(self, response: VoiceResponse) -> None:
        response.say(self.say)
        if self.dial is None:
            response.hangup()
        else:
            response.append(_dial(self.dial))


def connect_twiml(
    media_url: str,
    token: str,
    caller: str,
    callee: str,
    profile: str = "",
    then: Fallback | None = None,
    outbound: bool = False,
) -> str:
    """``<Connect><Stream>``, and ``then`` after it: Twilio runs what follows ``<Connect>`` when
    the stream ends without the call having been hung up or redirected, so a bridge that dies
    (or drops the stream) leaves the caller with the fallback instead of a dead line. Only with
    REST credentials: without them, closing the stream is how the bridge hangs up."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=media_url)
    stream.parameter(name=TOKEN_PARAMETER, value=token)
    if profile:
        stream.parameter(name=PROFILE_PARAMETER, value=profile)
    stream.parameter(name="from", value=caller[:MAX_PARAMETER_VALUE])
    stream.parameter(name="to", value=callee[:MAX_PARAMETER_VALUE])
    if outbound:
        stream.parameter(name=DIRECTION_PARAMETER, value="outbound")
    response.append(connect)
    if then is not None:
        then.append_to(response)
    return str(response)


def _dial(destination: str) -> Dial:
    """A ``<Dial>`` to an E.164 number, or to a ``sip:`` URI."""
    dial = Dial()
    if destination.startswith("sip:"):
        dial.sip(destination)
    else:
        dial.number(destination)
    return dial


def hangup_twiml() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)


def transfer_twiml(destination: str) -> str:
    """TwiML that dials ``destination``."""
    response = VoiceResponse()
    response.append(_dial(destination))
    return str(response)


def fallback_twiml(say: str = DEFAULT_FALLBACK_SAY, dial: str | None = None) -> str:
    """The fallback (``Fallback``) as a whole TwiML document."""
    response = VoiceResponse()
    Fallback(say, dial).append_to(response)
    return str(response)
