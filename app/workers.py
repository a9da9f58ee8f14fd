"""What a worker process is told by the supervisor (``callbridge serve --workers N``), how many
workers a machine gets by default, and the instance-wide call count behind MAX_CALLS.

The supervisor (``app.serving.supervise``) hands each worker its settings through the
environment: the same as its own plus the variables below, which are not configuration an
operator sets.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from app import machine_db

ENV_WORKER_ID = "CALLBRIDGE_WORKER_ID"  # 1..N; a replacement takes the id of the worker it replaces
ENV_LISTEN_FD = "CALLBRIDGE_LISTEN_FD"  # the listening socket, bound once by the supervisor
ENV_PARENT_FD = "CALLBRIDGE_PARENT_FD"  # read end of a pipe: end of file means the supervisor is gone
ENV_LOCAL_AGENT_URL = "CALLBRIDGE_LOCAL_AGENT_URL"  # offline mode: the supervisor's one local agent
ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own name; also holds machine_db

MAX_WORKERS = 64
"""Upper bound of WORKERS: each worker is a Python process (~60 MB), and past the machine's
cores more workers only add memory."""


@dataclass(frozen=True)
class WorkerContext:
    """A worker's place in the instance."""

    worker_id: int
    listen_fd: int
    parent_fd: int | None
    multiproc_dir: Path
    local_agent_url: str | None

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> WorkerContext:
        parent = env.get(ENV_PARENT_FD)
        return cls(
            worker_id=int(env[ENV_WORKER_ID]),
            listen_fd=int(env[ENV_LISTEN_FD]),
            parent_fd=int(parent) if parent else None,
            multiproc_dir=Path(env[ENV_MULTIPROC_DIR]),
            local_agent_url=env.get(ENV_LOCAL_AGENT_URL) or None,
        )


# --- how many workers ----------------------------------------------------------------------


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU quota of this process's cgroup in cores (``docker run --cpus``, a Kubernetes
    CPU limit), or None when there is none. cgroup v2 ``cpu.max`` of the group and each of
    its ancestors (the smallest wins), else cgroup v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2, the unified hierarchy
            here = (root / group.lstrip("/")).resolve()
            while True:
                limit = _v2_limit(here / "cpu.max")
                if limit is not None:
                    limits.append(limit)
                if here == root or root not in here.parents:
                    break
                here = here.parent
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                limit = _v1_limit(mount / group.lstrip("/")) or _v1_limit(mount)
                if limit is not None:
                    limits.append(limit)
                    break
    return min(limits) if limits else None


def _v2_limit(path: Path) -> float | None:
    try:
        quota, _, period = path.read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(quota) / int(period)


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def default_workers(cpus: int | None = None, quota: float | None = None) -> int:
    """The cores this process may use: its CPU affinity (``taskset``, cpusets), capped by the
    cgroup quota rounded down (a worker more than the quota would have every worker throttled
    by CFS in turn, a stall in the audio of every call), at least 1, at most MAX_WORKERS."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if quota is None:
        quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, min(cpus, MAX_WORKERS))


# --- MAX_CALLS for the whole instance -------------------------------------------------------


class InstanceLoad:
    """The calls of every worker, for MAX_CALLS per instance (not per worker): each worker
    writes its own count of calls in progress into the machine's shared file, and a webhook
    admits a call only if all workers' calls plus the calls admitted but whose stream has not
    started (on whichever worker it lands) stay under MAX_CALLS, in one transaction."""

    def __init__(self, path: Path, worker_id: int, hold_seconds: float) -> None:
        self._db = machine_db.connect(path)
        self.worker_id = worker_id
        self.hold_seconds = hold_seconds

    def admit(self, call_sid: str, max_calls: int, now: float | None = None, extra_hold: float = 0.0) -> bool:
        """``extra_hold``: seconds the place is held beyond ``hold_seconds`` (an outbound call rings
        and is screened for a machine before its stream starts)."""
        now = time.time() if now is None else now
        with machine_db.transaction(self._db) as db:
            db.execute("DELETE FROM admissions WHERE at < ?", (now - self.hold_seconds,))
            (active,) = db.execute("SELECT COALESCE(SUM(active), 0) FROM worker_calls").fetchone()
            (admitted,) = db.execute("SELECT COUNT(*) FROM admissions WHERE call_sid != ?", (call_sid,)).fetchone()
            if active + admitted >= max_calls:
                return False
            db.execute("INSERT OR REPLACE INTO admissions (call_sid, at) VALUES (?, ?)", (call_sid, now + extra_hold))
        return True

    def rekey(self, old: str, new: str) -> None:
        """The admission made under ``old`` (before Twilio gave the call its CallSid) is ``new``'s."""
        self._db.execute("UPDATE OR REPLACE admissions SET call_sid = ? WHERE call_sid = ?", (new, old))

    def release(self, call_sid: str) -> None:
        """The call will never stream (not answered, or dialling failed): its place is free."""
        self._db.execute("DELETE FROM admissions WHERE call_sid = ?", (call_sid,))

    def claim(
        self, call_sid: str, max_calls: int, active_after: int, now: float | None = None, *, refuse_new: bool = False
    ) -> bool:
        """A stream redeemed its token: it becomes one of this worker's calls (``active_after``
        of them once it is counted). A call the webhook admitted (on any worker) has its place
        already; one that was not (its webhook went to another replica, or its admission
        expired) needs a free place under MAX_CALLS, and none is given while draining
        (``refuse_new``). One transaction, as ``admit``."""
        now = time.time() if now is None else now
        with machine_db.transaction(self._db) as db:
            db.execute("DELETE FROM admissions WHERE at < ?", (now - self.hold_seconds,))
            admitted = db.execute("DELETE FROM admissions WHERE call_sid = ?", (call_sid,)).rowcount > 0
            if not admitted and refuse_new:
                return False
            if not admitted:
                (others,) = db.execute(
                    "SELECT COALESCE(SUM(active), 0) FROM worker_calls WHERE worker != ?", (self.worker_id,)
                ).fetchone()
                (waiting,) = db.execute("SELECT COUNT(*) FROM admissions").fetchone()
                if others + (active_after - 1) + waiting >= max_calls:
                    return False
            db.execute(
                "INSERT OR REPLACE INTO worker_calls (worker, active) VALUES (?, ?)", (self.worker_id, active_after)
            )
        return True

    def waiting(self, now: float | None = None) -> int:
        """Calls admitted (by any worker) whose stream has not started, their holds not lapsed."""
        now = time.time() if now is None else now
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM admissions WHERE at >= ?", (now - self.hold_seconds,)
        ).fetchone()
        return int(count)

    def set_active(self, calls: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO worker_calls (worker, active) VALUES (?, ?)", (self.worker_id, calls))

    def active(self) -> int:
        """Calls in progress on every worker of the instance."""
        (total,) = self._db.execute("SELECT COALESCE(SUM(active), 0) FROM worker_calls").fetchone()
        return int(total)

    def close(self) -> None:
        self._db.close()


def forget_worker(path: Path, worker_id: int) -> None:
    """A dead worker's calls ended with it (the supervisor, before starting its replacement)."""
    db = machine_db.connect(path)
    try:
        db.execute("DELETE FROM worker_calls WHERE worker = ?", (worker_id,))
    finally:
        db.close()
