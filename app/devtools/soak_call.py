"""``callbridge soak-call``: one long call with a barge-in every few seconds, the bridge's
memory sampled all along, to show whether a long call grows.

A leak per frame or per turn is invisible in a 20 s load test and fatal in an hour-long call.
Here a single simulated caller talks to a real bridge (``serve`` on the loopback interface,
through ``heap_probe``, the local agent in another process) for minutes: a phrase, a pause
the agent answers into, the next phrase over the answer (a barge-in: the agent reports
UserStartedSpeaking and the bridge clears Twilio's buffer), again and again. Every
``--sample-every`` seconds the bridge's RSS, Python's traced memory (tracemalloc, tracing
from the first sample, just before the call), its memory blocks and its object count are
sampled; the series is printed with the slope of each between the end of
``--settle-minutes`` (allocators and caches reaching their working set) and the end.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.heap_probe import Figures
from app.devtools.loadtest import MetricsSnapshot, scrape, scrape_settled
from app.devtools.probed_bridge import ProbedBridge, probed_bridge
from app.devtools.simulated_caller import CallResult, SimulatedCaller

PHRASE = "could you tell me about my order and the delivery date please thank you very much indeed"
PAUSE_SHARE = 0.45
"""The pause's share of each barge-in period. The agent answers a phrase with an echo of it as
long as the phrase, starting some 0.4 s (its detector's hangover) into the pause; with the
pause under half the period the echo is still playing when the next phrase starts."""
MIN_PAUSE_S = 0.8  # the agent needs 0.4 s of quiet to take its turn, and a moment to answer
KIB = 1024


def barge_in_audio(seconds: float, every: float) -> bytes:
    """Caller audio (Twilio's mu-law) of ``seconds``: a pause then a phrase, each ``every`` seconds."""
    pause = max(MIN_PAUSE_S, every * PAUSE_SHARE)
    speech = synth.speech_like(PHRASE)
    phrase_bytes = max(2, int((every - pause) * synth.SAMPLE_RATE)) * 2
    speech = (speech * (1 + phrase_bytes // len(speech)))[:phrase_bytes]
    period = synth.encode(synth.silence(pause) + speech, TWILIO_FORMAT)
    repeats = math.ceil(seconds / every)
    return (period * repeats)[: int(seconds * synth.SAMPLE_RATE)]


@dataclass
class Sample:
    t: float  # seconds since the stream started (negative: before the call)
    figures: Figures


@dataclass
class Soak:
    minutes: float
    every: float
    samples: list[Sample] = field(default_factory=list)
    result: CallResult | None = None
    failure: str = ""
    metrics: MetricsSnapshot | None = None  # the change in the bridge's /metrics over the call
    began: float = 0.0  # time.monotonic() when the call was placed

    def add(self, figures: Figures) -> None:
        self.samples.append(Sample(figures.at - self.began, figures))


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None with fewer than two."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


async def _sample_while(bridge: ProbedBridge, soak: Soak, every: float, call: asyncio.Task[None]) -> None:
    n = 0
    while not call.done():
        n += 1
        due = soak.began + n * every
        done, _ = await asyncio.wait({call}, timeout=max(0.0, due - time.monotonic()))
        if done:
            return
        soak.add(await asyncio.to_thread(bridge.probe.sample, f"t{n}"))


async def _call(bridge: ProbedBridge, soak: Soak, sample_every: float) -> None:
    audio = barge_in_audio(soak.minutes * 60, soak.every)
    soak.began = time.monotonic()

    async def place() -> None:
        soak.result = await SimulatedCaller(bridge.url, bridge.token, tail=1.0, max_tail=5.0).run(audio)

    call = asyncio.create_task(place())
    await _sample_while(bridge, soak, sample_every, call)
    try:
        await call
    except Exception as exc:  # reported with the figures gathered until then
        soak.failure = f"{type(exc).__name__}: {exc}"


def measure(minutes: float, every: float, sample_every: float, frames: int) -> Soak:
    soak = Soak(minutes, every)
    with tempfile.TemporaryDirectory(prefix="callbridge-soak-") as tmp, probed_bridge(Path(tmp), frames) as bridge:
        before = scrape(bridge.url)
        soak.began = time.monotonic()
        soak.add(bridge.probe.sample("idle"))
        asyncio.run(_call(bridge, soak, sample_every))
        soak.metrics = scrape_settled(bridge.url, before, calls=1).minus(before)
        soak.add(bridge.probe.sample("after"))
    return soak


def render(soak: Soak, settle_minutes: float) -> str:
    result, m = soak.result, soak.metrics
    rows = [
        f"callbridge soak-call: one call of {soak.minutes:g} min, a barge-in every {soak.every:g} s, "
        f"bridge sampled {len(soak.samples)} times",
    ]
    if soak.failure:
        rows.append(f"  the call failed: {soak.failure}")
    if result is not None:
        rows.append(
            f"  caller: ended by {result.ended_by}, {len(result.sent) / 8000:.0f} s of audio sent, "
            f"{len(result.received) / 8000:.0f} s received, {len(result.clears)} clears "
            f"({result.bytes_dropped_by_clear / 8000:.1f} s of agent audio dropped), "
            f"{len(result.marks_played)} marks played, {len(result.violations)} protocol violations"
        )
    if m is not None:
        rows.append(
            f"  bridge /metrics: barge-ins {m.value('callbridge_barge_ins_total'):.0f}, calls ended "
            + (", ".join(f"{k} {v:.0f}" for k, v in m.by_label("callbridge_calls_total", "outcome").items()) or "none")
        )
    rows.append(
        f"  {'t (s)':>8} {'RSS MiB':>9} {'anon MiB':>9} {'traced KiB':>11} {'blocks':>9} {'objects':>9} {'threads':>7}"
    )
    for sample in soak.samples:
        f = sample.figures
        label = f"{f.label:>8}" if f.label in ("idle", "after") else f"{sample.t:8.0f}"
        rows.append(
            f"  {label} {f.rss_kib / KIB:9.2f} {f.status_kib.get('RssAnon', 0) / KIB:9.2f} "
            f"{f.traced / KIB:11.1f} {f.allocated_blocks:9d} {f.gc_objects:9d} {f.threads:7d}"
        )
    fitted = [s for s in soak.samples if s.figures.label.startswith("t") and s.t >= settle_minutes * 60]
    rows.append(
        f"slopes from {settle_minutes:g} min to the end of the call ({len(fitted)} samples; least squares, per minute):"
    )

    def slope(name: str, unit: str, value: float, get: str) -> str:
        points = [(s.t, float(_figure(s.figures, get)) / value) for s in fitted]
        found = slope_per_minute(points)
        return f"  {name:<34} " + ("not enough samples" if found is None else f"{found:+10.2f} {unit} per minute")

    rows += [
        slope("RSS", "KiB", KIB, "rss"),
        slope("traced by tracemalloc", "KiB", KIB, "traced"),
        slope("Python memory blocks", "blocks", 1, "blocks"),
        slope("gc-tracked objects", "objects", 1, "objects"),
    ]
    if fitted:
        first, last = fitted[0].figures, fitted[-1].figures
        rows.append(
            f"  change over that span: RSS {(last.rss_kib - first.rss_kib):+d} KiB, traced "
            f"{(last.traced - first.traced) / KIB:+.1f} KiB, "
            f"blocks {last.allocated_blocks - first.allocated_blocks:+d}, "
            f"objects {last.gc_objects - first.gc_objects:+d}"
        )
        span = fitted[-1].t - fitted[0].t
        if span > 0:
            per_barge_in = (last.traced - first.traced) / KIB / (span / soak.every)
            rows.append(f"  traced per barge-in (a turn each way, every {soak.every:g} s): {per_barge_in:+.2f} KiB")
    return "\n".join(rows)


def _figure(figures: Figures, name: str) -> int:
    if name == "rss":
        return figures.rss_kib * KIB
    if name == "traced":
        return figures.traced
    if name == "blocks":
        return figures.allocated_blocks
    return figures.gc_objects


def ok(soak: Soak) -> bool:
    """The call ran to its end, as the caller's hang-up, within Twilio's protocol."""
    result = soak.result
    return not soak.failure and result is not None and result.ended_by == "caller" and not result.violations
