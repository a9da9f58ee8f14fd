"""A bridge and a local agent on the loopback interface, the bridge run through ``heap_probe``.

The memory benchmarks (``callbridge memory``, ``callbridge soak-call``) start them the way the
load test starts its own (one ``serve`` process, one worker, the agent in another process, the
same environment), so their figures are about the same bridge the load test measures, and
the callers' and the agent's memory is not counted in it.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.devtools.endpoints import agent_url, bridge_url, free_port, wait_for_port
from app.devtools.heap_probe import ProbeClient
from app.devtools.loadtest import peer_env, server_env, stop_all, wait_started

SETTLE_S = 0.5  # after the port opens: the bridge's first log lines and lazy imports


@dataclass(frozen=True)
class ProbedBridge:
    url: str  # the bridge's base URL
    token: str  # its TWILIO_AUTH_TOKEN, to sign the webhooks with
    pid: int
    probe: ProbeClient
    log_path: Path


@contextlib.contextmanager
def probed_bridge(workdir: Path, frames: int, log_level: str = "info", floor: bool = False) -> Iterator[ProbedBridge]:
    """Start the agent and the probed bridge (``frames`` kept per traced allocation, 0: no
    tracemalloc; ``floor``: the load test's floor instead of the bridge) with their files in
    ``workdir``; stop both on the way out."""
    token = secrets.token_urlsafe(24)
    agent_port, port = free_port(), free_port()
    base_env = peer_env()
    agent_log = workdir / "agent.log"
    with agent_log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "app", "emulate-agent", "--port", str(agent_port), "--log-level", "warning"],
            env=base_env,
            stdout=out,
            stderr=out,
        )
    env = server_env(base_env, agent_port, port, token, log_level)
    log_path = workdir / "bridge.log"
    command = [sys.executable, "-m", "app.devtools.heap_probe", "--dir", str(workdir), "--frames", str(frames)]
    if floor:
        command += ["--floor", agent_url(agent_port)]
    with log_path.open("wb") as out:
        bridge = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    try:
        wait_for_port(agent_port, agent)
        wait_started("bridge", port, bridge, log_path)
        time.sleep(SETTLE_S)
        yield ProbedBridge(bridge_url(port), token, bridge.pid, ProbeClient(bridge.pid, workdir), log_path)
    finally:
        stop_all(bridge, agent)
