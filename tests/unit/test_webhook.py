"""Which URL gets signed, signature checks with twilio's own validator, and the TwiML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from starlette.requests import Request
from twilio.request_validator import RequestValidator

from app.twilio import webhook

TOKEN = "twilio-token-for-tests-123456"


def request(
    path: str = "/twilio/voice", scheme: str = "http", host: str = "10.0.0.5:8080", query: bytes = b""
) -> Request:
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": path,
            "query_string": query,
            "scheme": scheme,
            "headers": [(b"host", host.encode())],
            "server": ("10.0.0.5", 8080),
        }
    )


def test_public_url_wins_over_what_the_app_sees() -> None:
    req = request(query=b"profile=sales")
    assert (
        webhook.signed_url(req, "https://bridge.example.com") == "https://bridge.example.com/twilio/voice?profile=sales"
    )
    assert webhook.signed_url(req, None) == "http://10.0.0.5:8080/twilio/voice?profile=sales"
    assert webhook.stream_url("https://bridge.example.com") == "wss://bridge.example.com/twilio/media"
    assert webhook.stream_url("https://bridge.example.com/prefix") == "wss://bridge.example.com/prefix/twilio/media"
    assert webhook.stream_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/twilio/media"


def test_signature_checked_with_twilio_validator() -> None:
    validator = RequestValidator(TOKEN)
    url = "https://bridge.example.com/twilio/voice"
    params = {"CallSid": "CA1", "From": "+15551234567", "To": "+15557654321"}
    good = validator.compute_signature(url, params)
    assert webhook.signature_ok(validator, url, params, good)
    assert not webhook.signature_ok(validator, url, {**params, "To": "+1"}, good)
    assert not webhook.signature_ok(validator, url + "x", params, good)
    assert not webhook.signature_ok(validator, url, params, "")
    assert not webhook.signature_ok(RequestValidator("other-token-000000"), url, params, good)


def test_twiml_connects_stream_with_parameters() -> None:
    xml = webhook.connect_twiml("wss://b.example.com/twilio/media", "tok.en.sig", "+15551234567", "+1555" + "9" * 600)
    root = ET.fromstring(xml)
    assert root.tag == "Response"
    connect = root.find("Connect")
    assert connect is not None and len(root) == 1
    stream = connect.find("Stream")
    assert stream is not None and stream.get("url") == "wss://b.example.com/twilio/media"
    assert "?" not in stream.get("url", "")  # Twilio refuses query strings (31920)
    params = {p.get("name"): p.get("value", "") for p in stream.findall("Parameter")}
    assert params["stream_token"] == "tok.en.sig"
    assert params["from"] == "+15551234567"
    assert len("to") + len(params["to"]) < 500  # Twilio's limit on a Parameter


def test_the_fallback_follows_the_stream_so_a_dropped_stream_is_never_a_dead_line() -> None:
    then = webhook.Fallback("Sorry, one moment.", "+15551230002")
    root = ET.fromstring(webhook.connect_twiml("wss://b.example.com/twilio/media", "t", "+1", "+2", then=then))
    assert [child.tag for child in root] == ["Connect", "Say", "Dial"]  # Twilio runs these when the stream ends
    assert root[1].text == "Sorry, one moment." and root[2][0].text == "+15551230002"
    bare = ET.fromstring(webhook.connect_twiml("wss://b.example.com/twilio/media", "t", "+1", "+2"))
    assert [child.tag for child in bare] == ["Connect"]  # without REST credentials: closing the stream hangs up
