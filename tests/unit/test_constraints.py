"""constraints.txt pins every declared dependency on both supported Pythons, within what
pyproject.toml allows; the Dockerfile installs from it before copying the code."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]


def pins() -> list[Requirement]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("python", ["3.11", "3.13"])
def test_every_declared_dependency_is_pinned_within_its_range(python: str) -> None:
    environment = {"python_version": python, "python_full_version": python + ".0"}
    applicable: dict[str, list[Requirement]] = {}
    for pin in pins():
        assert len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==", pin
        if pin.marker is None or pin.marker.evaluate(environment):
            applicable.setdefault(canonicalize_name(pin.name), []).append(pin)
    assert all(len(found) == 1 for found in applicable.values()), "two pins for one package on " + python
    for requirement in declared():
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        [pin] = applicable.get(canonicalize_name(requirement.name), [None])
        assert pin is not None, f"{requirement.name} is not pinned for Python {python}"
        version = next(iter(pin.specifier)).version
        assert requirement.specifier.contains(version, prereleases=True), f"{pin} is outside {requirement}"


def test_the_requirements_the_image_installs_are_the_declared_ones() -> None:
    listed = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "_pyproject_deps.py"), str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed == runtime


def test_the_image_installs_pinned_dependencies_in_a_layer_before_the_code() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert first("-c constraints.txt") < first("COPY app") < first("--no-deps .")
    copied_before = [line for line in lines[: first("-c constraints.txt")] if line.startswith("COPY")]
    assert copied_before == ["COPY pyproject.toml constraints.txt bin/_pyproject_deps.py ./"]
