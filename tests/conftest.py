"""Shared fixtures: a real local agent and a real uvicorn bridge, each on its own loop/thread,
both on 127.0.0.1 with ephemeral ports.

Every test runs in an empty working directory with none of callbridge's variables (nor
proxies) in its environment: a developer's ``.env`` or exported keys must not change what a
test sees, nor what a ``callbridge`` process started by a test reads.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from app.config import RuntimeConfig, Settings, resolve
from app.devtools.local_agent import LocalAgent, LocalAgentConfig
from app.devtools.twilio_api import TwilioApiStandIn
from app.observability import logging as logs
from app.server import create_app
from app.serving import WS_MAX_SIZE
from app.twilio.media_socket import MediaSocket

TWILIO_TOKEN = "test-twilio-auth-token-0123456789"
STREAM_SECRET = "test-stream-token-secret-0123456789"

# Read by the service (see Settings) or by the libraries it sends requests with.
OPERATOR_VARIABLES = frozenset(
    {name.upper() for name in Settings.model_fields}
    | {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "WS_PROXY", "WSS_PROXY"}
)


# The test tiers (bin/test runs the quick one, bin/test --all and CI every test). The quick tier
# is every unit test and the integration tests of the main paths (a call end to end, the
# sockets, the peers, the commands); these modules only run in the full tier: each spends tens
# of seconds in real-time scenarios (faults and reconnects, call control, outbound callees,
# soak and load runs, several processes, a browser, a Prometheus) of features whose logic the
# quick tier's unit tests already cover. A module named on the command line always runs.
FULL_TIER_ONLY = frozenset(
    {
        "tests/browser/test_console.py",
        "tests/integration/test_audio_formats.py",
        "tests/integration/test_availability.py",
        "tests/integration/test_call_control.py",
        "tests/integration/test_faults.py",
        "tests/integration/test_first_run.py",
        "tests/integration/test_hostile_env.py",
        "tests/integration/test_live_api.py",
        "tests/integration/test_loadtest.py",
        "tests/integration/test_memory_commands.py",
        "tests/integration/test_outbound.py",
        "tests/integration/test_peers_callees.py",
        "tests/integration/test_prometheus.py",
        "tests/integration/test_recording.py",
        "tests/integration/test_soak.py",
        "tests/integration/test_workers.py",
    }
)
ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--tier",
        choices=("quick", "all"),
        default="all",
        help="quick: leave out the modules of FULL_TIER_ONLY (tests/conftest.py) unless named; all: every test",
    )


def pytest_configure(config: pytest.Config) -> None:
    missing = [m for m in FULL_TIER_ONLY if not (ROOT / m).is_file()]
    if missing:  # a renamed module would silently join the quick tier
        raise pytest.UsageError(f"tests/conftest.py FULL_TIER_ONLY names missing modules: {missing}")


def pytest_report_header(config: pytest.Config) -> str | None:
    """Said on the controller too: with xdist the workers deselect, and nobody reports it."""
    if config.getoption("tier") != "quick":
        return None
    return (
        f"quick tier: the {len(FULL_TIER_ONLY)} modules of FULL_TIER_ONLY (tests/conftest.py) run only when "
        "named; bin/test --all runs every test"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("tier") != "quick":
        return
    named = {(Path(config.invocation_params.dir) / a.split("::")[0]).resolve() for a in config.args}
    keep, leave = [], []
    for item in items:
        module = item.path.resolve()
        in_full = module.is_relative_to(ROOT) and module.relative_to(ROOT).as_posix() in FULL_TIER_ONLY
        (leave if in_full and module not in named else keep).append(item)
    if leave:
        config.hook.pytest_deselected(items=leave)
        items[:] = keep


@pytest.fixture(autouse=True)
def isolated_from_the_operator(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper() in OPERATOR_VARIABLES:  # pydantic-settings matches names in any case
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll a condition another thread makes true; True if it did within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class LoopThread:
    """An asyncio loop in a daemon thread, to host servers while the test thread is the client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class AgentHandle:
    agent: LocalAgent
    url: str


@pytest.fixture
def start_agent() -> Iterator[Callable[..., AgentHandle]]:
    threads: list[tuple[LoopThread, LocalAgent]] = []

    def start(config: LocalAgentConfig | None = None) -> AgentHandle:
        loop = LoopThread()
        agent = LocalAgent(config or LocalAgentConfig())
        loop.run(agent.start("127.0.0.1", 0))
        threads.append((loop, agent))
        return AgentHandle(agent, agent.url)

    yield start
    for loop, agent in threads:
        loop.run(agent.stop())
        loop.close()


@dataclass
class BridgeHandle:
    base_url: str
    config: RuntimeConfig
    log_buffer: io.StringIO
    server: uvicorn.Server

    def task_count(self) -> int:
        """Tasks alive on the server's loop (excluding the one counting)."""
        loop = self.server.servers[0].get_loop()

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return asyncio.run_coroutine_threadsafe(count(), loop).result(5)

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_buffer.getvalue().splitlines() if line.startswith("{")]

    def records(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("event") == event]

    def wait_for(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.records(event)
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no {event!r} log record within {timeout} s")


@pytest.fixture
def start_bridge(tmp_path: Path) -> Iterator[Callable[..., BridgeHandle]]:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(
        agent_url: str | None, profile: dict[str, Any] | None = None, plain_asgi: bool = False, **env: Any
    ) -> BridgeHandle:
        """``plain_asgi``: the media stream without ``MediaSocket``'s shortcut, as under a
        server other than ``callbridge serve``."""
        fields: dict[str, Any] = {
            "agent_url": agent_url,
            "twilio_auth_token": TWILIO_TOKEN,
            "stream_token_secret": STREAM_SECRET,
            "log_level": "info",
        }
        if profile is not None:
            path = tmp_path / f"profile-{len(servers)}.json"
            path.write_text(json.dumps(profile))
            fields["agent_profile"] = path
        port = env.pop("port", 0)  # a test that needs its URL before the start (PUBLIC_URL) picks one
        fields.update(env)
        config = resolve(Settings(_env_file=None, **fields))  # type: ignore[call-arg]
        buffer = io.StringIO()
        logs.configure("info", stream=buffer)
        logs.register_secrets(config.secrets())
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(config),
                host="127.0.0.1",
                port=port,
                log_config=None,
                ws_max_size=WS_MAX_SIZE,
                ws_per_message_deflate=False,
                ws="websockets-sansio" if plain_asgi else MediaSocket,  # as app.serving.serve
                lifespan="on",
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        servers.append((server, thread))
        return BridgeHandle(f"http://127.0.0.1:{port}", config, buffer, server)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def twilio_api() -> Iterator[TwilioApiStandIn]:
    """The local stand-in of Twilio's REST API, with the auth token the bridges here use."""
    with TwilioApiStandIn(auth_token=TWILIO_TOKEN) as api:
        yield api


def rest_env(api: TwilioApiStandIn) -> dict[str, str]:
    """The settings that point a bridge started by ``start_bridge`` at ``api``."""
    return {"twilio_api_base": api.base_url, "twilio_account_sid": api.account_sid}


def get(url: str) -> tuple[int, str]:
    """GET ``url`` directly (no proxy from the environment): (status, body), errors included."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus exposition ``text`` (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def start_serve(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A real ``callbridge serve`` (with ``args``) and ``env``, run in ``tmp_path`` (which has
    no .env), stdout and stderr in ``serve.log``: the process and that log's path."""
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", *args],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return proc, log_path


def stop_serve(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Stop a ``serve`` from ``start_serve`` as an operator would (SIGTERM), killed if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
