"""The first run of bin/callbridge on a fresh clone installs the project into its virtualenv
and says so in one line: no build-backend banner (setuptools' note on editable installs of a
flat layout, which pip 26 shows as a 10-line warning)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_the_first_run_installs_in_one_line(tmp_path: Path) -> None:
    # a virtualenv with nothing installed yet, that sees this one's packages (pip and the
    # dependencies: nothing is downloaded but the build backend), so bin/_env.sh installs
    # callbridge into it exactly as on a first run
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.check_output(
            [venv / "bin" / "python", "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site / "callbridge-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # a copy of the project as a clone has it: the install writes its build files there, not
    # into the tree the other tests run from
    clone = tmp_path / "clone"
    for name in ("bin", "app"):
        shutil.copytree(ROOT / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy(ROOT / name, clone / name)
    done = subprocess.run(
        [clone / "bin" / "callbridge", "--help"],
        env={**os.environ, "CALLBRIDGE_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: callbridge")
    said = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: ")]  # pip's own, if any
    assert said == [f"installing callbridge into {venv} (versions from constraints.txt)"], done.stderr
    assert (venv / ".callbridge-installed").exists()
