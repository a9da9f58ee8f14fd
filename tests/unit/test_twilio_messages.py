"""Parsing untrusted Twilio frames and building the three outbound messages."""

from __future__ import annotations

import base64
import json

import pytest

from app.core.events import (
    TwilioBadStart,
    TwilioConnected,
    TwilioDtmf,
    TwilioInvalid,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
)
from app.twilio import messages as tm

SID = "MZ" + "1" * 32


def test_documented_inbound_messages_parse() -> None:
    assert tm.parse('{"event":"connected","protocol":"Call","version":"1.0.0"}') == TwilioConnected()
    start = tm.parse(
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": SID,
                "start": {
                    "accountSid": "AC1",
                    "streamSid": SID,
                    "callSid": "CA" + "2" * 32,
                    "tracks": ["inbound"],
                    "customParameters": {"stream_token": "t"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
    )
    assert start == TwilioStart(SID, "CA" + "2" * 32, "AC1", {"stream_token": "t"})
    media = tm.parse(
        json.dumps(
            {
                "event": "media",
                "sequenceNumber": "3",
                "streamSid": SID,
                "media": {"track": "inbound", "chunk": "2", "timestamp": "20", "payload": "AAEC"},
            }
        )
    )
    assert media == TwilioMedia(b"\x00\x01\x02", SID)
    assert tm.parse(json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": "m1"}})) == TwilioMark("m1", SID)
    assert tm.parse(
        json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"track": "inbound_track", "digit": "7"}})
    ) == TwilioDtmf("7", SID)
    assert tm.parse(json.dumps({"event": "stop", "streamSid": SID, "stop": {}})) == TwilioStop(SID)


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        ("{", "bad_json"),
        ("[1]", "not_object"),
        ('{"event":"dance"}', "unknown_event"),
        ('{"event":"media","media":{}}', "bad_media"),
        ('{"event":"media","media":{"payload":"@@@"}}', "bad_base64"),
        ('{"event":"media","media":{"payload":"AAAA","track":"outbound"}}', "other_track"),
        ('{"event":"mark","mark":"x"}', "bad_mark"),
        ('{"event":"dtmf","dtmf":{"digit":"12"}}', "bad_dtmf"),
        ('{"event":"start","start":{"streamSid":"MZ1","callSid":"CA\\"x"}}', "bad_start"),
        ('{"event":"start"}', "bad_start"),
        (
            '{"event":"start","start":{"streamSid":"MZ11","callSid":"CA11","mediaFormat":{"encoding":"audio/l16","sampleRate":16000}}}',
            "bad_start",
        ),
        ("x" * 70000, "oversize"),
    ],
)
def test_bad_frames_become_invalid_events(frame: str, kind: str) -> None:
    event = tm.parse(frame)
    if kind == "bad_start":  # its own event: the call decides to refuse the stream
        assert isinstance(event, TwilioBadStart) and event.detail
    else:
        assert isinstance(event, TwilioInvalid) and event.kind == kind


def test_outbound_messages_are_exactly_the_documented_shapes() -> None:
    assert json.loads(tm.media(SID, b"\x00\xff")) == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": base64.b64encode(b"\x00\xff").decode()},
    }
    assert json.loads(tm.mark(SID, "agent-audio-1")) == {
        "event": "mark",
        "streamSid": SID,
        "mark": {"name": "agent-audio-1"},
    }
    assert json.loads(tm.clear(SID)) == {"event": "clear", "streamSid": SID}
