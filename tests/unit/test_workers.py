"""Default worker count (affinity, cgroup quota) and the instance-wide call count."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import machine_db
from app.workers import InstanceLoad, cgroup_cpu_limit, default_workers, forget_worker


def cgroup_tree(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "self-cgroup"
    proc.write_text(proc_line)
    return root, proc


def test_cgroup_v2_quota_in_the_group_or_an_ancestor(tmp_path: Path) -> None:
    root, proc = cgroup_tree(
        tmp_path,
        "0::/kubepods/pod1/c1\n",
        {"kubepods/pod1/cpu.max": "250000 100000\n", "kubepods/pod1/c1/cpu.max": "max 100000\n"},
    )
    assert cgroup_cpu_limit(root, proc) == 2.5


def test_cgroup_v2_in_a_container_namespace(tmp_path: Path) -> None:
    root, proc = cgroup_tree(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v2_without_a_limit(tmp_path: Path) -> None:
    root, proc = cgroup_tree(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root, proc = cgroup_tree(
        tmp_path,
        "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_limit(root, proc) == 3.0


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    root, proc = cgroup_tree(
        tmp_path, "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    )
    assert cgroup_cpu_limit(root, proc) is None


@pytest.mark.parametrize(
    ("cpus", "quota", "expected"), [(8, None, 8), (8, 2.5, 2), (8, 0.5, 1), (2, 6.0, 2), (200, None, 64)]
)
def test_default_workers(cpus: int, quota: float | None, expected: int) -> None:
    assert default_workers(cpus, quota) == expected


def test_max_calls_holds_for_the_instance(tmp_path: Path) -> None:
    path = machine_db.create(tmp_path)
    one, two = InstanceLoad(path, 1, hold_seconds=10), InstanceLoad(path, 2, hold_seconds=10)
    try:
        one.set_active(2)
        assert two.admit("CA-a", max_calls=3, now=100)
        assert not one.admit("CA-b", max_calls=3, now=100)  # 2 calls + 1 admitted on the other worker
        assert two.claim("CA-a", max_calls=3, active_after=1, now=100)  # its stream lands on worker 2
        assert one.active() == 3
        assert not one.admit("CA-b", max_calls=3, now=100)
        one.set_active(1)  # a call on worker 1 ended
        assert one.admit("CA-b", max_calls=3, now=101)
        assert not two.admit("CA-c", max_calls=3, now=102)
        assert two.admit("CA-c", max_calls=3, now=112)  # CA-b's stream never came: its hold lapsed
        forget_worker(path, 1)  # worker 1 died with its calls
        assert two.active() == 1
    finally:
        one.close()
        two.close()


def test_a_stream_takes_a_place_only_when_its_call_was_admitted_or_one_is_free(tmp_path: Path) -> None:
    path = machine_db.create(tmp_path)
    one, two = InstanceLoad(path, 1, hold_seconds=10), InstanceLoad(path, 2, hold_seconds=10)
    try:
        one.set_active(1)
        assert two.admit("CA-a", max_calls=2, now=100)  # the last place, held for CA-a
        assert not two.claim("CA-x", max_calls=2, active_after=1, now=100)  # not admitted, no place left
        assert two.active() == 1  # a refused claim counts nothing
        assert one.claim("CA-a", max_calls=2, active_after=2, now=100)  # admitted on worker 2, streams on 1
        assert one.active() == 2
        assert not two.admit("CA-b", max_calls=2, now=100)
        one.set_active(1)
        assert two.claim("CA-y", max_calls=2, active_after=1, now=100)  # a free place: a stream from elsewhere
        assert not one.claim("CA-z", max_calls=2, active_after=2, now=100)
        assert two.admit("CA-c", max_calls=3, now=100)
        assert not one.claim("CA-z", max_calls=3, active_after=2, now=105)  # CA-c holds the last place
        assert one.claim("CA-z", max_calls=3, active_after=2, now=111)  # CA-c's hold lapsed
    finally:
        one.close()
        two.close()
