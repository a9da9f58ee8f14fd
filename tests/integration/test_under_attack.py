"""Under attack, bounded: half-sent requests are closed after the header timeout, and a flood
of forged webhooks writes a bounded number of log lines while the metrics count every one."""

from __future__ import annotations

import http.client
import os
import selectors
import socket
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from app.devtools.endpoints import free_port, wait_for_port
from app.devtools.simulated_caller import SimulatedCaller
from app.observability.log_limit import LogLimiter
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, start_serve

pytestmark = pytest.mark.timeout(60)


def test_requests_whose_headers_never_finish_are_closed_after_the_header_timeout(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HTTP_HEADER_TIMEOUT_SECONDS": "1", "LOG_LEVEL": "warning"}
    proc, log_path = start_serve(tmp_path, env)
    sockets: list[socket.socket] = []
    try:
        wait_for_port(port, proc)
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GET /heal")  # never finished
            sockets.append(s)
        began = time.monotonic()
        selector = selectors.DefaultSelector()
        for s in sockets:
            selector.register(s, selectors.EVENT_READ)
        closed: set[socket.socket] = set()
        while len(closed) < len(sockets) and time.monotonic() - began < 5.0:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock.recv(1024) == b"":  # closed by the server
                    closed.add(sock)
                    selector.unregister(sock)
        took = time.monotonic() - began
        assert len(closed) == 100, f"{100 - len(closed)} half-sent requests still open after {took:.1f} s"
        assert took < 3.0
        # and a complete request on a fresh connection is served as usual
        with socket.create_connection(("127.0.0.1", port)) as ok:
            ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert ok.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        for s in sockets:
            s.close()
        proc.terminate()
        proc.wait(10)
    log = log_path.read_text()
    assert log.count('"http_headers_timed_out"') <= 10  # 100 timeouts, a bounded number of lines


def test_a_flood_of_forged_webhooks_logs_a_bounded_number_of_lines(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle]
) -> None:
    bridge = start_bridge(start_agent().url)
    form = urllib.parse.urlencode(SimulatedCaller(bridge.base_url, TWILIO_TOKEN).webhook_params())
    headers = {"X-Twilio-Signature": "Zm9yZ2Vk", "Content-Type": "application/x-www-form-urlencoded"}
    connection = http.client.HTTPConnection("127.0.0.1", int(bridge.base_url.rsplit(":", 1)[1]), timeout=10)
    began = time.monotonic()
    for _ in range(1000):  # one keep-alive connection, as fast as the bridge answers
        connection.request("POST", "/twilio/voice", body=form, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 403
    connection.close()
    intervals = int((time.monotonic() - began) // LogLimiter().interval) + 1
    lines = len(bridge.records("webhook_signature_invalid"))
    assert lines <= 10 * intervals < 1000  # 10 a window, not one per request
    assert bridge.records("webhook_signature_invalid")[0]["has_signature"] is True
    assert SimulatedCaller(bridge.base_url, TWILIO_TOKEN).post_webhook()[0] == 200  # real calls still answered
    with socket.create_connection(("127.0.0.1", int(bridge.base_url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = b""
        while chunk := s.recv(65536):
            text += chunk
    assert b'callbridge_webhook_requests_total{result="bad_signature"} 1000.0' in text
