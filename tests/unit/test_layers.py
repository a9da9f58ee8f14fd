"""The layers as tests: the import contracts in pyproject.toml hold, cover every product
module, and break when a core module imports I/O (shown on a copy of the package)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# tools, not product: the command line (it runs the test peers on purpose) and the peers
NOT_PRODUCT = {"app.__main__", "app.cli", "app.devtools"}


def contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return list(config["contracts"])


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        check=False,
    )


def copy_of_project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_the_product_contract_names_every_product_module() -> None:
    """A new top-level module is either product (and then in the contract) or a named tool."""
    (product,) = [c for c in contracts() if c["forbidden_modules"] == ["app.devtools"]]
    sources = set(product["source_modules"])
    top_level = {f"app.{p.stem}" for p in (ROOT / "app").glob("*.py") if p.stem != "__init__"}
    top_level |= {f"app.{p.parent.name}" for p in (ROOT / "app").glob("*/__init__.py")}
    assert top_level - NOT_PRODUCT == sources


def test_a_core_module_importing_asyncio_breaks_the_contract(tmp_path: Path) -> None:
    root = copy_of_project(tmp_path)
    states = root / "app" / "core" / "states.py"
    states.write_text(states.read_text() + "\nimport asyncio  # noqa: E402\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "app.core is not allowed to import asyncio" in result.stdout
    assert "app.core.states -> asyncio" in result.stdout


def test_reaching_io_through_another_module_breaks_it_too(tmp_path: Path) -> None:
    """The core importing the webhook module again (it loads starlette and the twilio SDK)."""
    root = copy_of_project(tmp_path)
    call = root / "app" / "core" / "call.py"
    call.write_text(call.read_text() + "\nfrom app.twilio import webhook  # noqa: E402, F401\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "app.core is not allowed to import starlette" in result.stdout


def test_the_server_importing_a_test_peer_breaks_the_product_contract(tmp_path: Path) -> None:
    root = copy_of_project(tmp_path)
    server = root / "app" / "server.py"
    server.write_text(server.read_text() + "\nfrom app.devtools import local_agent  # noqa: E402, F401\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "app.server is not allowed to import app.devtools" in result.stdout


@pytest.mark.parametrize("module", ["app.core.call", "app.core.call_control", "app.core.outbound"])
def test_importing_the_core_loads_no_io_library(module: str) -> None:
    """What the contracts say statically, checked at run time too (imports done by code, and
    by the third-party libraries the core uses: numpy, soxr). Modules the interpreter loads
    before any import of ours (os, io...) are not the core's doing and are left out."""
    forbidden = [str(m) for c in contracts() if c["source_modules"] == ["app.core"] for m in c["forbidden_modules"]]
    probe = (
        f"import sys; before = set(sys.modules); import {module}; "
        f"print(' '.join(m for m in {forbidden!r} if m in sys.modules and m not in before))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == []
