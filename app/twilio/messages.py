"""Twilio Media Streams wire format: parse inbound frames, serialise outbound ones.

No pydantic here on purpose: this runs for every 20 ms frame. Inbound frames are untrusted,
so every field access is checked and any problem becomes a ``TwilioInvalid`` event.
Outbound frames are built by string formatting; the only interpolated values are the
stream SID (validated at ``start`` to be alphanumeric), base64 text and mark names we mint.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from app.core.events import (
    TwilioBadStart,
    TwilioConnected,
    TwilioDtmf,
    TwilioEvent,
    TwilioInvalid,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
)
from app.core.vocabulary import InvalidKind

MAX_TEXT_FRAME = 64 * 1024
"""Largest Twilio text frame parsed. A 20 ms media frame is ~250 characters and ``start``
with custom parameters a few KB; anything bigger is refused (``InvalidKind.OVERSIZE``) before
JSON parsing, so a hostile peer costs at most this much per frame. The server's WebSocket
limit (``serving.WS_MAX_SIZE``) closes the stream for frames beyond it."""
SID_PATTERN = re.compile(r"[A-Za-z0-9]{2,64}")


def parse(text: str) -> TwilioEvent:
    if len(text) > MAX_TEXT_FRAME:
        return TwilioInvalid(InvalidKind.OVERSIZE, f"{len(text)} characters")
    try:
        msg = json.loads(text)
    except ValueError:
        return TwilioInvalid(InvalidKind.BAD_JSON, text[:80])
    if not isinstance(msg, dict):
        return TwilioInvalid(InvalidKind.NOT_OBJECT, type(msg).__name__)
    event = msg.get("event")
    # media first: it is nearly every frame
    if event == "media":
        media = msg.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            return TwilioInvalid(InvalidKind.BAD_MEDIA, "media.payload missing")
        if isinstance(media, dict) and media.get("track", "inbound") != "inbound":
            return TwilioInvalid(InvalidKind.OTHER_TRACK, str(media.get("track"))[:32])
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return TwilioInvalid(InvalidKind.BAD_BASE64, payload[:40])
        return TwilioMedia(raw, _str(msg.get("streamSid")))
    if event == "mark":
        mark = msg.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            return TwilioInvalid(InvalidKind.BAD_MARK, "mark.name missing")
        return TwilioMark(name, _str(msg.get("streamSid")))
    if event == "connected":
        return TwilioConnected()
    if event == "start":
        return _parse_start(msg)
    if event == "dtmf":
        dtmf = msg.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or len(digit) != 1:
            return TwilioInvalid(InvalidKind.BAD_DTMF, "dtmf.digit missing")
        return TwilioDtmf(digit, _str(msg.get("streamSid")))
    if event == "stop":
        return TwilioStop(_str(msg.get("streamSid")))
    return TwilioInvalid(InvalidKind.UNKNOWN_EVENT, str(event)[:40])


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _parse_start(msg: dict[str, Any]) -> TwilioEvent:
    start = msg.get("start")
    if not isinstance(start, dict):
        return TwilioBadStart("start object missing")
    stream_sid = start.get("streamSid") or msg.get("streamSid")
    call_sid = start.get("callSid")
    if not isinstance(stream_sid, str) or not SID_PATTERN.fullmatch(stream_sid):
        return TwilioBadStart("streamSid missing or malformed")
    if not isinstance(call_sid, str) or not SID_PATTERN.fullmatch(call_sid):
        return TwilioBadStart("callSid missing or malformed")
    fmt = start.get("mediaFormat")
    if isinstance(fmt, dict):
        encoding = fmt.get("encoding", "audio/x-mulaw")
        rate = fmt.get("sampleRate", 8000)
        if encoding != "audio/x-mulaw" or rate not in (8000, "8000"):
            return TwilioBadStart(f"unsupported media format {encoding}/{rate}")
    params = start.get("customParameters")
    custom: dict[str, str] = {}
    if isinstance(params, dict):
        custom = {str(k): str(v) for k, v in params.items()}
    return TwilioStart(
        stream_sid=stream_sid,
        call_sid=call_sid,
        account_sid=_str(start.get("accountSid")),
        custom_parameters=custom,
    )


def media(stream_sid: str, audio: bytes) -> str:
    payload = base64.b64encode(audio).decode("ascii")
    return '{"event":"media","streamSid":"' + stream_sid + '","media":{"payload":"' + payload + '"}}'


def mark(stream_sid: str, name: str) -> str:
    return '{"event":"mark","streamSid":"' + stream_sid + '","mark":{"name":"' + name + '"}}'


def clear(stream_sid: str) -> str:
    return '{"event":"clear","streamSid":"' + stream_sid + '"}'
