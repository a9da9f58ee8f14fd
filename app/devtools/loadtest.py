"""``callbridge loadtest``: many concurrent simulated calls, and the numbers that matter.

By default it starts its own bridge (``callbridge serve``) and local agent
(``callbridge emulate-agent``) as separate processes on 127.0.0.1, so the bridge's CPU and
memory are measured alone, from /proc. Every caller talks, pauses and talks over the agent's
replies, so calls exercise relaying, marks and barge-in all the time.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.simulated_caller import CallResult, SimulatedCaller

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def caller_script(seconds: float) -> bytes:
    """Speech, a pause the agent answers into, speech again over the answer: barge-ins."""
    pcm = b""
    phrases = ["could you tell me about my order", "yes and the delivery date", "sorry one more thing"]
    i = 0
    while len(pcm) / 16000 < seconds:
        pcm += synth.silence(1.2) + synth.speech_like(phrases[i % len(phrases)])
        i += 1
    return synth.encode(pcm[: int(seconds * 16000) & ~1], TWILIO_FORMAT)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Report:
    calls: int
    seconds: float
    results: list[CallResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    bridge_cpu_s: float = float("nan")
    rss_idle_mib: float = float("nan")
    rss_peak_mib: float = float("nan")
    bridge_clear_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def caller_barge_ms(self) -> list[float]:
        """From the caller starting to speak (as the agent's detector sees it) to Twilio's clear."""
        out = []
        for result in self.results:
            starts = [e.t for e in result.timeline if e.who == "caller" and e.text == "starts speaking"]
            for cleared in result.clears:
                # pair each clear with the caller's speech onset just before it; a clear with no
                # onset in the second before it (detectors disagreeing) is not a barge-in sample
                before = [t for t in starts if 0 <= cleared - t < 1.0]
                if before:
                    out.append((cleared - before[-1]) * 1000)
        return out

    def render(self) -> str:
        ok = len(self.results)
        answer = [r.webhook_s * 1000 for r in self.results]
        connect = [r.connect_s * 1000 for r in self.results]
        first = [r.first_media_s * 1000 for r in self.results if r.first_media_s is not None]
        barge = self.caller_barge_ms()
        violations = sum(len(r.violations) for r in self.results)
        call_minutes = ok * self.seconds / 60

        def line(name: str, values: list[float]) -> str:
            return (
                f"  {name:<44} p50 {pct(values, 50):8.2f}  p95 {pct(values, 95):8.2f}  "
                f"p99 {pct(values, 99):8.2f}  max {max(values, default=float('nan')):8.2f}  (n={len(values)})"
            )

        rows = [
            f"callbridge loadtest: {self.calls} concurrent calls x {self.seconds:.0f} s "
            f"(wall {self.wall_s:.1f} s, {os.cpu_count()} cores)",
            f"  calls completed {ok}/{self.calls}, failed {len(self.failures)}, "
            f"Twilio protocol violations {violations}",
            "latency, ms:",
            line("webhook POST -> TwiML", answer),
            line("media WebSocket open", connect),
            line("stream start -> first agent audio (greeting)", first),
            line("caller speech detected -> clear at caller", barge),
            line("bridge: UserStartedSpeaking -> clear sent", self.bridge_clear_ms),
            "bridge process:",
            f"  CPU {self.bridge_cpu_s:.2f} s for {call_minutes:.1f} call-minutes = "
            f"{self.bridge_cpu_s / call_minutes if call_minutes else float('nan'):.3f} CPU-s per call-minute",
            f"  RSS idle {self.rss_idle_mib:.1f} MiB, peak {self.rss_peak_mib:.1f} MiB, "
            f"{(self.rss_peak_mib - self.rss_idle_mib) / max(1, self.calls):.2f} MiB per concurrent call",
        ]
        rows += [f"  failure: {f}" for f in self.failures[:10]]
        return "\n".join(rows)


async def _one_call(base_url: str, token: str, audio: bytes, delay: float) -> CallResult:
    await asyncio.sleep(delay)
    caller = SimulatedCaller(base_url, token, tail=1.0, max_tail=5.0)
    return await caller.run(audio)


async def _run_calls(report: Report, base_url: str, token: str, ramp: float, pid: int | None) -> None:
    audio = caller_script(report.seconds)
    peak = [report.rss_idle_mib]

    async def sample() -> None:
        while pid is not None:
            peak[0] = max(peak[0], rss_mib(pid))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    tasks = [_one_call(base_url, token, audio, ramp * i / max(1, report.calls)) for i in range(report.calls)]
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, CallResult):
            report.results.append(outcome)
        else:
            report.failures.append(f"{type(outcome).__name__}: {outcome}")
    sampler.cancel()
    report.rss_peak_mib = peak[0]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def run(calls: int, seconds: float, ramp: float, url: str | None, token: str | None) -> Report:
    report = Report(calls=calls, seconds=seconds)
    if url:  # an already running bridge: latency only
        began = time.monotonic()
        asyncio.run(_run_calls(report, url, token or os.environ.get("TWILIO_AUTH_TOKEN", ""), ramp, None))
        report.wall_s = time.monotonic() - began
        return report
    token = secrets.token_urlsafe(24)
    agent_port, bridge_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "bridge.log"
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPGRAM_", "TWILIO_", "AGENT_"))}
        agent = subprocess.Popen(
            [sys.executable, "-m", "app", "emulate-agent", "--port", str(agent_port), "--log-level", "warning"],
            env=base_env,
        )
        env = {
            **base_env,
            "AGENT_URL": f"ws://127.0.0.1:{agent_port}/v1/agent/converse",
            "TWILIO_AUTH_TOKEN": token,
            "STREAM_TOKEN_SECRET": secrets.token_urlsafe(32),
            "PORT": str(bridge_port),
            "HOST": "127.0.0.1",
            "LOG_LEVEL": "info",
        }
        with log_path.open("wb") as log_file:
            bridge = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, stdout=log_file, stderr=log_file)
        try:
            _wait_port(agent_port, agent)
            _wait_port(bridge_port, bridge)
            time.sleep(0.3)
            report.rss_idle_mib = rss_mib(bridge.pid)
            cpu_before = cpu_seconds(bridge.pid)
            began = time.monotonic()
            asyncio.run(_run_calls(report, f"http://127.0.0.1:{bridge_port}", token, ramp, bridge.pid))
            report.wall_s = time.monotonic() - began
            report.bridge_cpu_s = cpu_seconds(bridge.pid) - cpu_before
        finally:
            for proc in (bridge, agent):
                proc.terminate()
            for proc in (bridge, agent):
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        report.bridge_clear_ms = _clear_latencies(log_path)
    return report


def _clear_latencies(log_path: Path) -> list[float]:
    values = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"barge_in_clear_sent"' in line:
            record: dict[str, Any] = json.loads(line)
            values.append(float(record["latency_ms"]))
    return values
