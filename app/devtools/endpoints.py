"""Where the test peers listen and what they call: one place for hosts, paths and ports.

The Twilio paths are the service's own (``app.twilio.webhook``); the agent path is Deepgram's.
The peers only ever listen on the loopback interface.
"""

from __future__ import annotations

import socket
import subprocess
import time

from app.twilio.webhook import MEDIA_PATH, STATUS_PATH, VOICE_PATH

__all__ = [
    "AGENT_PATH",
    "LOCAL_HOSTNAMES",
    "LOOPBACK",
    "MEDIA_PATH",
    "METRICS_PATH",
    "STATUS_PATH",
    "VOICE_PATH",
    "agent_url",
    "bridge_url",
    "free_port",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"
# Hosts that are this machine: never reached through an HTTP(S) proxy from the environment.
LOCAL_HOSTNAMES = frozenset({LOOPBACK, "localhost", "::1"})
AGENT_PATH = "/v1/agent/converse"  # the Voice Agent endpoint's path at agent.deepgram.com
METRICS_PATH = "/metrics"


def agent_url(port: int, host: str = LOOPBACK) -> str:
    return f"ws://{host}:{port}{AGENT_PATH}"


def bridge_url(port: int, host: str = LOOPBACK) -> str:
    return f"http://{host}:{port}"


def free_port() -> int:
    """A TCP port free on the loopback interface right now (another process may take it later)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Block until something accepts connections on the loopback ``port``; fail if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")
