"""``callbridge loadtest``: many concurrent simulated calls, and the numbers that matter.

By default it starts its own bridge (``callbridge serve``) and local agent (the one of
``callbridge emulate-agent``, with its defaults) as separate processes on the loopback
interface, so the bridge's CPU and memory are measured alone, from /proc. With ``--url`` it calls a bridge that
is already running and reports no CPU or memory. Every caller talks, pauses and talks over the
agent's replies, so calls exercise relaying, marks and barge-in all the time.

The figures come from three places only: what the simulated callers measure themselves (raw
samples, exact percentiles), what the local agent saw (it runs here as ``python -m
app.devtools.loadtest agent``: the local agent, recording stamps), and the bridge's
``/metrics``, scraped before and after the run (the change is what the run did; histograms only
give the bucket a quantile falls in).

Stamps: every 20 ms caller frame starts with a stamp (call, frame number) and every agent audio
message with one (session, chunk number): a magic prefix and nibbles coded as the quietest
mu-law samples, so the speech detectors do not notice them. Both ends note when each stamp
left and arrived on the one monotonic clock of this machine, which gives the latency of each
frame both ways and every frame lost, duplicated or reordered.

``--floor`` first runs the same load through the floor, ``app.devtools.minimal_relay`` (a relay
that does nothing else), then through the bridge, and prints each figure as a ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import enum
import json
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection

from app.codecs import TWILIO_FORMAT, TWILIO_FRAME_BYTES, TWILIO_SAMPLE_RATE
from app.config import OFFLINE_TWILIO_AUTH_TOKEN, ConfigError, load_settings
from app.devtools import synth
from app.devtools.endpoints import LOCAL_HOSTNAMES, LOOPBACK, METRICS_PATH, agent_url, bridge_url, wait_for_port
from app.devtools.endpoints import free_port as free_port  # re-exported: tests import it from here
from app.devtools.local_agent import LocalAgent
from app.devtools.simulated_caller import CallResult, SimulatedCaller

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BARGE_IN_WINDOW_S = 1.0  # a clear pairs with the caller's speech onset at most this long before it
AGENT_RECORDS_WAIT_S = 5.0
"""How long after the calls the load test waits for the agent to write every session's record
(it writes one when the session's socket closes: within a second of the call's end)."""
WORKERS_START_S = 2.0  # extra settling time for a server started with --workers N > 1


class Side(enum.Enum):
    """What the load test measured: the bridge, or the floor it is compared with."""

    BRIDGE = "bridge"
    FLOOR = "floor"


# --- the bridge's /metrics ------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]


@dataclass
class MetricsSnapshot:
    """Every sample of one scrape, by (sample name, sorted labels)."""

    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        snapshot = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                snapshot.samples[key] = float(sample.value)
        return snapshot

    def plus(self, other: MetricsSnapshot) -> MetricsSnapshot:
        """Two runs' changes together (``--rounds``)."""
        keys = self.samples.keys() | other.samples.keys()
        return MetricsSnapshot({k: self.samples.get(k, 0.0) + other.samples.get(k, 0.0) for k in keys})

    def minus(self, before: MetricsSnapshot) -> MetricsSnapshot:
        """What changed since ``before`` (counters and histograms only ever grow)."""
        return MetricsSnapshot({k: v - before.samples.get(k, 0.0) for k, v in self.samples.items()})

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by_label(self, name: str, *labels: str) -> dict[str, float]:
        """``name``'s samples that moved, keyed by the values of ``labels`` (joined by "/")."""
        out: dict[str, float] = {}
        for (sample, sample_labels), value in self.samples.items():
            if sample == name and value:
                found = dict(sample_labels)
                out["/".join(found.get(label, "") for label in labels)] = value
        return out

    def histogram(self, name: str, **labels: str) -> BucketedHistogram:
        buckets = []
        for (sample, sample_labels), value in self.samples.items():
            found = dict(sample_labels)
            bound = found.pop("le", None)
            if sample == f"{name}_bucket" and bound is not None and found == labels:
                buckets.append((float(bound), value))
        return BucketedHistogram(
            sorted(buckets), self.value(f"{name}_count", **labels), self.value(f"{name}_sum", **labels)
        )


@dataclass
class BucketedHistogram:
    buckets: list[tuple[float, float]]  # (upper bound in seconds, cumulative count), ascending, +Inf last
    count: float
    total: float

    def bound(self, q: float) -> float:
        """The upper bound of the bucket holding quantile ``q`` (0..1); inf when past the last bound."""
        rank = q * self.count
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                return upper
        return math.inf

    def describe(self) -> str:
        if not self.count:
            return "no samples"
        quantiles = []
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            upper = self.bound(q)
            if math.isinf(upper):
                finite = [b for b, _ in self.buckets if not math.isinf(b)]
                quantiles.append(f"{name} > {_ms(finite[-1]) if finite else '?'}")
            else:
                quantiles.append(f"{name} <= {_ms(upper)}")
        return f"mean {_ms(self.total / self.count)}, {', '.join(quantiles)} (bucket bounds; n={self.count:.0f})"


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.0f} ms"


def _opener(url: str) -> urllib.request.OpenerDirector:
    if urlsplit(url).hostname in LOCAL_HOSTNAMES:  # never through a proxy from the environment
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def scrape(base_url: str) -> MetricsSnapshot:
    url = base_url.rstrip("/") + METRICS_PATH
    with _opener(url).open(url, timeout=5) as response:
        return MetricsSnapshot.parse(response.read().decode())


def scrape_settled(base_url: str, before: MetricsSnapshot, calls: int, timeout: float = 5.0) -> MetricsSnapshot:
    """Scrape once the bridge has counted the run's calls as ended (it does so just after the
    callers hang up) and flushed its per-call counters (twice a second), or at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(base_url)
        ended = after.value("callbridge_calls_total") != before.value("callbridge_calls_total")
        settled = sum(after.minus(before).by_label("callbridge_calls_total", "outcome").values()) >= calls
        idle = after.value("callbridge_active_calls") <= before.value("callbridge_active_calls")
        if (settled or (ended and idle)) or time.monotonic() >= deadline:
            time.sleep(0.6)  # one more flush of the frame and byte counters
            return scrape(base_url)
        time.sleep(0.1)


# --- stamps ---------------------------------------------------------------------------------

CALLER_MAGIC = b"\x7e\xf3\x7d\xf6"  # starts every caller frame's stamp
AGENT_MAGIC = b"\x7b\xf5\x7a\xf2"  # starts the stamp of every agent audio message
STAMP_NIBBLES = 12  # 16 bits of call (or session) number, 32 bits of frame (or chunk) number
STAMP_LEN = len(CALLER_MAGIC) + STAMP_NIBBLES + 1  # magic, nibbles, check nibble: 17 bytes
QUIET = 0xF0
"""mu-law bytes 0xF0-0xFF are the quietest positive samples (at most 120 of 32767): a stamp
adds an RMS of about 40 to a 20 ms frame, a tenth of the speech detectors' threshold."""


def stamp(magic: bytes, stream: int, index: int) -> bytes:
    """``magic``, then ``stream`` (16 bits) and ``index`` (32 bits) as quiet nibbles, and a check."""
    value = (stream & 0xFFFF) << 32 | (index & 0xFFFFFFFF)
    nibbles = [(value >> (4 * k)) & 0xF for k in range(STAMP_NIBBLES)]
    check = sum((k + 1) * n for k, n in enumerate(nibbles)) & 0xF
    return magic + bytes(QUIET | n for n in nibbles) + bytes((QUIET | check,))


def read_stamps(magic: bytes, data: bytes) -> list[tuple[int, int]]:
    """Every well-formed stamp in ``data``, as (stream, index), in order."""
    found = []
    pos = data.find(magic)
    while 0 <= pos <= len(data) - STAMP_LEN:
        body = data[pos + len(magic) : pos + STAMP_LEN]
        nibbles = [b & 0xF for b in body[:STAMP_NIBBLES]]
        check = sum((k + 1) * n for k, n in enumerate(nibbles)) & 0xF
        if all(b & 0xF0 == QUIET for b in body) and body[-1] & 0xF == check:
            value = sum(n << (4 * k) for k, n in enumerate(nibbles))
            found.append((value >> 32, value & 0xFFFFFFFF))
            pos = data.find(magic, pos + STAMP_LEN)
        else:
            pos = data.find(magic, pos + 1)
    return found


class StampReader:
    """Stamps in a stream of messages, including one split across two of them."""

    def __init__(self, magic: bytes) -> None:
        self.magic = magic
        self.tail = b""

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        joined = self.tail + data
        self.tail = joined[-(STAMP_LEN - 1) :]  # too short to hold a stamp already read
        return read_stamps(self.magic, joined)

    def reset(self) -> None:
        self.tail = b""


def stamp_count(audio_bytes: int) -> int:
    """How many frames of that much caller audio carry a stamp (not a last one too short)."""
    return len(range(0, audio_bytes - STAMP_LEN + 1, TWILIO_FRAME_BYTES))


def stamped_audio(audio: bytes, call: int) -> bytes:
    """``audio`` with each 20 ms frame's first bytes replaced by its stamp (call, frame number)."""
    out = bytearray(audio)
    for frame, start in enumerate(range(0, len(audio) - STAMP_LEN + 1, TWILIO_FRAME_BYTES)):
        out[start : start + STAMP_LEN] = stamp(CALLER_MAGIC, call, frame)
    return bytes(out)


# --- the agent, recording stamps ------------------------------------------------------------


class _StampingSocket:
    """The local agent's socket to one client: notes when each caller frame's stamp arrives
    and stamps each audio message it sends. Everything else goes straight to the socket."""

    def __init__(self, ws: ServerConnection, session: int) -> None:
        self.ws = ws
        self.session = session
        self.reader = StampReader(CALLER_MAGIC)
        self.heard: list[tuple[int, int, float]] = []  # (call, frame, arrival)
        self.said: list[float] = []  # when each stamped chunk was sent, by chunk number
        self.ready_at: float | None = None  # when SettingsApplied was sent

    async def recv(self, decode: bool | None = None) -> str | bytes:
        message = await self.ws.recv(decode)
        if isinstance(message, bytes):
            now = time.monotonic()
            self.heard += [(call, frame, now) for call, frame in self.reader.feed(message)]
        return message

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, bytes) and len(message) >= STAMP_LEN:
            message = stamp(AGENT_MAGIC, self.session, len(self.said)) + message[STAMP_LEN:]
            self.said.append(time.monotonic())
        await self.ws.send(message)
        if isinstance(message, str) and self.ready_at is None and '"SettingsApplied"' in message:
            self.ready_at = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ws, name)


class StampingAgent(LocalAgent):
    """The local agent (``emulate-agent``'s defaults), writing one JSON line per session to
    ``record`` when the session ends: the caller frames it heard and when it sent each chunk."""

    def __init__(self, record: Path) -> None:
        super().__init__()
        self.record = record
        self.opened = 0

    async def _handle(self, ws: ServerConnection) -> None:
        self.opened += 1
        socket = _StampingSocket(ws, self.opened)
        try:
            await super()._handle(cast(ServerConnection, socket))
        finally:
            line = json.dumps(
                {"session": socket.session, "ready": socket.ready_at, "heard": socket.heard, "said": socket.said}
            )
            with self.record.open("a") as out:
                out.write(line + "\n")


def agent_main(argv: list[str]) -> int:
    """``python -m app.devtools.loadtest agent --port P --record FILE``: the load test's agent."""
    from app.observability import logging as logs

    parser = argparse.ArgumentParser(prog="python -m app.devtools.loadtest agent")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args(argv)
    logs.configure("warning")

    async def main() -> None:
        agent = StampingAgent(args.record)
        await agent.start(LOOPBACK, args.port)
        try:
            await asyncio.Event().wait()
        finally:
            await agent.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def read_agent_records(path: Path, sessions: int, timeout: float = AGENT_RECORDS_WAIT_S) -> list[dict[str, Any]]:
    """The agent's session records, once there are ``sessions`` of them or at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        complete = [json.loads(line) for line in lines if line.endswith("}")]
        if len(complete) >= sessions or time.monotonic() >= deadline:
            return complete
        time.sleep(0.1)


# --- the callers ----------------------------------------------------------------------------


def caller_script(seconds: float) -> bytes:
    """Speech, a pause the agent answers into, speech again over the answer: barge-ins."""
    pcm = b""
    phrases = ["could you tell me about my order", "yes and the delivery date", "sorry one more thing"]
    i = 0
    while len(pcm) / (2 * synth.SAMPLE_RATE) < seconds:
        pcm += synth.silence(1.2) + synth.speech_like(phrases[i % len(phrases)])
        i += 1
    return synth.encode(pcm[: int(seconds * synth.SAMPLE_RATE) * 2], TWILIO_FORMAT)


class CallerProbe:
    """The simulated caller's media socket: when each ``media`` event left (the n-th is frame n)
    and when each message arrived. Everything else goes straight to the socket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.media_sent: list[float] = []
        self.received: list[tuple[float, str | bytes]] = []

    async def send(self, message: str | bytes) -> None:
        sent_at = time.monotonic()
        await self.ws.send(message)
        if isinstance(message, str) and message.startswith('{"event": "media"'):
            self.media_sent.append(sent_at)

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str | bytes]:
        async for message in self.ws:
            self.received.append((time.monotonic(), message))
            yield message

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ws, name)


class ProbedCaller(SimulatedCaller):
    probe: CallerProbe | None = None

    async def open_stream(self, url: str) -> ClientConnection:
        self.probe = CallerProbe(await super().open_stream(url))
        return cast(ClientConnection, self.probe)


@dataclass
class PathFigures:
    """Every stamped frame, both ways: latency, and what was lost, duplicated or reordered."""

    caller_to_agent_ms: list[float] = field(default_factory=list)  # frames sent once the agent was ready
    caller_held_ms: list[float] = field(default_factory=list)  # frames sent before: held until SettingsApplied
    agent_to_caller_ms: list[float] = field(default_factory=list)
    caller_frames_sent: int = 0
    caller_frames_lost: int = 0
    caller_frames_duplicated: int = 0
    caller_frames_reordered: int = 0
    agent_chunks_received: int = 0
    agent_chunks_lost: int = 0  # a gap in a session's chunk numbers with no clear inside it
    agent_chunks_duplicated: int = 0
    agent_chunks_reordered: int = 0
    unknown_stamps: int = 0  # a stamp no one sent: should never happen
    sessions_missing: int = 0  # calls whose agent session record never came

    def plus(self, other: PathFigures) -> PathFigures:
        """Two runs' figures together (``--rounds``): samples pooled, counts added."""
        return PathFigures(**{name: getattr(self, name) + getattr(other, name) for name in self.__dataclass_fields__})

    @property
    def lost(self) -> int:
        return self.caller_frames_lost + self.agent_chunks_lost

    @property
    def reordered(self) -> int:
        return self.caller_frames_reordered + self.agent_chunks_reordered

    def rows(self) -> list[str]:
        rows = [
            "measured from the stamps, ms (every caller frame, every agent audio message):",
            _latency_row("caller frame sent -> at the agent", self.caller_to_agent_ms),
            _latency_row("  sent before SettingsApplied (held)", self.caller_held_ms),
            _latency_row("agent audio sent -> at the caller", self.agent_to_caller_ms),
            f"  caller -> agent: {self.caller_frames_sent} frames sent, lost {self.caller_frames_lost}, "
            f"duplicated {self.caller_frames_duplicated}, reordered {self.caller_frames_reordered}",
            f"  agent -> caller: {self.agent_chunks_received} audio messages received, lost {self.agent_chunks_lost} "
            f"(gaps without a clear), duplicated {self.agent_chunks_duplicated}, "
            f"reordered {self.agent_chunks_reordered}",
        ]
        if self.unknown_stamps or self.sessions_missing:
            rows.append(
                f"  unmatched: {self.unknown_stamps} stamps no one sent, "
                f"{self.sessions_missing} agent sessions without a record"
            )
        return rows


def join_paths(probes: list[tuple[int, CallerProbe]], sessions: list[dict[str, Any]], stamped: int) -> PathFigures:
    """Match the callers' stamps (call number, ``probes``) with the agent's (``sessions``);
    ``stamped`` is how many frames of each caller's script carry a stamp."""
    figures = PathFigures(sessions_missing=max(0, len(probes) - len(sessions)))
    heard: dict[int, list[tuple[int, float, float]]] = {}
    said: dict[int, list[float]] = {}
    for session in sessions:
        said[session["session"]] = session["said"]
        ready = session.get("ready") or math.inf  # never ready: every frame it heard was held
        for call, frame, at in session["heard"]:
            heard.setdefault(call, []).append((frame, at, ready))
    for call, probe in probes:
        _caller_to_agent(figures, probe.media_sent, heard.get(call, []), stamped)
        _agent_to_caller(figures, probe.received, said)
    return figures


def _caller_to_agent(
    figures: PathFigures, sent: list[float], heard: list[tuple[int, float, float]], stamped: int
) -> None:
    stamped = min(stamped, len(sent))
    figures.caller_frames_sent += stamped
    seen: set[int] = set()
    latest = -1
    for frame, at, ready in heard:
        if frame >= len(sent):
            figures.unknown_stamps += 1
            continue
        if frame in seen:
            figures.caller_frames_duplicated += 1
            continue
        if frame < latest:
            figures.caller_frames_reordered += 1
        latest = max(latest, frame)
        seen.add(frame)
        latencies = figures.caller_to_agent_ms if sent[frame] >= ready else figures.caller_held_ms
        latencies.append((at - sent[frame]) * 1000)
    figures.caller_frames_lost += stamped - sum(1 for frame in seen if frame < stamped)


def _agent_to_caller(
    figures: PathFigures, received: list[tuple[float, str | bytes]], said: dict[int, list[float]]
) -> None:
    reader = StampReader(AGENT_MAGIC)
    latest: dict[int, int] = {}
    seen: dict[int, set[int]] = {}
    cleared: set[int] = set()  # sessions with a clear since their last chunk arrived
    for at, raw in received:
        if not isinstance(raw, str):
            continue
        try:
            msg = json.loads(raw)
            event = msg.get("event")
            payload = base64.b64decode(msg["media"]["payload"]) if event == "media" else b""
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # the caller reports malformed frames as protocol violations
        if event == "clear":  # the bridge dropped what it still held: gaps are expected
            reader.reset()
            cleared |= set(latest)
            continue
        for session, chunk in reader.feed(payload):
            sent = said.get(session)
            if sent is None or chunk >= len(sent):
                figures.unknown_stamps += 1
                continue
            chunks = seen.setdefault(session, set())
            if chunk in chunks:
                figures.agent_chunks_duplicated += 1
                continue
            chunks.add(chunk)
            figures.agent_chunks_received += 1
            figures.agent_to_caller_ms.append((at - sent[chunk]) * 1000)
            last = latest.get(session, -1)
            if chunk < last:
                figures.agent_chunks_reordered += 1
            elif chunk > last + 1 and session not in cleared:
                figures.agent_chunks_lost += chunk - last - 1
            cleared.discard(session)
            latest[session] = max(last, chunk)


# --- the server's process -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it (``--workers``: the workers too)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = cpu_seconds(pid)
    return out


def tree_rss_mib(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_mib(pid)
    return total


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of raw samples; ``values`` must not be empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class BridgeProcess:
    """What /proc says about a server the load test started itself (all its processes)."""

    pid: int
    rss_idle_mib: float
    rss_peak_mib: float
    pids: list[int] = field(default_factory=list)  # the process and its workers
    cpu_at_start: dict[int, float] = field(default_factory=dict)
    cpu_s: float = 0.0  # during the calls

    def start(self) -> None:
        self.pids = process_tree(self.pid)
        self.cpu_at_start = tree_cpu(self.pids)

    def stop(self) -> None:
        self.pids = process_tree(self.pid)
        now = tree_cpu(self.pids)
        self.cpu_s = sum(cpu - self.cpu_at_start.get(pid, 0.0) for pid, cpu in now.items())


# --- the report -----------------------------------------------------------------------------


class FigureKind(enum.Enum):
    """How a figure compares with the floor's: a latency by difference and ratio, a cost by
    ratio, a count side by side (0 is the only right count of lost frames)."""

    LATENCY_MS = "latency"
    COST = "cost"
    COUNT = "count"


@dataclass(frozen=True)
class Figure:
    name: str
    kind: FigureKind
    value: float | None  # None: nothing measured (no samples, or not started by the load test)


def _latency_row(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name:<46} no samples"
    return (
        f"  {name:<46} p50 {pct(values, 50):8.2f}  p95 {pct(values, 95):8.2f}  "
        f"p99 {pct(values, 99):8.2f}  max {max(values):8.2f}  (n={len(values)})"
    )


@dataclass
class Report:
    calls: int
    seconds: float
    url: str = ""
    results: list[CallResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    metrics: MetricsSnapshot | None = None  # the change in the bridge's /metrics over the run
    metrics_problem: str = ""
    process: BridgeProcess | None = None  # only for a server started by the load test
    token_source: str = ""  # with a running bridge: which token the webhooks were signed with
    wall_s: float = 0.0
    side: Side = Side.BRIDGE
    workers: int | None = None  # --workers given to the server
    paths: PathFigures | None = None  # only with the load test's own agent
    floor: Report | None = None  # --floor: the same load through the floor, just before
    rounds: int = 1  # --rounds: runs of ``calls`` concurrent calls whose figures are pooled here
    watch: int = 0  # --watch: calls followed and listened to through the live call API
    operator_token: str = ""  # the bridge's OPERATOR_TOKEN (the live call API is on in every bridge run)

    @classmethod
    def pooled(cls, runs: list[Report]) -> Report:
        """Several runs of the same load as one report: samples pooled, counts and CPU added,
        memory per call the largest of any run (``calls`` stays the concurrency of each)."""
        first = runs[0]
        out = cls(
            first.calls, first.seconds, side=first.side, workers=first.workers, rounds=len(runs), watch=first.watch
        )
        for run in runs:
            out.results += run.results
            out.failures += run.failures
            out.wall_s += run.wall_s
            out.metrics_problem = out.metrics_problem or run.metrics_problem
            if run.metrics is not None:
                out.metrics = run.metrics if out.metrics is None else out.metrics.plus(run.metrics)
            if run.paths is not None:
                out.paths = run.paths if out.paths is None else out.paths.plus(run.paths)
            if run.process is not None:
                p = run.process
                if out.process is None:
                    out.process = BridgeProcess(p.pid, p.rss_idle_mib, p.rss_peak_mib, pids=p.pids, cpu_s=p.cpu_s)
                else:
                    growth = max(out.process.rss_peak_mib - out.process.rss_idle_mib, p.rss_peak_mib - p.rss_idle_mib)
                    out.process.rss_peak_mib = out.process.rss_idle_mib + growth
                    out.process.cpu_s += p.cpu_s
        return out

    def caller_barge_ms(self) -> list[float]:
        """From the caller starting to speak (as the agent's detector sees it) to Twilio's clear."""
        out = []
        for result in self.results:
            for cleared in result.clears:
                # pair each clear with the caller's speech onset just before it; a clear with no
                # onset shortly before it is not a barge-in sample
                before = [t for t in result.speech_onsets if 0 <= cleared - t < BARGE_IN_WINDOW_S]
                if before:
                    out.append((cleared - before[-1]) * 1000)
        return out

    def figures(self) -> list[Figure]:
        """The figures compared with the floor, in the order printed."""

        def quantiles(name: str, values: list[float]) -> list[Figure]:
            return [
                Figure(f"{name} {label}", FigureKind.LATENCY_MS, pct(values, q) if values else None)
                for label, q in (("p50", 50), ("p99", 99))
            ]

        paths = self.paths
        out = [
            *quantiles("caller -> agent, ms", paths.caller_to_agent_ms if paths else []),
            *quantiles("agent -> caller, ms", paths.agent_to_caller_ms if paths else []),
            *quantiles("barge-in (speech -> clear), ms", self.caller_barge_ms()),
            *quantiles(
                "first agent audio, ms", [r.first_media_s * 1000 for r in self.results if r.first_media_s is not None]
            ),
        ]
        call_minutes = len(self.results) * self.seconds / 60
        p = self.process
        out += [
            Figure("CPU-s per call-minute", FigureKind.COST, p.cpu_s / call_minutes if p and call_minutes else None),
            Figure(
                "memory per call, KiB",
                FigureKind.COST,
                (p.rss_peak_mib - p.rss_idle_mib) * 1024 / max(1, self.calls) if p else None,
            ),
            Figure("frames lost", FigureKind.COUNT, paths.lost if paths else None),
            Figure("frames reordered", FigureKind.COUNT, paths.reordered if paths else None),
            Figure("calls failed", FigureKind.COUNT, len(self.failures)),
        ]
        return out

    def render(self) -> str:
        rows = self._render_one()
        if self.floor is not None:
            rows += ["", *self.floor._render_one(), "", *comparison_rows(self, self.floor)]
        return "\n".join(rows)

    def _render_one(self) -> list[str]:
        ok = len(self.results)
        if self.url:
            where = f"bridge at {self.url}"
        elif self.side is Side.FLOOR:
            where = "the floor (app.devtools.minimal_relay) and local agent started by the load test"
        else:
            where = "bridge and local agent started by the load test"
        if self.workers:
            where += f", {self.workers} workers"
        rows = [
            f"callbridge loadtest: {self.calls} concurrent calls x {self.seconds:g} s"
            + (f", {self.rounds} rounds" if self.rounds > 1 else "")
            + f", {where} (wall {self.wall_s:.1f} s, {os.cpu_count()} cores)",
            f"  calls completed {ok}/{self.calls * self.rounds}, failed {len(self.failures)}, "
            f"Twilio protocol violations {sum(len(r.violations) for r in self.results)}",
        ]
        for failure, times in Counter(self.failures).most_common(5):
            rows.append(f"  failure{f' (x{times})' if times > 1 else ''}: {failure}")
        watched = [r.watched for r in self.results if r.watched]
        if self.watch and self.side is Side.BRIDGE:
            rows.append(f"  watched and listened to through the live call API: {len(watched)} calls")
            for what, times in Counter(w if "events" not in w else "ok" for w in watched).most_common(3):
                rows.append(f"    {what}{f' (x{times})' if times > 1 else ''}")
        if self.token_source and any("HTTP 403" in f for f in self.failures):
            rows.append(
                f"  the bridge refused the webhook signatures, signed with {self.token_source}: give it "
                "the bridge's TWILIO_AUTH_TOKEN with --auth-token, and if the bridge has PUBLIC_URL set, "
                "use that as --url"
            )
        if ok:
            rows += self._caller_rows()
        if ok and self.paths is not None:
            rows += self.paths.rows()
        if self.side is Side.BRIDGE:
            rows += self._bridge_rows()
        if self.process is not None:
            rows += self._process_rows(ok)
        return rows

    def _caller_rows(self) -> list[str]:
        first = [r.first_media_s * 1000 for r in self.results if r.first_media_s is not None]
        clears = sum(len(r.clears) for r in self.results)
        cleared = sum(r.bytes_dropped_by_clear for r in self.results) / TWILIO_SAMPLE_RATE
        return [
            "measured by the callers, ms (exact percentiles):",
            _latency_row("webhook POST -> TwiML", [r.webhook_s * 1000 for r in self.results]),
            _latency_row("media WebSocket open", [r.connect_s * 1000 for r in self.results]),
            _latency_row("stream start -> first agent audio (greeting)", first),
            _latency_row("caller speech detected -> clear at caller", self.caller_barge_ms()),
            f"  clears received {clears}, dropping {cleared:.2f} s of agent audio not yet played",
        ]

    def _bridge_rows(self) -> list[str]:
        if self.metrics is None:
            return [f"bridge /metrics: not read ({self.metrics_problem}); bridge-side figures omitted"]
        m = self.metrics

        def counts(name: str, label: str) -> str:
            moved = m.by_label(name, label)
            return ", ".join(f"{k} {v:.0f}" for k, v in sorted(moved.items())) or "none"

        dropped = m.by_label("callbridge_audio_dropped_bytes_total", "direction", "reason")
        rows = [
            "bridge, from /metrics (change over the run"
            + ("; includes any other calls to that bridge):" if self.url else "):"),
            f"  calls ended by outcome: {counts('callbridge_calls_total', 'outcome')}",
            f"  webhooks: {counts('callbridge_webhook_requests_total', 'result')}; "
            f"streams rejected: {counts('callbridge_streams_rejected_total', 'reason')}",
            f"  barge-ins {m.value('callbridge_barge_ins_total'):.0f}; audio dropped by the bridge: "
            + (", ".join(f"{k} {v / TWILIO_SAMPLE_RATE:.2f} s" for k, v in sorted(dropped.items())) or "none"),
            f"  invalid inputs: {counts('callbridge_invalid_inputs_total', 'kind')}; "
            f"overflows: {counts('callbridge_overflows_total', 'kind')}; "
            f"agent errors: {counts('callbridge_agent_errors_total', 'code')}",
        ]
        for title, name in (
            ("UserStartedSpeaking -> clear sent", "callbridge_barge_in_clear_seconds"),
            ("stream start -> first agent audio", "callbridge_first_agent_audio_seconds"),
            ("agent session -> SettingsApplied", "callbridge_agent_connect_seconds"),
        ):
            rows.append(f"  {title:<46} {m.histogram(name).describe()}")
        return rows

    def _process_rows(self, ok: int) -> list[str]:
        assert self.process is not None
        p = self.process
        call_minutes = ok * self.seconds / 60
        per_call_minute = f" = {p.cpu_s / call_minutes:.3f} CPU-s per call-minute" if call_minutes else ""
        what = f"{self.side.value} process" + (f"es ({len(p.pids)})" if len(p.pids) > 1 else "")
        return [
            f"{what}, from /proc:",
            f"  CPU {p.cpu_s:.2f} s for {call_minutes:.1f} call-minutes{per_call_minute}",
            f"  RSS idle {p.rss_idle_mib:.1f} MiB, peak {p.rss_peak_mib:.1f} MiB, "
            f"{(p.rss_peak_mib - p.rss_idle_mib) * 1024 / max(1, self.calls):.0f} KiB per concurrent call",
        ]


def comparison_rows(bridge: Report, floor: Report) -> list[str]:
    """Each figure of the bridge next to the floor's, as a difference and a ratio."""
    rows = [
        "bridge against the floor (the same load, one after the other):",
        f"  {'figure':<36} {'bridge':>9} {'floor':>9} {'difference':>11} {'ratio':>7}",
    ]
    floors = {figure.name: figure.value for figure in floor.figures()}
    for figure in bridge.figures():
        mine, base = figure.value, floors.get(figure.name)
        cells = [_cell(mine, figure.kind), _cell(base, figure.kind), "", ""]
        if mine is not None and base is not None:
            if figure.kind is FigureKind.LATENCY_MS:
                cells[2] = f"{mine - base:+.2f}"
            if figure.kind is not FigureKind.COUNT and base > 0:
                cells[3] = f"{mine / base:.2f}x"
        rows.append(f"  {figure.name:<36} {cells[0]:>9} {cells[1]:>9} {cells[2]:>11} {cells[3]:>7}")
    return rows


def _cell(value: float | None, kind: FigureKind) -> str:
    if value is None:
        return "-"
    if kind is FigureKind.COUNT:
        return f"{value:.0f}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# --- running it -----------------------------------------------------------------------------


async def _one_call(
    base_url: str, token: str, audio: bytes, delay: float, watcher: str | None = None
) -> tuple[CallResult, CallerProbe | None]:
    """One call; with ``watcher`` (an OPERATOR_TOKEN), an operator follows its events and
    listens to it through the live call API for as long as it lasts."""
    await asyncio.sleep(delay)
    caller = ProbedCaller(base_url, token, tail=1.0, max_tail=5.0)
    watching = asyncio.create_task(watch_call(base_url, watcher, caller.call_sid)) if watcher else None
    result = await caller.run(audio)
    if watching is not None:
        try:
            result.watched = await asyncio.wait_for(watching, 5.0)
        except Exception as exc:  # the call's figures stand; the watcher's failure is reported
            result.watched = f"{type(exc).__name__}: {exc}"
    return result, caller.probe


async def watch_call(base_url: str, operator_token: str, call_sid: str) -> str:
    """As the console does: wait for the call in ``GET /api/calls``, then follow its events and
    listen to both tracks until it ends. What was received, in words."""
    import httpx
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {operator_token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(5.0, read=None)) as client:
        for _ in range(100):
            listed = (await client.get("/api/calls")).json()["calls"]
            if any(line["call_sid"] == call_sid for line in listed):
                break
            await asyncio.sleep(0.05)
        else:
            return "never listed"
        url = (await client.post(f"/api/calls/{call_sid}/listen")).json()["url"]
        counts = {"events": 0, "frames": 0}

        async def follow() -> None:
            async with client.stream("GET", f"/api/calls/{call_sid}/events") as response:
                async for line in response.aiter_lines():
                    counts["events"] += line.startswith("data: ")

        async def listen() -> None:
            async with connect(url) as ws:
                async for _ in ws:
                    counts["frames"] += 1

        await asyncio.gather(follow(), listen())
    return f"{counts['events']} events, {counts['frames']} audio frames"


async def _run_calls(report: Report, base_url: str, token: str, ramp: float) -> list[tuple[int, CallerProbe]]:
    """Every call, each with its own stamps; the probes of the calls that completed, by call number."""
    audio = caller_script(report.seconds)

    async def sample(process: BridgeProcess) -> None:
        while True:
            process.rss_peak_mib = max(process.rss_peak_mib, tree_rss_mib(process.pids))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample(report.process)) if report.process is not None else None
    tasks = [
        _one_call(
            base_url,
            token,
            stamped_audio(audio, i),
            ramp * i / max(1, report.calls),
            report.operator_token if i < report.watch else None,
        )
        for i in range(report.calls)
    ]
    probes = []
    for i, outcome in enumerate(await asyncio.gather(*tasks, return_exceptions=True)):
        if isinstance(outcome, BaseException):
            report.failures.append(" ".join(f"{type(outcome).__name__}: {outcome}".split()))  # one line each
            continue
        result, probe = outcome
        report.results.append(result)
        if probe is not None:
            probes.append((i, probe))
    if sampler is not None:
        sampler.cancel()
    return probes


def _measure(report: Report, base_url: str, token: str, ramp: float) -> list[tuple[int, CallerProbe]]:
    """Run the calls, with the bridge's /metrics scraped before and after (the floor has none)."""
    before: MetricsSnapshot | None = None
    if report.side is Side.BRIDGE:
        try:
            before = scrape(base_url)
        except (OSError, ValueError) as exc:
            report.metrics_problem = f"{base_url}{METRICS_PATH}: {exc}"
    if report.process is not None:
        report.process.start()
    began = time.monotonic()
    probes = asyncio.run(_run_calls(report, base_url, token, ramp))
    report.wall_s = time.monotonic() - began
    if report.process is not None:
        report.process.stop()
    if before is not None:
        try:
            report.metrics = scrape_settled(base_url, before, len(report.results)).minus(before)
        except (OSError, ValueError) as exc:
            report.metrics_problem = f"{base_url}{METRICS_PATH}: {exc}"
    return probes


def signing_token(given: str | None) -> tuple[str, str]:
    """The Twilio auth token to sign webhooks with for a running bridge, and where it came from:
    the one given, else the one `serve` would read here (environment or .env), else the offline
    development token that `serve` uses when it has none, the way `simulate-call` chooses."""
    if given:
        return given, "the token given with --auth-token"
    try:
        settings = load_settings()
        configured = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    except ConfigError:
        configured = os.environ.get("TWILIO_AUTH_TOKEN")
    if configured:
        return configured, "TWILIO_AUTH_TOKEN from the environment or .env"
    return OFFLINE_TWILIO_AUTH_TOKEN, "the offline development token (no TWILIO_AUTH_TOKEN set)"


def run(
    calls: int,
    seconds: float,
    ramp: float,
    url: str | None,
    token: str | None,
    *,
    floor: bool = False,
    workers: int | None = None,
    rounds: int = 1,
    watch: int = 0,
) -> Report:
    """The load test; with ``floor``, the same load through the floor first (not with ``url``),
    and with ``rounds``, that many times (floor, bridge, floor, bridge...), pooled: the two see
    the same machine, even one whose other work comes and goes."""
    if url:  # an already running bridge: no CPU or memory, no stamps read at its agent
        report = Report(calls=calls, seconds=seconds, url=url.rstrip("/"))
        token, report.token_source = signing_token(token)
        _measure(report, report.url, token, ramp)
        return report
    floors, bridges = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            if floor:
                floors.append(_run_started(Report(calls, seconds, side=Side.FLOOR, workers=workers), Path(tmp), ramp))
            bridges.append(_run_started(Report(calls, seconds, workers=workers, watch=watch), Path(tmp), ramp))
    report = Report.pooled(bridges)
    report.floor = Report.pooled(floors) if floors else None
    return report


def server_command(side: Side, port: int, agent_port: int, workers: int | None) -> list[str]:
    """How the server under test starts: one worker unless ``--workers`` says otherwise (the
    bridge's own default is one per core, which would not compare with a one-process floor)."""
    if side is Side.BRIDGE:
        command = [sys.executable, "-m", "app", "serve"]
    else:
        command = [sys.executable, "-m", "app.devtools.minimal_relay", "--agent-url", agent_url(agent_port)]
        command += ["--host", LOOPBACK, "--port", str(port)]
    return [*command, "--workers", str(workers or 1)]


def peer_env() -> dict[str, str]:
    """This environment without what would point a benchmark's processes at the real services."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DEEPGRAM_", "TWILIO_", "AGENT_"))}


def server_env(base_env: dict[str, str], agent_port: int, port: int, token: str, log_level: str) -> dict[str, str]:
    """A benchmark server's environment: the local agent on ``agent_port``, the webhook signed
    with ``token``, listening on loopback ``port``."""
    return {
        **base_env,
        "AGENT_URL": agent_url(agent_port),
        "TWILIO_AUTH_TOKEN": token,
        "STREAM_TOKEN_SECRET": secrets.token_urlsafe(32),
        "PORT": str(port),
        "HOST": LOOPBACK,
        "LOG_LEVEL": log_level,
    }


def wait_started(what: str, port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait for ``proc`` to listen on ``port``; if it does not, say so with its log's last lines."""
    try:
        wait_for_port(port, proc)
    except RuntimeError as exc:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
        raise RuntimeError(f"the {what} did not start: {exc}\n{tail}") from exc


def stop_all(*procs: subprocess.Popen[bytes]) -> None:
    """Terminate them all at once, then wait for each (killed after 10 s)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_started(report: Report, tmp: Path, ramp: float) -> Report:
    """Start the local agent and the server (bridge or floor), run the calls, stop both."""
    token = secrets.token_urlsafe(24)
    agent_port, port = free_port(), free_port()
    records = Path(tempfile.mkdtemp(prefix=f"{report.side.value}-", dir=tmp)) / "agent.jsonl"
    log_path = records.with_name("server.log")
    base_env = peer_env()
    agent = subprocess.Popen(
        [sys.executable, "-m", "app.devtools.loadtest", "agent", "--port", str(agent_port), "--record", str(records)],
        env=base_env,
    )
    env = server_env(base_env, agent_port, port, token, "info")
    if report.side is Side.BRIDGE:  # the live call API on, as in production: watched or not
        env["OPERATOR_TOKEN"] = report.operator_token = secrets.token_urlsafe(24)
    command = server_command(report.side, port, agent_port, report.workers)
    with log_path.open("wb") as log_file:  # kept only to explain a server that fails to start
        server = subprocess.Popen(command, env=env, stdout=log_file, stderr=log_file)
    try:
        wait_for_port(agent_port, agent)
        wait_started(report.side.value, port, server, log_path)
        time.sleep(0.3 + (WORKERS_START_S if report.workers and report.workers > 1 else 0.0))
        pids = process_tree(server.pid)
        idle = tree_rss_mib(pids)
        report.process = BridgeProcess(server.pid, rss_idle_mib=idle, rss_peak_mib=idle, pids=pids)
        probes = _measure(report, bridge_url(port), token, ramp)
        sessions = read_agent_records(records, len(probes))
        report.paths = join_paths(probes, sessions, stamp_count(len(caller_script(report.seconds))))
    finally:
        stop_all(server, agent)
    return report


if __name__ == "__main__":
    if sys.argv[1:2] != ["agent"]:
        sys.exit("usage: python -m app.devtools.loadtest agent --port PORT --record FILE")
    sys.exit(agent_main(sys.argv[2:]))
