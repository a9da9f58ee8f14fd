"""Health, readiness, metrics, call records and graceful drain, on real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app import signing
from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.endpoints import free_port
from app.devtools.simulated_caller import SimulatedCaller
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, get, metric_value, start_serve, wait_until

pytestmark = pytest.mark.timeout(60)
SIGNING_SECRET = "call-events-signing-secret-0123"


def talk(bridge_url: str, fast: bool = True) -> Any:
    pcm = synth.silence(0.2) + synth.speech_like("hello over there") + synth.silence(0.6)
    caller = SimulatedCaller(bridge_url, TWILIO_TOKEN, fast=fast, tail=1.0)
    return asyncio.run(caller.run(synth.encode(pcm, TWILIO_FORMAT)))


def test_health_readiness_and_metrics_after_a_call(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url)
    assert get(bridge.base_url + "/healthz") == (200, '{"status":"ok"}')
    status, body = get(bridge.base_url + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"

    result = talk(bridge.base_url)
    bridge.wait_for("call_ended")
    status, text = get(bridge.base_url + "/metrics")
    assert status == 200
    assert metric_value(text, "callbridge_calls_total", 'outcome="caller_hangup"') == 1
    assert metric_value(text, "callbridge_active_calls") == 0
    assert metric_value(text, "callbridge_webhook_requests_total", 'result="answered"') == 1
    caller_bytes = metric_value(text, "callbridge_audio_bytes_total", 'direction="caller_to_agent"')
    assert caller_bytes == len(result.sent)
    relayed = metric_value(text, "callbridge_audio_bytes_total", 'direction="agent_to_caller"')
    cleared = metric_value(
        text, "callbridge_audio_dropped_bytes_total", 'direction="agent_to_caller",reason="barge_in"'
    )
    assert relayed - cleared == len(result.received)  # all agent audio reached Twilio but what barge-in dropped
    assert metric_value(text, "callbridge_agent_connect_seconds_count") == 1
    assert metric_value(text, "callbridge_first_agent_audio_seconds_count") == 1
    assert metric_value(text, "callbridge_barge_in_clear_seconds_count") >= 1
    assert metric_value(text, "callbridge_agent_latency_seconds_count", 'kind="total"') >= 1
    # bounded cardinality: no per-call identifiers in any label
    assert result.call_sid not in text and "MZ" not in text


def test_rejections_are_counted(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    bridge = start_bridge(start_agent().url)
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    assert caller.post_webhook(signature="bad")[0] == 403
    _, text = get(bridge.base_url + "/metrics")
    assert metric_value(text, "callbridge_webhook_requests_total", 'result="bad_signature"') == 1


def test_readiness_reports_unreachable_agent(start_bridge: Callable[..., BridgeHandle]) -> None:
    dead_port = free_port()
    bridge = start_bridge(f"ws://127.0.0.1:{dead_port}/v1/agent/converse", readiness_check_agent=True)
    status, body = get(bridge.base_url + "/readyz")
    assert status == 503
    assert "unreachable" in json.loads(body)["problems"][0]
    assert get(bridge.base_url + "/healthz")[0] == 200  # alive, just not ready


class _Receiver(BaseHTTPRequestHandler):
    records: list[tuple[dict[str, str], bytes]] = []
    statuses: list[int] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).records.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status = type(self).statuses.pop(0) if type(self).statuses else 204
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"records": [], "statuses": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/call-events", handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("transcript", [False, True])
def test_call_record_is_posted_signed(
    transcript: bool,
    receiver: tuple[str, type[_Receiver]],
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
) -> None:
    url, handler = receiver
    handler.statuses.append(503)  # the first attempt fails: the record must be retried
    bridge = start_bridge(
        start_agent().url,
        call_events_url=url,
        webhook_signing_secret=SIGNING_SECRET,
        call_events_transcript=transcript,
    )
    result = talk(bridge.base_url)
    assert wait_until(lambda: len(handler.records) == 2, timeout=5)
    headers, body = handler.records[-1]
    assert signing.verify(
        SIGNING_SECRET.encode(), headers["x-callbridge-timestamp"], body, headers["x-callbridge-signature"]
    )
    assert not signing.verify(
        b"another-secret-0000", headers["x-callbridge-timestamp"], body, headers["x-callbridge-signature"]
    )
    record = json.loads(body)
    assert record["type"] == "call.ended"
    assert record["call_sid"] == result.call_sid
    assert record["outcome"] == "caller_hangup"
    assert record["from"] == "+15550000001" and record["to"] == "+15550000002"
    assert record["turns"] >= 1
    # lengths only (no words): what the caller heard of each utterance, always in the record
    assert record["utterances"] and all(0 <= u["heard_ms"] <= u["full_ms"] for u in record["utterances"])
    if transcript:
        assert {t["role"] for t in record["transcript"]} == {"assistant", "user"}
    else:
        assert "transcript" not in record
    # the sender counts a delivery once the receiver's answer is back, just after it was recorded
    delivered = 'result="delivered"'
    assert wait_until(
        lambda: metric_value(get(bridge.base_url + "/metrics")[1], "callbridge_call_records_total", delivered) == 1
    )


@pytest.mark.timeout(90)
def test_sigterm_drains_calls_in_progress_then_exits(start_agent: Callable[..., AgentHandle], tmp_path: Path) -> None:
    agent = start_agent()
    port = free_port()
    env = {
        **os.environ,  # without the operator's variables (conftest); and the cwd below has no .env
        "AGENT_URL": agent.url,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "STREAM_TOKEN_SECRET": "drain-test-stream-secret-0123",
        "PORT": str(port),
        "DRAIN_TIMEOUT_SECONDS": "30",
    }
    proc, log_path = start_serve(tmp_path, env)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _listening(port), timeout=20), log_path.read_text()
        # long enough that the call is still on when the test, however starved of CPU (CI runs
        # this inside another pytest, beside other workers), asks /readyz during the drain
        pcm = synth.silence(8.0) + synth.speech_like("still talking") + synth.silence(0.6)
        caller = SimulatedCaller(base, TWILIO_TOKEN, tail=0.5)
        outcome: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(result=asyncio.run(caller.run(synth.encode(pcm, TWILIO_FORMAT))))
        )
        thread.start()
        assert wait_until(lambda: b"stream_started" in log_path.read_bytes(), timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: get(base + "/readyz")[0] == 503, timeout=5)
        assert proc.poll() is None  # still serving the call
        thread.join(30)
        result = outcome["result"]
        assert result.ended_by == "caller" and result.close_code == 1000  # the call was not cut
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert '"drain_started"' in log and '"drain_finished"' in log and '"calls_left": 0' in log


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_status_callback_is_signed_and_counted(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    bridge = start_bridge(start_agent().url)
    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN)
    url = bridge.base_url + "/twilio/status"
    params = {"CallSid": caller.call_sid, "CallStatus": "completed", "CallDuration": "42"}
    signature = caller.validator.compute_signature(url, params)
    data = urllib.parse.urlencode(params).encode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=data, headers={"X-Twilio-Signature": signature}, method="POST")
    with opener.open(request, timeout=5) as response:
        assert response.status == 204
    forged = urllib.request.Request(url, data=data, headers={"X-Twilio-Signature": "bm9wZQ=="}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(forged, timeout=5)
    info.value.close()
    assert info.value.code == 403
    _, text = get(bridge.base_url + "/metrics")
    assert metric_value(text, "callbridge_call_status_total", 'status="completed"') == 1


def test_oversize_webhook_is_refused(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    bridge = start_bridge(start_agent().url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        bridge.base_url + "/twilio/voice", data=b"CallSid=" + b"A" * 100_000, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(request, timeout=5)
    info.value.close()
    assert info.value.code == 413
