"""``callbridge loadtest``: many concurrent simulated calls, and the numbers that matter.

By default it starts its own bridge (``callbridge serve``) and local agent
(``callbridge emulate-agent``) as separate processes on the loopback interface, so the
bridge's CPU and memory are measured alone, from /proc. With ``--url`` it calls a bridge that
is already running and reports no CPU or memory. Every caller talks, pauses and talks over the
agent's replies, so calls exercise relaying, marks and barge-in all the time.

The figures come from two places only: what the simulated callers measure themselves (raw
samples, exact percentiles), and the bridge's ``/metrics``, scraped before and after the run
(the change is what the run did; histograms only give the bucket a quantile falls in).
"""

from __future__ import annotations

import asyncio
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
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from app.codecs import TWILIO_FORMAT, TWILIO_SAMPLE_RATE
from app.config import OFFLINE_TWILIO_AUTH_TOKEN, ConfigError, load_settings
from app.devtools import synth
from app.devtools.endpoints import LOCAL_HOSTNAMES, LOOPBACK, METRICS_PATH, agent_url, bridge_url, wait_for_port
from app.devtools.endpoints import free_port as free_port  # re-exported: tests import it from here
from app.devtools.simulated_caller import CallResult, SimulatedCaller

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BARGE_IN_WINDOW_S = 1.0  # a clear pairs with the caller's speech onset at most this long before it

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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of raw samples; ``values`` must not be empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class BridgeProcess:
    """What /proc says about a bridge the load test started itself."""

    pid: int
    rss_idle_mib: float
    rss_peak_mib: float
    cpu_at_start: float = 0.0
    cpu_s: float = 0.0  # during the calls


@dataclass
class Report:
    calls: int
    seconds: float
    url: str = ""
    results: list[CallResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    metrics: MetricsSnapshot | None = None  # the change in the bridge's /metrics over the run
    metrics_problem: str = ""
    process: BridgeProcess | None = None  # only for a bridge started by the load test
    token_source: str = ""  # with a running bridge: which token the webhooks were signed with
    wall_s: float = 0.0

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

    def render(self) -> str:
        ok = len(self.results)
        where = f"bridge at {self.url}" if self.url else "bridge and local agent started by the load test"
        rows = [
            f"callbridge loadtest: {self.calls} concurrent calls x {self.seconds:g} s, {where} "
            f"(wall {self.wall_s:.1f} s, {os.cpu_count()} cores)",
            f"  calls completed {ok}/{self.calls}, failed {len(self.failures)}, "
            f"Twilio protocol violations {sum(len(r.violations) for r in self.results)}",
        ]
        for failure, times in Counter(self.failures).most_common(5):
            rows.append(f"  failure{f' (x{times})' if times > 1 else ''}: {failure}")
        if self.token_source and any("HTTP 403" in f for f in self.failures):
            rows.append(
                f"  the bridge refused the webhook signatures, signed with {self.token_source}: give it "
                "the bridge's TWILIO_AUTH_TOKEN with --auth-token, and if the bridge has PUBLIC_URL set, "
                "use that as --url"
            )
        if ok:
            rows += self._caller_rows()
        rows += self._bridge_rows()
        if self.process is not None:
            rows += self._process_rows(ok)
        return "\n".join(rows)

    def _caller_rows(self) -> list[str]:
        def line(name: str, values: list[float]) -> str:
            if not values:
                return f"  {name:<46} no samples"
            return (
                f"  {name:<46} p50 {pct(values, 50):8.2f}  p95 {pct(values, 95):8.2f}  "
                f"p99 {pct(values, 99):8.2f}  max {max(values):8.2f}  (n={len(values)})"
            )

        first = [r.first_media_s * 1000 for r in self.results if r.first_media_s is not None]
        clears = sum(len(r.clears) for r in self.results)
        cleared = sum(r.bytes_dropped_by_clear for r in self.results) / TWILIO_SAMPLE_RATE
        return [
            "measured by the callers, ms (exact percentiles):",
            line("webhook POST -> TwiML", [r.webhook_s * 1000 for r in self.results]),
            line("media WebSocket open", [r.connect_s * 1000 for r in self.results]),
            line("stream start -> first agent audio (greeting)", first),
            line("caller speech detected -> clear at caller", self.caller_barge_ms()),
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
        return [
            "bridge process, from /proc:",
            f"  CPU {p.cpu_s:.2f} s for {call_minutes:.1f} call-minutes{per_call_minute}",
            f"  RSS idle {p.rss_idle_mib:.1f} MiB, peak {p.rss_peak_mib:.1f} MiB, "
            f"{(p.rss_peak_mib - p.rss_idle_mib) / max(1, self.calls):.2f} MiB per concurrent call",
        ]


async def _one_call(base_url: str, token: str, audio: bytes, delay: float) -> CallResult:
    await asyncio.sleep(delay)
    caller = SimulatedCaller(base_url, token, tail=1.0, max_tail=5.0)
    return await caller.run(audio)


async def _run_calls(report: Report, base_url: str, token: str, ramp: float) -> None:
    audio = caller_script(report.seconds)

    async def sample(process: BridgeProcess) -> None:
        while True:
            process.rss_peak_mib = max(process.rss_peak_mib, rss_mib(process.pid))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample(report.process)) if report.process is not None else None
    tasks = [_one_call(base_url, token, audio, ramp * i / max(1, report.calls)) for i in range(report.calls)]
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, CallResult):
            report.results.append(outcome)
        else:
            report.failures.append(" ".join(f"{type(outcome).__name__}: {outcome}".split()))  # one line each
    if sampler is not None:
        sampler.cancel()


def _measure(report: Report, base_url: str, token: str, ramp: float) -> None:
    """Run the calls, with /metrics scraped before and after."""
    before: MetricsSnapshot | None = None
    try:
        before = scrape(base_url)
    except (OSError, ValueError) as exc:
        report.metrics_problem = f"{base_url}{METRICS_PATH}: {exc}"
    if report.process is not None:
        report.process.cpu_at_start = cpu_seconds(report.process.pid)
    began = time.monotonic()
    asyncio.run(_run_calls(report, base_url, token, ramp))
    report.wall_s = time.monotonic() - began
    if report.process is not None:
        report.process.cpu_s = cpu_seconds(report.process.pid) - report.process.cpu_at_start
    if before is not None:
        try:
            report.metrics = scrape_settled(base_url, before, len(report.results)).minus(before)
        except (OSError, ValueError) as exc:
            report.metrics_problem = f"{base_url}{METRICS_PATH}: {exc}"


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


def run(calls: int, seconds: float, ramp: float, url: str | None, token: str | None) -> Report:
    if url:  # an already running bridge: no CPU or memory
        report = Report(calls=calls, seconds=seconds, url=url.rstrip("/"))
        token, report.token_source = signing_token(token)
        _measure(report, report.url, token, ramp)
        return report
    report = Report(calls=calls, seconds=seconds)
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
            "AGENT_URL": agent_url(agent_port),
            "TWILIO_AUTH_TOKEN": token,
            "STREAM_TOKEN_SECRET": secrets.token_urlsafe(32),
            "PORT": str(bridge_port),
            "HOST": LOOPBACK,
            "LOG_LEVEL": "info",
        }
        with log_path.open("wb") as log_file:  # kept only to explain a bridge that fails to start
            bridge = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, stdout=log_file, stderr=log_file)
        try:
            wait_for_port(agent_port, agent)
            try:
                wait_for_port(bridge_port, bridge)
            except RuntimeError as exc:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
                raise RuntimeError(f"the bridge did not start: {exc}\n{tail}") from exc
            time.sleep(0.3)
            idle = rss_mib(bridge.pid)
            report.process = BridgeProcess(bridge.pid, rss_idle_mib=idle, rss_peak_mib=idle)
            _measure(report, bridge_url(bridge_port), token, ramp)
        finally:
            for proc in (bridge, agent):
                proc.terminate()
            for proc in (bridge, agent):
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return report
