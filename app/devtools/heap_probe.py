"""``callbridge serve`` with its memory open to inspection, for the memory benchmarks.

RSS alone cannot say what a call's memory is spent on, and the bridge has no debug endpoint
(nor should it: a heap dump is no business of a public port). So the benchmarks start the
bridge through this module instead (``python -m app.devtools.heap_probe --dir DIR``): it runs
``serve`` exactly as the CLI does (or, with ``--floor``, the load test's floor,
``app.devtools.minimal_relay``), and starts ``tracemalloc`` at the first sample asked for
(unless ``--frames 0``). On SIGUSR2 the process writes its memory figures (``Figures``) to DIR
as JSON; on SIGUSR1 a tracemalloc snapshot too. The parent names each request by writing DIR/request first and waits for
DIR/<name>.done (``ProbeClient``).

Python runs signal handlers on the main thread between bytecodes, so the figures are taken on
the event loop's own thread, while the calls are frozen mid-flight.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import re
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

REQUEST_FILE = "request"
TYPES_KEPT = 60  # the most numerous object types written with each sample
MALLINFO_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later): what malloc holds and what of it is free."""

    _fields_ = [(name, ctypes.c_size_t) for name in (*MALLINFO_FIELDS, "keepcost")]


def malloc_figures() -> dict[str, int]:
    """glibc malloc's own counts in bytes (empty where there is no glibc 2.33+): ``uordblks`` in
    use, ``fordblks`` free but kept in the heap, ``hblkhd`` in mmapped blocks."""
    name = ctypes.util.find_library("c")
    if not name:
        return {}
    try:
        libc = ctypes.CDLL(name)
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {key: int(getattr(info, key)) for key in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost")}


PYMALLOC_LINES = (
    re.compile(r"^# bytes (in allocated blocks|in available blocks|lost to [a-z ]+?)\s+=\s+([\d,]+)"),
    re.compile(r"^\d+ (arenas|unused pools) \* \d+ bytes\S*\s+=\s+([\d,]+)"),
)


def pymalloc_figures() -> dict[str, int]:
    """pymalloc's breakdown of its arenas (``sys._debugmallocstats``, which writes to the C
    stderr): its arenas, bytes in blocks in use, in free blocks of used pools, in unused pools,
    and lost to headers and rounding. Empty where the interpreter has no such function, and
    under tracemalloc (whose hooks replace pymalloc's, so it reports nothing)."""
    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:
        return {}
    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    found: dict[str, int] = {}
    for line in text.splitlines():
        for pattern in PYMALLOC_LINES:
            match = pattern.match(line)
            if match and match.group(1).replace(" ", "_") not in found:  # the first table's figures
                found[match.group(1).replace(" ", "_")] = int(match.group(2).replace(",", ""))
    return found


def proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in KiB (from /proc)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


@dataclass
class Figures:
    """One sample of the process's memory, every figure in bytes unless its name says KiB."""

    label: str
    at: float  # time.monotonic() of the sample (one clock for the whole machine)
    status_kib: dict[str, int]
    traced: int  # tracemalloc: bytes of the blocks alive now (0 when not tracing)
    traced_peak: int
    tracemalloc_overhead: int  # what tracemalloc itself uses to keep its traces
    allocated_blocks: int  # sys.getallocatedblocks(): Python's memory blocks in use
    gc_objects: int
    threads: int
    malloc: dict[str, int] = field(default_factory=dict)
    pymalloc: dict[str, int] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)  # the most numerous gc-tracked types

    @classmethod
    def read(cls, path: Path) -> Figures:
        return cls(**json.loads(path.read_text()))

    @property
    def rss_kib(self) -> int:
        return self.status_kib.get("VmRSS", 0)


def _type_name(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def take_figures(label: str) -> Figures:
    """This process's memory now, after a full collection (cyclic garbage is no one's memory)."""
    gc.collect()
    status = proc_status_kib()
    traced, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
    objects = gc.get_objects()
    types = Counter(_type_name(obj) for obj in objects)
    count = len(objects)
    del objects
    return Figures(
        label=label,
        at=time.monotonic(),
        status_kib=status,
        traced=traced,
        traced_peak=peak,
        tracemalloc_overhead=tracemalloc.get_tracemalloc_memory(),
        allocated_blocks=sys.getallocatedblocks(),
        gc_objects=count,
        threads=len(os.listdir("/proc/self/task")),
        malloc=malloc_figures(),
        pymalloc=pymalloc_figures(),
        types=dict(types.most_common(TYPES_KEPT)),
    )


class Probe:
    """The bridge side: answers SIGUSR2 (figures) and SIGUSR1 (figures and a snapshot).

    Tracing starts at the first request, not with the process: the traces are then only what
    the bridge allocates from that sample on (the calls, not the imports and start-up before
    them), which keeps snapshots small and tracemalloc's own cost down."""

    def __init__(self, directory: Path, frames: int) -> None:
        self.directory = directory
        self.frames = frames

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_signal)
        signal.signal(signal.SIGUSR2, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        label = (self.directory / REQUEST_FILE).read_text().strip() or "sample"
        if self.frames > 0 and not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)
        figures = take_figures(label)
        if signum == signal.SIGUSR1 and tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot()
            snapshot.dump(str(self.directory / f"{label}.snapshot"))
            del snapshot
        (self.directory / f"{label}.json").write_text(json.dumps(asdict(figures)))
        (self.directory / f"{label}.done").touch()


@dataclass
class ProbeClient:
    """The benchmark side: asks the probed bridge (``pid``) for a sample, and waits for it."""

    pid: int
    directory: Path
    timeout: float = 60.0

    def sample(self, label: str, snapshot: bool = False) -> Figures:
        done = self.directory / f"{label}.done"
        done.unlink(missing_ok=True)
        (self.directory / REQUEST_FILE).write_text(label)
        os.kill(self.pid, signal.SIGUSR1 if snapshot else signal.SIGUSR2)
        deadline = time.monotonic() + self.timeout
        while not done.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the probed bridge (pid {self.pid}) did not answer {label!r} in {self.timeout} s")
            time.sleep(0.05)
        return Figures.read(self.directory / f"{label}.json")

    def snapshot(self, label: str) -> tracemalloc.Snapshot:
        """The snapshot taken with ``sample(label, snapshot=True)``."""
        return tracemalloc.Snapshot.load(str(self.directory / f"{label}.snapshot"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.devtools.heap_probe")
    parser.add_argument("--dir", type=Path, required=True, help="where requests are read and samples written")
    parser.add_argument("--frames", type=int, default=1, help="frames kept per allocation (0: no tracemalloc)")
    parser.add_argument(
        "--floor", metavar="AGENT_URL", help="run the floor (app.devtools.minimal_relay) on HOST:PORT instead"
    )
    args = parser.parse_args(argv)
    Probe(args.dir, args.frames).install()
    with contextlib.suppress(KeyboardInterrupt):
        if args.floor:
            from app.devtools import minimal_relay

            where = ["--host", os.environ.get("HOST", "127.0.0.1"), "--port", os.environ["PORT"]]
            return minimal_relay.main(["--agent-url", args.floor, *where])
        from app.cli import main as cli_main

        return cli_main(["serve", "--workers", "1"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
