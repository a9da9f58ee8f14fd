"""A bridge and a local agent on the loopback interface, the bridge run through ``heap_probe``.

The memory benchmarks (``callbridge memory``, ``callbridge soak-call``) start them the way the
load test starts its own (one ``serve`` process, one worker, the agent in another process, the
same environment), so their figures are about the same bridge the load test measures, and
the callers' and the agent's memory is not counted in it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.devtools.endpoints import LOOPBACK, agent_url, bridge_url, free_port, wait_for_port
from app.devtools.heap_probe import ProbeClient

SETTLE_S = 0.5  # after the port opens: the bridge's first log lines and lazy imports


@dataclass(frozen=True)
class ProbedBridge:
    url: str  # the bridge's base URL
    token: str  # its TWILIO_AUTH_TOKEN, to sign the webhooks with
    pid: int
    probe: ProbeClient
    log_path: Path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def probed_bridge(workdir: Path, frames: int, log_level: str = "info", floor: bool = False) -> Iterator[ProbedBridge]:
    """Start the agent and the probed bridge (``frames`` kept per traced allocation, 0: no
    tracemalloc; ``floor``: the load test's floor instead of the bridge) with their files in
    ``workdir``; stop both on the way out."""
    token = secrets.token_urlsafe(24)
    agent_port, port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPGRAM_", "TWILIO_", "AGENT_"))}
    agent_log = workdir / "agent.log"
    with agent_log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "app", "emulate-agent", "--port", str(agent_port), "--log-level", "warning"],
            env=base_env,
            stdout=out,
            stderr=out,
        )
    env = {
        **base_env,
        "AGENT_URL": agent_url(agent_port),
        "TWILIO_AUTH_TOKEN": token,
        "STREAM_TOKEN_SECRET": secrets.token_urlsafe(32),
        "PORT": str(port),
        "HOST": LOOPBACK,
        "LOG_LEVEL": log_level,
    }
    log_path = workdir / "bridge.log"
    command = [sys.executable, "-m", "app.devtools.heap_probe", "--dir", str(workdir), "--frames", str(frames)]
    if floor:
        command += ["--floor", agent_url(agent_port)]
    with log_path.open("wb") as out:
        bridge = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    try:
        wait_for_port(agent_port, agent)
        try:
            wait_for_port(port, bridge)
        except RuntimeError as exc:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
            raise RuntimeError(f"the bridge did not start: {exc}\n{tail}") from exc
        time.sleep(SETTLE_S)
        yield ProbedBridge(bridge_url(port), token, bridge.pid, ProbeClient(bridge.pid, workdir), log_path)
    finally:
        _stop(bridge)
        _stop(agent)
