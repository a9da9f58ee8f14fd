"""A call cut because this process stops is recorded as the bridge's doing (``bridge_shutdown``),
never as the caller hanging up: with no drain, and when a second signal cuts the drain short."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.endpoints import free_port, wait_for_port
from app.devtools.simulated_caller import SimulatedCaller
from tests.conftest import TWILIO_TOKEN, AgentHandle, start_serve, wait_until


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("drain", "signals"), [("0", 1), ("30", 2)], ids=["no_drain", "second_signal"])
def test_calls_cut_by_shutdown_are_recorded_as_bridge_shutdown(
    drain: str, signals: int, start_agent: Callable[..., AgentHandle], tmp_path: Path
) -> None:
    agent = start_agent()
    port = free_port()
    env = {
        **os.environ,  # already without the operator's variables (conftest); the cwd has no .env
        "AGENT_URL": agent.url,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "STREAM_TOKEN_SECRET": "shutdown-test-stream-secret-0123",
        "PORT": str(port),
        "DRAIN_TIMEOUT_SECONDS": drain,
    }
    proc, log_path = start_serve(tmp_path, env)
    outcome: dict[str, Any] = {}
    try:
        wait_for_port(port, proc)
        caller = SimulatedCaller(f"http://127.0.0.1:{port}", TWILIO_TOKEN, tail=0.5)
        pcm = synth.silence(8.0)  # longer than the test lets it run
        thread = threading.Thread(
            target=lambda: outcome.update(result=asyncio.run(caller.run(synth.encode(pcm, TWILIO_FORMAT))))
        )
        thread.start()
        assert wait_until(lambda: b"agent_ready" in log_path.read_bytes(), timeout=10)
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: b"drain_started" in log_path.read_bytes(), timeout=3)
        proc.wait(20)
        thread.join(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    ended = [r for r in records if r.get("event") == "call_ended"]
    assert len(ended) == 1, log_path.read_text()
    assert ended[0]["outcome"] == "bridge_shutdown" and ended[0]["ended_by"] == "bridge"
    assert ended[0]["end_reason"] == "bridge shutting down"
    assert outcome["result"].ended_by == "bridge"  # the simulated Twilio saw the bridge close it
