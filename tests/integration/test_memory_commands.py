"""The memory benchmarks, in runs short enough for the suite, so neither command can rot:
``soak-call`` places a real call with barge-ins through a probed bridge and prints its series
and slopes; ``memory`` prints what a call costs by component; the probe answers a sample."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.cli import main
from app.devtools import memory_profile
from app.devtools.heap_probe import Figures
from app.devtools.memory_profile import component
from app.devtools.probed_bridge import probed_bridge
from app.devtools.soak_call import barge_in_audio, slope_per_minute


def number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found is not None, text
    return int(found.group(1))


@pytest.mark.timeout(30)
def test_soak_call_runs_a_short_call_with_barge_ins_and_prints_its_slopes(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["soak-call", "--minutes", "0.2", "--barge-in-every", "2", "--sample-every", "2", "--settle-minutes", "0.05"]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "ended by caller" in printed and "0 protocol violations" in printed, printed
    clears, barge_ins = number(r"(\d+) clears", printed), number(r"barge-ins (\d+)", printed)
    assert clears >= 2 and barge_ins >= 2, printed  # 12 s, a barge-in every 2: most of them landed
    assert re.search(r"RSS\s+[+-]\d+\.\d\d KiB per minute", printed), printed
    assert re.search(r"traced by tracemalloc\s+[+-]\d+\.\d\d KiB per minute", printed), printed
    assert re.search(r"^\s+idle\s+\d", printed, re.MULTILINE) and re.search(r"^\s+after\s+\d", printed, re.MULTILINE)


@pytest.mark.timeout(30)
def test_the_probed_bridge_answers_a_sample_and_a_snapshot(tmp_path: Path) -> None:
    with probed_bridge(tmp_path, frames=1, log_level="warning") as bridge:
        before = bridge.probe.sample("before")  # tracing starts here
        figures = bridge.probe.sample("one", snapshot=True)
        snapshot = bridge.probe.snapshot("one")
    assert isinstance(figures, Figures) and figures.label == "one" and figures.at > before.at
    assert figures.rss_kib > 10_000 and figures.gc_objects > 10_000 and figures.allocated_blocks > 10_000
    assert figures.tracemalloc_overhead > 0 and 0 <= figures.traced < figures.rss_kib * 1024
    assert all(component(stat.traceback[-1].filename) for stat in snapshot.statistics("filename"))


def test_barge_in_audio_has_a_pause_then_speech_every_period() -> None:
    audio = barge_in_audio(9.0, 3.0)
    assert len(audio) == 9 * 8000
    period = audio[: 3 * 8000]
    assert set(period[:8000]) == {0xFF}  # the pause: mu-law silence
    assert len(set(period[2 * 8000 :])) > 10  # the phrase
    assert audio[3 * 8000 : 6 * 8000] == period


def test_slope_is_per_minute_and_needs_two_points() -> None:
    assert slope_per_minute([(0.0, 100.0), (60.0, 160.0), (120.0, 220.0)]) == pytest.approx(60.0)
    assert slope_per_minute([(30.0, 5.0)]) is None


def test_memory_command_refuses_nonsense() -> None:
    assert main(["memory", "--calls", "0"]) == 2
    assert main(["soak-call", "--barge-in-every", "0.5"]) == 2


@pytest.mark.timeout(45)
def test_memory_command_prints_the_cost_of_a_call_by_component(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(memory_profile, "WARM_UP_CALLS", 1)
    monkeypatch.setattr(memory_profile, "WARM_UP_SECONDS", 1.0)
    monkeypatch.setattr(memory_profile, "AFTER_CALLS_WAIT_S", 0.5)
    code = main(["memory", "--calls", "2", "--seconds", "2", "--ramp", "0.2", "--frames", "2", "--top", "5"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "calls failed 0 of 4" in printed, printed
    assert re.search(r"RSS \(VmRSS\)\s+-?\d+\.\d", printed), printed
    assert re.search(r"traced: every block Python allocated and still holds\s+\d+\.\d", printed), printed
    table = printed.split("traced, by component")[1]
    assert "websockets" in table and "app/bridge.py" in table, printed
