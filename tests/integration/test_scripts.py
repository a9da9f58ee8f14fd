"""bin/ scripts on a machine where the project's virtualenv was made by a Python that cannot
run callbridge: they stop and say how to fix it, instead of reusing it forever."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_with_venv(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "bin" / "callbridge"), *args],
        env={**os.environ, "CALLBRIDGE_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def old_python() -> str | None:
    """A Python older than 3.11 on this machine, if there is one."""
    candidates = [shutil.which(f"python3.{minor}") for minor in (10, 9, 8)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.[0-9].*/bin/python3")), reverse=True)
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10.*/bin/python3")), reverse=True)
    for candidate in candidates:
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; sys.exit(0 if (3, 6) <= sys.version_info < (3, 11) else 1)"],
            capture_output=True,
        )
        if probe.returncode == 0:
            return candidate
    return None


def test_a_venv_made_by_an_old_python_is_refused_with_the_fix(tmp_path: Path) -> None:
    python = old_python()
    if python is None:
        pytest.skip("no Python older than 3.11 on this machine")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    done = run_with_venv(venv, "--help")
    assert done.returncode == 1
    assert "callbridge needs Python 3.11 or newer" in done.stderr
    assert f"rm -rf '{venv}'" in done.stderr
    assert not (venv / ".callbridge-installed").exists()  # nothing was installed into it


def test_a_venv_whose_python_is_gone_is_refused_with_the_fix(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(tmp_path / "removed-python3")
    done = run_with_venv(venv, "--help")
    assert done.returncode == 1
    assert "is broken: its python does not run" in done.stderr
    assert f"rm -rf '{venv}'" in done.stderr
