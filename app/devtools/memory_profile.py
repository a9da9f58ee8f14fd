"""``callbridge memory``: what one concurrent call costs the bridge, and on what.

The load test says how much the bridge's RSS grows per concurrent call; this says where that
memory goes. It starts the bridge the load test's way but through ``heap_probe``, warms it up
with a few calls (first-call imports and caches are no call's cost), samples it at idle, places
the load test's calls (speech, pauses, barge-ins), samples it half way through them and once
after they have ended; the difference busy minus idle, divided by the calls, is the cost of
one call. It does so twice, on a fresh bridge each time:

- without tracemalloc, for the RSS the load test sees, split into what pymalloc (objects of
  512 bytes and less) and malloc (the rest, and C libraries) hold, in use or free;
- with tracemalloc, for what Python allocated, by component (library or bridge module), file,
  line, the bridge code that asked for it (the innermost frame in ``app/``) and traceback, with
  the count of objects by type.

With ``--floor`` the load test's floor is measured the same way first, and the bridge is
printed against it by component. tracemalloc's own traces are shown apart, as not a call's.
Kernel socket buffers are in no process's RSS: the machine's TCP total is shown beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import linecache
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from tracemalloc import Statistic

import app
from app.devtools.heap_probe import Figures, proc_status_kib
from app.devtools.loadtest import caller_script
from app.devtools.probed_bridge import ProbedBridge, probed_bridge
from app.devtools.simulated_caller import SimulatedCaller

APP_ROOT = Path(app.__file__).resolve().parent
PROBE_FILES = ("tracemalloc.py", "heap_probe.py")  # the measurement's own allocations
WARM_UP_CALLS = 4
WARM_UP_SECONDS = 4.0
AFTER_CALLS_WAIT_S = 3.0  # after the last caller hung up: the bridge ends its calls
KIB = 1024

Key = Callable[[tracemalloc.Traceback], str]


def component(filename: str) -> str:
    """The package, bridge module or standard-library module a source file belongs to."""
    path = Path(filename)
    with contextlib.suppress(ValueError):
        return "app/" + path.resolve().relative_to(APP_ROOT).as_posix()
    parts = path.parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    if "asyncio" in parts:
        return "asyncio"
    if filename.startswith("<"):
        return filename
    return "stdlib " + path.stem


def in_app(filename: str) -> bool:
    return filename.startswith(str(APP_ROOT)) and not filename.endswith(PROBE_FILES)


def by_component(tb: tracemalloc.Traceback) -> str:
    return component(tb[-1].filename)


def by_file(tb: tracemalloc.Traceback) -> str:
    return _short(tb[-1].filename)


def by_line(tb: tracemalloc.Traceback) -> str:
    return _at(tb[-1])


def _at(frame: tracemalloc.Frame) -> str:
    """``file:line  source``, the source read now (run from the tree that was measured)."""
    text = " ".join(linecache.getline(frame.filename, frame.lineno).split())
    return f"{_short(frame.filename)}:{frame.lineno}  {text}"


def by_app_frame(tb: tracemalloc.Traceback) -> str:
    """The innermost bridge line on the allocation's stack: the bridge code that asked for it."""
    frames = list(tb)
    for depth, frame in enumerate(reversed(frames)):
        if in_app(frame.filename):
            inner = f"(in {component(frames[-1].filename)}) " if depth else ""
            return f"{inner}{_at(frame)}"
    return f"no bridge frame (in {component(frames[-1].filename)})"


def by_traceback(tb: tracemalloc.Traceback) -> str:
    return " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in reversed(tb))


def _short(filename: str) -> str:
    parts = Path(filename).parts
    with contextlib.suppress(ValueError):
        return "app/" + Path(filename).resolve().relative_to(APP_ROOT).as_posix()
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return "/".join(parts[-2:]) if "asyncio" in parts else parts[-1]


@dataclass
class Totals:
    """Bytes and blocks of a snapshot's traces, by a key of their tracebacks."""

    size: Counter[str] = field(default_factory=Counter)
    blocks: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, stats: list[tracemalloc.Statistic], key: Key) -> Totals:
        """``stats``: a snapshot's statistics by traceback (far fewer than its traces)."""
        totals = cls()
        for stat in stats:
            tb = stat.traceback
            if tb[-1].filename.endswith(PROBE_FILES):
                continue
            name = key(tb)
            totals.size[name] += stat.size
            totals.blocks[name] += stat.count
        return totals

    def minus(self, before: Totals) -> Totals:
        out = Totals()
        for name in self.size.keys() | before.size.keys():
            out.size[name] = self.size[name] - before.size[name]
            out.blocks[name] = self.blocks[name] - before.blocks[name]
        return out

    def total(self) -> int:
        return sum(self.size.values())


@dataclass
class Pass:
    """One bridge under the calls: its figures at idle, half way through the calls, after them."""

    idle: Figures
    busy: Figures
    after: Figures
    peak_rss_kib: int = 0  # the most RSS seen during the calls, sampled as the load test does
    kernel_tcp_kib: tuple[int, int] = (0, 0)  # the whole machine's TCP buffers at idle and busy
    failures: list[str] = field(default_factory=list)


@dataclass
class Run:
    """What the benchmark measured: RSS untraced, then the same calls traced."""

    calls: int
    seconds: float
    frames: int
    plain: Pass  # no tracemalloc: the RSS the load test would see, with malloc's and pymalloc's figures
    traced: Pass
    changes: dict[str, Totals]  # traced busy minus idle, by each key
    retained: Totals  # traced after minus idle, by component
    top: int = 20
    floor: Floor | None = None  # --floor: the same calls through the load test's floor


@dataclass
class Floor:
    """The floor (``app.devtools.minimal_relay``) under the same calls, measured the same way."""

    plain: Pass
    traced: Pass
    by_component: Totals


def kernel_tcp_kib() -> int:
    """The kernel's memory for every TCP socket of this machine (/proc/net/sockstat, in pages)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("mem") + 1]) * 4  # 4 KiB pages
    return 0


async def _place_calls(bridge: ProbedBridge, calls: int, seconds: float, ramp: float) -> list[str]:
    """Every call at once (spread over ``ramp``); what failed, one line each."""
    audio = caller_script(seconds)

    async def one(delay: float) -> str:
        await asyncio.sleep(delay)
        try:
            await SimulatedCaller(bridge.url, bridge.token, tail=1.0, max_tail=5.0).run(audio)
        except Exception as exc:  # reported, not raised: the other calls still count
            return " ".join(f"{type(exc).__name__}: {exc}".split())
        return ""

    return [failure for failure in await asyncio.gather(*(one(ramp * i / calls) for i in range(calls))) if failure]


async def _busy(bridge: ProbedBridge, calls: int, seconds: float, ramp: float, snapshot: bool) -> Pass:
    """The calls, sampled half way through them, the RSS peak watched all along (except while
    the probe counts objects: its list of every object is the probe's memory, not a call's)."""
    placing = asyncio.create_task(_place_calls(bridge, calls, seconds, ramp))
    peak = 0
    probing = False

    async def watch() -> None:
        nonlocal peak
        while True:
            with contextlib.suppress(OSError):
                rss = proc_status_kib(bridge.pid).get("VmRSS", 0)
                if not probing:
                    peak = max(peak, rss)
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(ramp + seconds / 2)
    tcp = kernel_tcp_kib()
    probing = True
    busy = await asyncio.to_thread(bridge.probe.sample, "busy", snapshot)
    await asyncio.sleep(0.3)  # a reading begun during the sample is not taken either
    probing = False
    failures = await placing
    watcher.cancel()
    return Pass(busy, busy, busy, peak_rss_kib=peak, kernel_tcp_kib=(0, tcp), failures=failures)


def _one_pass(
    calls: int, seconds: float, ramp: float, frames: int, floor: bool = False
) -> tuple[Pass, dict[str, list[Statistic]]]:
    """Warm-up, idle, calls, after, on a bridge (or floor) of its own; with ``frames``, the
    snapshots' statistics by traceback too."""
    snapshot = frames > 0
    with (
        tempfile.TemporaryDirectory(prefix="callbridge-memory-") as tmp,
        probed_bridge(Path(tmp), frames, floor=floor) as bridge,
    ):
        asyncio.run(_place_calls(bridge, WARM_UP_CALLS, WARM_UP_SECONDS, 0.5))
        if snapshot:  # tracing starts here; the first snapshot's own memory is not counted as the calls'
            bridge.probe.sample("warm", snapshot=True)
        time.sleep(AFTER_CALLS_WAIT_S)
        idle_tcp = kernel_tcp_kib()
        idle = bridge.probe.sample("idle", snapshot)
        result = asyncio.run(_busy(bridge, calls, seconds, ramp, snapshot))
        time.sleep(AFTER_CALLS_WAIT_S)
        result.idle, result.kernel_tcp_kib = idle, (idle_tcp, result.kernel_tcp_kib[1])
        result.after = bridge.probe.sample("after", snapshot)
        labels = ("idle", "busy", "after") if snapshot else ()
        stats = {label: bridge.probe.snapshot(label).statistics("traceback") for label in labels}
    return result, stats


def measure(calls: int, seconds: float, ramp: float, frames: int, top: int = 20, floor: bool = False) -> Run:
    """Without tracemalloc, then with it; with ``floor``, the floor the same way first."""
    floor_figures = None
    if floor:
        floor_plain, _ = _one_pass(calls, seconds, ramp, 0, floor=True)
        floor_traced, floor_stats = _one_pass(calls, seconds, ramp, frames, floor=True)
        by_component_change = Totals.of(floor_stats["busy"], by_component).minus(
            Totals.of(floor_stats["idle"], by_component)
        )
        floor_figures = Floor(floor_plain, floor_traced, by_component_change)
    plain, _ = _one_pass(calls, seconds, ramp, 0)
    traced, stats = _one_pass(calls, seconds, ramp, frames)
    keys: dict[str, Key] = {
        "component": by_component,
        "file": by_file,
        "line": by_line,
        "bridge code": by_app_frame,
        "traceback": by_traceback,
    }
    changes = {name: Totals.of(stats["busy"], key).minus(Totals.of(stats["idle"], key)) for name, key in keys.items()}
    retained = Totals.of(stats["after"], by_component).minus(Totals.of(stats["idle"], by_component))
    return Run(calls, seconds, frames, plain, traced, changes, retained, top, floor_figures)


def _per_call(value: float, calls: int) -> str:
    return f"{value / KIB / calls:9.1f}"


def _table(title: str, totals: Totals, calls: int, rows: int, width: int = 72) -> list[str]:
    out = [f"{title} (KiB per call, blocks per call):"]
    ranked = sorted(totals.size.items(), key=lambda item: -abs(item[1]))
    shown = 0
    for name, size in ranked[:rows]:
        if not size:
            continue
        shown += size
        label = name if len(name) <= width else name[: width - 3] + "..."
        out.append(f"  {label:<{width}} {_per_call(size, calls)} {totals.blocks[name] / calls:8.1f}")
    rest = totals.total() - shown
    if rest and len(ranked) > rows:
        out.append(f"  {'(the rest, ' + str(len(ranked) - rows) + ' more)':<{width}} {_per_call(rest, calls)}")
    return out


def _row(what: str, value: str) -> str:
    return f"  {what:<58} {value}"


def _plain_rows(run: Run) -> list[str]:
    n, p = run.calls, run.plain
    idle, busy = p.idle, p.busy

    def delta(get: Callable[[Figures], float]) -> float:
        return get(busy) - get(idle)

    def status(key: str) -> float:
        return delta(lambda f: f.status_kib.get(key, 0) * KIB)

    def pymalloc(key: str) -> float:
        return delta(lambda f: f.pymalloc.get(key, 0))

    def malloc(key: str) -> float:
        return delta(lambda f: f.malloc.get(key, 0))

    rows = [
        "RSS, without tracemalloc: busy (half way through the calls) minus idle, KiB per call:",
        _row(
            "RSS (VmRSS)",
            f"{_per_call(status('VmRSS'), n)}   (idle {idle.rss_kib / KIB:.1f} MiB, busy {busy.rss_kib / KIB:.1f} MiB)",
        ),
        _row(
            "  peak during the calls minus idle (the load test's figure)",
            _per_call((p.peak_rss_kib - idle.rss_kib) * KIB, n),
        ),
        _row("  anonymous (heaps, arenas, stacks: RssAnon)", _per_call(status("RssAnon"), n)),
        _row("  file-backed (code, libraries: RssFile)", _per_call(status("RssFile"), n)),
    ]
    if busy.pymalloc and idle.pymalloc:
        lost = ("lost_to_pool_headers", "lost_to_quantization", "lost_to_arena_alignment")
        rows += [
            _row("pymalloc arenas (objects of 512 B and less), all", _per_call(pymalloc("arenas"), n)),
            _row("  in blocks in use", _per_call(pymalloc("in_allocated_blocks"), n)),
            _row("  in free blocks of pools in use", _per_call(pymalloc("in_available_blocks"), n)),
            _row("  in unused pools", _per_call(pymalloc("unused_pools"), n)),
            _row("  lost to headers and rounding", _per_call(sum(pymalloc(key) for key in lost), n)),
        ]
    if busy.malloc and idle.malloc:
        rows += [
            _row("malloc heap (larger objects, buffers, C libraries), in use", _per_call(malloc("uordblks"), n)),
            _row("  free, kept in its heap", _per_call(malloc("fordblks"), n)),
            _row("  mmapped blocks (128 KiB and more)", _per_call(malloc("hblkhd"), n)),
        ]
    rows += [
        _row(
            "Python memory blocks (sys.getallocatedblocks), per call", f"{delta(lambda f: f.allocated_blocks) / n:9.0f}"
        ),
        _row("gc-tracked objects, per call", f"{delta(lambda f: f.gc_objects) / n:9.0f}"),
        _row("threads (idle, busy)", f"{idle.threads:>9} {busy.threads}"),
        _row(
            "kernel TCP buffers, whole machine, not in any RSS",
            _per_call((p.kernel_tcp_kib[1] - p.kernel_tcp_kib[0]) * KIB, n),
        ),
    ]
    return rows


def _traced_rows(run: Run) -> list[str]:
    n, t = run.calls, run.traced
    traced = t.busy.traced - t.idle.traced
    overhead = t.busy.tracemalloc_overhead - t.idle.tracemalloc_overhead
    return [
        f"with tracemalloc ({run.frames} frames per allocation), busy minus idle, KiB per call:",
        _row("traced: every block Python allocated and still holds", _per_call(traced, n)),
        _row("tracemalloc's own traces (not the bridge's)", _per_call(overhead, n)),
    ]


def _type_rows(run: Run, rows: int) -> list[str]:
    idle, busy = run.plain.idle.types, run.plain.busy.types
    changes = {name: busy.get(name, 0) - idle.get(name, 0) for name in busy.keys() | idle.keys()}
    ranked = sorted(changes.items(), key=lambda item: -item[1])[:rows]
    out = ["gc-tracked objects by type, per call (of the most numerous types):"]
    out += [f"  {name:<72} {count / run.calls:9.1f}" for name, count in ranked if count > 0]
    return out


def _floor_rows(run: Run, floor: Floor) -> list[str]:
    """Bridge and floor side by side: RSS, traced, and traced by component."""
    n = run.calls

    def rss(p: Pass) -> float:
        return (p.busy.rss_kib - p.idle.rss_kib) * KIB

    def peak(p: Pass) -> float:
        return (p.peak_rss_kib - p.idle.rss_kib) * KIB

    def traced(p: Pass) -> float:
        return p.busy.traced - p.idle.traced

    rows = [
        "bridge against the floor (app.devtools.minimal_relay), KiB per call:",
        f"  {'':<56} {'bridge':>9} {'floor':>9} {'difference':>11}",
    ]
    for what, get, bridge_pass, floor_pass in (
        ("RSS half way through the calls", rss, run.plain, floor.plain),
        ("RSS peak (the load test's figure)", peak, run.plain, floor.plain),
        ("traced by tracemalloc", traced, run.traced, floor.traced),
    ):
        mine, base = get(bridge_pass), get(floor_pass)
        rows.append(f"  {what:<56} {_per_call(mine, n)} {_per_call(base, n)} {_per_call(mine - base, n):>11}")
    bridge_parts, floor_parts = run.changes["component"], floor.by_component
    names = sorted(
        bridge_parts.size.keys() | floor_parts.size.keys(),
        key=lambda name: -abs(bridge_parts.size[name] - floor_parts.size[name]),
    )
    rows.append("  traced, by component (largest differences first):")
    shown = 0
    for name in names[: run.top]:
        mine, base = bridge_parts.size[name], floor_parts.size[name]
        shown += mine - base
        rows.append(f"    {name:<54} {_per_call(mine, n)} {_per_call(base, n)} {_per_call(mine - base, n):>11}")
    rest = bridge_parts.total() - floor_parts.total() - shown
    rows.append(f"    {'(the rest)':<54} {'':>9} {'':>9} {_per_call(rest, n):>11}")
    return rows


def render(run: Run) -> str:
    n = run.calls
    failures = run.plain.failures + run.traced.failures
    if run.floor is not None:
        failures += run.floor.plain.failures + run.floor.traced.failures
    rows = [
        f"callbridge memory: {n} concurrent calls x {run.seconds:g} s through the bridge, twice: without "
        f"tracemalloc (RSS), then with it (what Python allocated)"
        + (", the floor the same way before it" if run.floor is not None else "")
        + f"; calls failed {len(failures)} of {(4 if run.floor is not None else 2) * n}",
    ]
    rows += [f"  failure: {failure}" for failure, _ in Counter(failures).most_common(3)]
    rows += _plain_rows(run)
    rows += ["", *_traced_rows(run)]
    if run.floor is not None:
        rows += ["", *_floor_rows(run, run.floor)]
    for name, rows_shown, width in (
        ("component", 30, 72),
        ("file", run.top, 72),
        ("line", run.top, 120),
        ("bridge code", run.top, 120),
    ):
        rows += ["", *_table(f"traced, by {name}", run.changes[name], n, rows_shown, width)]
    rows += ["", *_table("traced, the largest tracebacks", run.changes["traceback"], n, max(5, run.top // 2), 150)]
    rows += ["", *_type_rows(run, run.top)]
    retained = run.retained.total()
    rows += [
        "",
        f"after the calls ended, still traced beyond idle: {retained / KIB:.1f} KiB in all "
        f"({retained / KIB / n:.2f} KiB per call placed); RSS {run.plain.after.rss_kib / KIB:.1f} MiB "
        f"untraced (idle {run.plain.idle.rss_kib / KIB:.1f})",
        *_table("  of which, by component", run.retained, n, 8)[1:],
    ]
    return "\n".join(rows)


def run(calls: int, seconds: float, ramp: float, frames: int, top: int, floor: bool = False) -> str:
    return render(measure(calls, seconds, ramp, frames, top, floor))
