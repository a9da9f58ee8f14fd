"""The load test's figures: read from Prometheus text as a delta over the run, histogram
quantiles given as the bucket they fall in, and nothing printed that was not measured."""

from __future__ import annotations

import base64
import json
import math
import os
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from app.devtools.loadtest import (
    AGENT_MAGIC,
    CALLER_MAGIC,
    STAMP_LEN,
    BridgeProcess,
    CallerProbe,
    MetricsSnapshot,
    PathFigures,
    Report,
    Side,
    StampReader,
    join_paths,
    process_tree,
    read_stamps,
    rss_mib,
    stamp,
    stamp_count,
    stamped_audio,
    tree_cpu,
    tree_rss_mib,
)
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


# --- stamps: latency both ways, and every frame lost, duplicated or reordered ---------------


def test_stamps_survive_any_split_and_ignore_lookalikes() -> None:
    audio = bytes(range(256)) * 4
    frames = stamped_audio(audio, call=7)
    assert stamp_count(len(audio)) == len(read_stamps(CALLER_MAGIC, frames)) == 7  # 1024 bytes: 6 frames + 1
    assert read_stamps(CALLER_MAGIC, frames)[:2] == [(7, 0), (7, 1)]
    big = stamp(AGENT_MAGIC, 65535, 2**32 - 1)
    assert len(big) == STAMP_LEN and read_stamps(AGENT_MAGIC, big) == [(65535, 2**32 - 1)]
    assert read_stamps(CALLER_MAGIC, big) == []  # the other direction's magic
    broken = bytearray(big)
    broken[-1] ^= 0x01  # the check nibble no longer matches
    assert read_stamps(AGENT_MAGIC, bytes(broken)) == []
    reader = StampReader(AGENT_MAGIC)  # a stamp split over two messages is read once
    assert reader.feed(b"\xff" * 5 + big[:9]) == [] and reader.feed(big[9:] + b"\xff" * 3) == [(65535, 2**32 - 1)]
    assert reader.feed(b"\xff" * 20) == []


class FakeProbe(CallerProbe):
    def __init__(self, sent: list[float], received: list[tuple[float, str | bytes]]) -> None:
        self.media_sent = sent
        self.received = received


def media(*chunks: tuple[int, int]) -> str:
    audio = b"".join(stamp(AGENT_MAGIC, session, chunk) + b"\xff" * 50 for session, chunk in chunks)
    return json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": base64.b64encode(audio).decode()}})


CLEAR = json.dumps({"event": "clear", "streamSid": "MZ1"})


def test_join_paths_counts_latency_loss_duplicates_and_reordering() -> None:
    sent = [10.0 + i * 0.02 for i in range(6)]
    agent = {
        "session": 3,
        "ready": sent[1],  # SettingsApplied sent as frame 1 left: frame 0 was held until then
        # frame 2 never arrived, 4 arrived before 3, 5 twice; 1 ms after it was sent
        "heard": [[0, f, sent[f] + 0.001] for f in (0, 1, 4, 3, 5, 5)],
        "said": [20.0, 20.1, 20.2, 20.3, 20.4, 20.5, 20.6, 20.7],
    }
    received: list[tuple[float, str | bytes]] = [
        (20.002, media((3, 0))),
        (20.102, media((3, 1))),
        (20.202, CLEAR),  # chunks 2 and 3 dropped by a barge-in: not lost
        (20.402, media((3, 4))),
        (20.602, media((3, 6))),  # chunk 5 missing with no clear: lost
        (20.603, media((3, 6))),  # duplicated
        (20.702, media((3, 7), (9, 0))),  # and a stamp no one sent
    ]
    paths = join_paths([(0, FakeProbe(sent, received))], [agent], stamped=6)
    assert paths.caller_frames_sent == 6 and paths.caller_frames_lost == 1
    assert paths.caller_frames_duplicated == 1 and paths.caller_frames_reordered == 1
    assert paths.caller_to_agent_ms == pytest.approx([1.0] * 4) and paths.caller_held_ms == pytest.approx([1.0])
    assert paths.agent_chunks_received == 5 and paths.agent_chunks_lost == 1
    assert paths.agent_chunks_duplicated == 1 and paths.agent_chunks_reordered == 0
    assert paths.unknown_stamps == 1 and paths.sessions_missing == 0
    assert paths.agent_to_caller_ms == pytest.approx([2.0] * 5)
    assert paths.lost == 2 and paths.reordered == 1
    # a call whose agent session never wrote its record: every stamped frame is lost, and said so
    missing = join_paths([(0, FakeProbe(sent, [])), (1, FakeProbe(sent, []))], [agent], stamped=6)
    assert missing.sessions_missing == 1 and missing.caller_frames_lost == 1 + 6


# --- the floor: every figure next to the bridge's ---------------------------------------------


def measured(side: Side, cpu_s: float, c2a: list[float], lost: int) -> Report:
    result = CallResult("CA1", "<Response/>", "ws://x", {})
    result.first_media_s = 0.012
    report = Report(calls=2, seconds=30, results=[result, result], side=side, metrics=MetricsSnapshot())
    report.process = BridgeProcess(1, rss_idle_mib=70.0, rss_peak_mib=70.25, pids=[1], cpu_s=cpu_s)
    report.paths = PathFigures(caller_to_agent_ms=c2a, caller_frames_sent=100, caller_frames_lost=lost)
    return report


def test_the_floor_comparison_prints_differences_and_ratios() -> None:
    bridge = measured(Side.BRIDGE, cpu_s=0.4, c2a=[1.0, 2.0, 4.0], lost=0)
    bridge.floor = measured(Side.FLOOR, cpu_s=0.5, c2a=[0.5, 1.0, 1.5], lost=3)
    text = bridge.render()
    assert "the floor (app.devtools.minimal_relay)" in text and "floor process, from /proc:" in text
    assert text.count("bridge, from /metrics") == 1  # the floor has no /metrics
    assert re.search(r"caller -> agent, ms p99\s+4\.000\s+1\.500\s+\+2\.50\s+2\.67x", text), text
    # 0.4 CPU-s over 1 call-minute against 0.5
    assert re.search(r"CPU-s per call-minute\s+0\.400\s+0\.500\s+0\.80x", text), text
    assert re.search(r"memory per call, KiB\s+128\.0\s+128\.0\s+1\.00x", text), text
    assert re.search(r"frames lost\s+0\s+3\s*$", text, re.MULTILINE), text
    # nothing measured on either side: a dash, never a ratio of nothing
    assert re.search(r"agent -> caller, ms p50\s+-\s+-\s*$", text, re.MULTILINE), text
    assert no_nan(text) and "inf" not in text


def test_process_figures_are_summed_over_the_workers() -> None:
    me = os.getpid()
    assert process_tree(me)[0] == me
    process = BridgeProcess(me, rss_idle_mib=0.0, rss_peak_mib=0.0)
    process.start()
    sum(i * i for i in range(200_000))  # some CPU of this process
    process.stop()
    assert process.pids[0] == me and process.cpu_s >= 0.0
    assert tree_rss_mib([me]) == rss_mib(me) > 0
    assert tree_cpu([me, 2**22 + 1]).keys() == {me}  # a process gone meanwhile is skipped


def test_rounds_pool_samples_add_cpu_and_keep_the_largest_growth() -> None:
    first = measured(Side.BRIDGE, cpu_s=0.4, c2a=[1.0, 2.0], lost=0)
    second = measured(Side.BRIDGE, cpu_s=0.6, c2a=[3.0], lost=2)
    assert second.process is not None
    second.process.rss_peak_mib = 70.5
    first.metrics = MetricsSnapshot.parse(exposition([0.0004], ["caller_hangup"]))
    second.metrics = MetricsSnapshot.parse(exposition([0.002], ["caller_hangup", "agent_error"]))
    pooled = Report.pooled([first, second])
    assert pooled.rounds == 2 and pooled.calls == 2 and len(pooled.results) == 4
    assert pooled.paths is not None and pooled.paths.caller_to_agent_ms == [1.0, 2.0, 3.0]
    assert pooled.paths.caller_frames_sent == 200 and pooled.paths.lost == 2
    assert pooled.process is not None and pooled.process.cpu_s == pytest.approx(1.0)
    assert pooled.metrics is not None
    assert pooled.metrics.by_label("callbridge_calls_total", "outcome") == {"caller_hangup": 2.0, "agent_error": 1.0}
    assert pooled.metrics.histogram("callbridge_barge_in_clear_seconds").count == 2
    text = pooled.render()
    assert "2 concurrent calls x 30 s, 2 rounds" in text and "calls completed 4/4" in text
    assert "CPU 1.00 s for 2.0 call-minutes = 0.500 CPU-s per call-minute" in text
    assert "256 KiB per concurrent call" in text  # (70.5 - 70) MiB over 2 calls, the larger growth
