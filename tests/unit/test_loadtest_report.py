"""The load test's figures: read from Prometheus text as a delta over the run, histogram
quantiles given as the bucket they fall in, and nothing printed that was not measured."""

from __future__ import annotations

import math
import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from app.devtools.loadtest import MetricsSnapshot, Report
from app.devtools.simulated_caller import CallResult

BUCKETS = (0.0005, 0.001, 0.0025)


def exposition(clear_latencies: list[float], outcomes: list[str]) -> str:
    registry = CollectorRegistry()
    calls = Counter("callbridge_calls_total", "calls", ["outcome"], registry=registry)
    clear = Histogram("callbridge_barge_in_clear_seconds", "clear", buckets=BUCKETS, registry=registry)
    for outcome in outcomes:
        calls.labels(outcome).inc()
    for value in clear_latencies:
        clear.observe(value)
    return generate_latest(registry).decode()


def test_delta_over_the_run_and_bucketed_quantiles() -> None:
    before = MetricsSnapshot.parse(exposition([0.002] * 50, ["caller_hangup"] * 7))
    after = MetricsSnapshot.parse(
        exposition([0.002] * 50 + [0.0004] * 98 + [0.0008, 0.003], ["caller_hangup"] * 9 + ["agent_error"])
    )
    run = after.minus(before)
    assert run.by_label("callbridge_calls_total", "outcome") == {"caller_hangup": 2.0, "agent_error": 1.0}
    clear = run.histogram("callbridge_barge_in_clear_seconds")
    assert clear.count == 100
    assert clear.bound(0.5) == 0.0005 and clear.bound(0.99) == 0.001 and math.isinf(clear.bound(1.0))
    text = clear.describe()
    assert "p50 <= 0.50 ms" in text and "p99 <= 1.00 ms" in text and "(bucket bounds; n=100)" in text
    assert "mean 0.43 ms" in text  # the sum is exact: (98 * 0.4 + 0.8 + 3) / 100


def test_a_quantile_past_the_last_bucket_says_so() -> None:
    snapshot = MetricsSnapshot.parse(exposition([0.01] * 3, []))
    assert "p50 > 2.50 ms" in snapshot.histogram("callbridge_barge_in_clear_seconds").describe()
    assert MetricsSnapshot().histogram("callbridge_barge_in_clear_seconds").describe() == "no samples"


def no_nan(text: str) -> bool:
    return not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_every_call_failed_and_no_metrics_prints_only_that() -> None:
    report = Report(calls=3, seconds=5, url="http://127.0.0.1:9", wall_s=0.1)
    report.failures = ["SimulationError: webhook answered HTTP 403: bad signature"] * 3
    report.metrics_problem = "connection refused"
    text = report.render()
    assert "calls completed 0/3, failed 3" in text
    assert "failure (x3): SimulationError: webhook answered HTTP 403" in text
    assert "bridge /metrics: not read (connection refused)" in text
    assert "p50" not in text and "CPU" not in text and no_nan(text)


def test_calls_without_barge_ins_say_no_samples() -> None:
    result = CallResult("CA1", "<Response/>", "ws://x", {})
    result.webhook_s, result.connect_s = 0.003, 0.002
    report = Report(calls=1, seconds=5, url="http://127.0.0.1:9", results=[result], metrics=MetricsSnapshot())
    text = report.render()
    assert re.search(r"webhook POST -> TwiML\s+p50\s+3\.00 .*\(n=1\)", text)
    assert re.search(r"caller speech detected -> clear at caller\s+no samples", text)
    assert "calls ended by outcome: none" in text
    assert "CPU" not in text and no_nan(text)
