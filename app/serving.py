"""Running the app under uvicorn with a graceful drain.

uvicorn's own shutdown fails every open WebSocket at once (close 1012), which would cut
every call in progress. Here the first SIGTERM/SIGINT only starts a drain: /readyz turns 503
so the load balancer stops routing new calls, and calls in progress run to their end (up to
DRAIN_TIMEOUT_SECONDS). Then uvicorn shuts down. A second signal shuts down at once.

Besides the JSON log records, each step is said in one plain sentence on stderr, for the
operator at the terminal who pressed Ctrl-C.

With ``--workers N`` (N > 1) the ``serve`` process becomes a supervisor (``supervise``): it
binds the listening sockets (one per worker, SO_REUSEPORT), starts N worker processes that
accept on them, runs the one local agent of offline mode, forwards SIGTERM/SIGINT so every
worker drains as above, and replaces a worker that dies without touching the others. Workers share what a call needs
when its webhook and its stream land on different workers: the stream-token secret (made
once here when STREAM_TOKEN_SECRET is unset), single use of tokens and the MAX_CALLS count
(``app.machine_db``, or Redis for tokens with REDIS_URL), and the metrics (prometheus-client's
multiprocess directory).

A second ``serve`` on an address one already serves is refused before it starts anything
(``claim_address``), in one sentence: a bind probe finds any program listening there, and a
lock held for the life of the process covers two ``serve`` started at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import machine_db, workers
from app.agent.client import limit_send_buffer
from app.config import ConfigError, RuntimeConfig, load_settings, resolve
from app.live.bus import ENV_LIVE_BUS, Broker, start_broker
from app.loop_batching import LoopBatching
from app.observability import logging as logs
from app.observability.logging import get_logger
from app.offline_agent import OfflineAgent, start_offline_agent
from app.server import AppState, create_app
from app.twilio.media_socket import MediaSocket

WS_MAX_SIZE = 64 * 1024  # Twilio frames are ~250 bytes; refuse anything absurd at the socket
EXIT_INTERRUPTED = 130  # the shell's code for "ended by Ctrl-C"

log = get_logger(component="server")


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn times out idle keep-alive connections, not a request whose line and headers
    never finish: 100 such half-sent requests were all still held open after 10 s. Here each
    request's headers must be complete ``header_timeout`` seconds after the connection opens
    (or after the previous response, on keep-alive); else the connection is closed."""

    header_timeout = 10.0
    on_timeout: Callable[[], None] = staticmethod(lambda: None)

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit_send_buffer(transport.get_extra_info("socket"))  # a media stream may be on it
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a keep-alive connection's next request
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            type(self).on_timeout()
            self.transport.close()


def header_timeout_protocol(seconds: float, state: AppState) -> type[HeaderTimeoutProtocol]:
    """The protocol class for this server: its timeout, and where a timeout is counted."""

    def timed_out() -> None:
        state.metrics.header_timeouts.inc()
        state.refusals.warn(log, "http_headers_timed_out", timeout_s=seconds)

    return type(
        "CallbridgeHttpProtocol",
        (HeaderTimeoutProtocol,),
        {"header_timeout": seconds, "on_timeout": staticmethod(timed_out)},
    )


SPEAKER = "callbridge"  # "callbridge worker 2" in a worker process


def say(text: str) -> None:
    print(f"{SPEAKER}: {text}", file=sys.stderr, flush=True)


def calls(n: int) -> str:
    return f"{n} call{'' if n == 1 else 's'}"


def again(sig: int) -> str:
    return "press Ctrl-C again" if sig == signal.SIGINT else "send the signal again (or press Ctrl-C)"


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        state: AppState,
        drain_seconds: float,
        parent_fd: int | None = None,
        batching: LoopBatching | None = None,
    ) -> None:
        super().__init__(config)
        self.state = state
        self.drain_seconds = drain_seconds
        self.parent_fd = parent_fd  # a worker: readable (end of file) once its supervisor is gone
        self.batching = batching
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if self.parent_fd is not None:
            asyncio.get_running_loop().add_reader(self.parent_fd, self._supervisor_gone)
        if self.batching is not None:
            self.batching.start(asyncio.get_running_loop())
        try:
            await super().serve(sockets)
        finally:
            if self.batching is not None:
                self.batching.stop()

    def _supervisor_gone(self) -> None:
        """A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of living on
        unsupervised, holding the port."""
        assert self.parent_fd is not None
        asyncio.get_running_loop().remove_reader(self.parent_fd)
        log.error("supervisor_gone", detail="the serve process that started this worker has exited: draining")
        self.handle_exit(signal.SIGTERM, None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # a signal handler: only flags here, the sentences are printed from the loop
        loop = self.state.loop
        if self.state.draining or self.should_exit or self.drain_seconds <= 0 or loop is None:
            if loop is not None and not self.should_exit:
                forced = self.state.draining
                loop.call_soon_threadsafe(self._say_stopping_now, forced)
            self.state.stopping = True  # sockets closed from now on are closed by us: bridge_shutdown
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        loop.call_soon_threadsafe(self._start_drain, sig)

    def _say_stopping_now(self, forced: bool) -> None:
        active = len(self.state.calls)
        if not active:
            say("stopping")
        elif forced:
            say(f"stopping now: cutting the {calls(active)} still in progress")
        else:
            say(f"stopping now (DRAIN_TIMEOUT_SECONDS=0): cutting {calls(active)} in progress")

    def _start_drain(self, sig: int) -> None:
        active = len(self.state.calls)
        if active:
            say(
                f"stopping: no new calls; waiting up to {self.drain_seconds:g} s for {calls(active)} in progress "
                f"to end; {again(sig)} to stop now and cut them"
            )
        else:
            say("stopping (no calls in progress)")
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(active))

    async def _drain(self, active: int) -> None:
        await self.state.drain(self.drain_seconds)
        left = len(self.state.calls)
        if left:
            say(f"waited {self.drain_seconds:g} s: stopping, cutting the {calls(left)} still in progress")
        elif active and not self.should_exit:
            say("all calls ended: stopping")
        self.state.stopping = True
        self.should_exit = True


def serve(
    config: RuntimeConfig,
    host: str,
    port: int,
    sock: socket.socket | None = None,
    worker: workers.WorkerContext | None = None,
) -> int:
    """Run until stopped; the process exit code (0, or 130 when a second Ctrl-C forced the stop).
    A worker serves the supervisor's socket ``sock`` instead of binding ``host:port``."""
    app = create_app(config, worker)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ws_max_size=WS_MAX_SIZE,
        ws_per_message_deflate=False,
        proxy_headers=True,
        forwarded_allow_ips=config.settings.forwarded_allow_ips,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
        http=header_timeout_protocol(config.settings.http_header_timeout_seconds, app.state.bridge),
        ws=MediaSocket,  # uvicorn's websockets-sansio, handing media frames to the call directly
    )
    try:
        # uvicorn re-raises the signal that stopped it once it is done: for SIGINT that is a
        # KeyboardInterrupt out of asyncio.run, an exit and not an error
        server = DrainingServer(
            uv_config,
            app.state.bridge,
            config.settings.drain_timeout_seconds,
            parent_fd=worker.parent_fd if worker is not None else None,
            batching=LoopBatching(
                config.settings.loop_batch_ms / 1000,
                config.settings.loop_batch_min_calls,
                lambda: len(app.state.bridge.calls),
                log,
            ),
        )
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:
        say("stopped")
        return EXIT_INTERRUPTED
    return 0


# --- worker processes ----------------------------------------------------------------------

WORKER_CODE = "import sys; from app.serving import run_worker; sys.exit(run_worker())"
LISTEN_BACKLOG = 2048
"""Connections the kernel queues for a worker to accept: a burst, or while it is being replaced."""
QUICK_DEATH_SECONDS = 5.0
"""A worker that dies sooner than this after its start is failing to start, not crashing in use."""
MAX_QUICK_DEATHS = 5
"""Quick deaths in a row after which the supervisor gives up (exit 1) rather than loop forever."""
RESTART_DELAY_MAX = 10.0
"""Longest pause before restarting a worker that keeps dying quickly (doubling from 0.5 s)."""
STOP_MARGIN_SECONDS = 30.0
"""After DRAIN_TIMEOUT_SECONDS and uvicorn's own 10 s, how long the supervisor still waits for
a worker to exit on its own before killing it."""
EXIT_GAVE_UP = 1


def run_worker() -> int:
    """The entry point of a worker process (started by ``supervise``, never by hand)."""
    global SPEAKER
    worker = workers.WorkerContext.from_env()
    try:
        settings = load_settings()
        config = resolve(settings)
    except ConfigError as exc:
        print(f"callbridge worker {worker.worker_id}: configuration error: {exc}", file=sys.stderr)
        return 2
    SPEAKER = f"callbridge worker {worker.worker_id}"
    logs.configure(settings.log_level, worker=worker.worker_id)
    logs.register_secrets(config.secrets())
    sock = socket.socket(fileno=worker.listen_fd)
    return serve(config, "", 0, sock=sock, worker=worker)


def bind(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker, all on ``host:port`` (SO_REUSEPORT): the kernel spreads
    new connections evenly over them. One socket shared by every worker was measured to give
    61% of 80 calls' streams to one of 2 workers (whichever is woken first takes the
    connection). The supervisor keeps each socket open while its worker is replaced, so the
    connections that arrive meanwhile wait in its queue instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # PORT=0: the others take the port the first was given
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


# --- one instance per address --------------------------------------------------------------

EXIT_CANNOT_LISTEN = 1
LOCK_BACKLOG = 128
"""Refused ``serve`` processes that can still learn the holder's pid (each leaves a connection
the holder never accepts); later ones are refused all the same, without the pid."""


class CannotListen(Exception):
    """``serve`` cannot have its address, in one sentence for the operator."""


def shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class AddressClaim:
    """Held by ``serve`` for its whole life: the lock that keeps a second ``serve`` off its address."""

    lock: socket.socket | None = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()


def claim_address(host: str, port: int, workers: bool) -> AddressClaim:
    """Make sure ``host:port`` is this process's to serve, or raise ``CannotListen``.

    The workers bind with SO_REUSEPORT, which lets any later process of the same user bind
    too: the kernel would then spread Twilio's connections over two instances that do not
    share a stream-token secret (calls refused as bad_token). So first a lock only one process
    of this machine can hold (``hold_lock``), then a bind without SO_REUSEPORT (``probe``),
    which fails when anything at all listens there. PORT 0 (any free port) is never taken."""
    if port == 0:
        return AddressClaim()
    claim = AddressClaim(hold_lock(host, port))
    try:
        probe(host, port, workers)
    except CannotListen:
        claim.close()
        raise
    return claim


def hold_lock(host: str, port: int) -> socket.socket | None:
    """A Linux abstract Unix socket named after the address: bound by one process at a time,
    freed by the kernel when that process ends (however it ends), and as private to a network
    namespace as the port itself. None where there are none (not Linux): the probe alone guards."""
    if not sys.platform.startswith("linux"):
        return None
    name = f"\0callbridge serve {host}:{port}".encode()
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(name)
        lock.listen(LOCK_BACKLOG)  # only so that a refused `serve` can ask whose it is
    except OSError as exc:
        lock.close()
        if exc.errno != errno.EADDRINUSE:
            return None
        holder = lock_holder(name)
        if holder is not None and holder[1] != os.getuid():
            # not a serve of ours: another user may not keep us off a port; the probe decides
            return None
        pid = holder[0] if holder is not None else None
        raise CannotListen(
            f"cannot listen on {shown(host, port)}: another `callbridge serve`{f' (pid {pid})' if pid else ''} "
            "is serving it; stop it first, or choose another PORT (--port)"
        ) from None
    return lock


def lock_holder(name: bytes) -> tuple[int, int] | None:
    """The pid and uid of the process holding the lock ``name`` (SO_PEERCRED), if it can be asked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as asker:
        asker.settimeout(0.5)
        try:
            asker.connect(name)
            pid, uid, _ = struct.unpack("3i", asker.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return None
    return (int(pid), int(uid)) if pid else None


ASYNCIO_SKIPS_UNASSIGNABLE = sys.version_info >= (3, 13)
"""Python 3.13's create_server skips an address that cannot be assigned (EADDRNOTAVAIL); before
it, the whole start fails, and the probe says so first, in words."""


def probe(host: str, port: int, workers: bool) -> None:
    """Bind (without listening) each address ``serve`` will listen on, as it will but without
    SO_REUSEPORT, then let go: EADDRINUSE when any program listens there. One process: every
    address HOST resolves to, as uvicorn (asyncio's create_server) binds them; workers: the one
    address ``bind`` takes."""
    try:
        if workers:  # as ``bind``
            addresses: list[tuple[int, tuple[Any, ...]]] = [
                (socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))
            ]
        else:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            addresses = list(dict.fromkeys((info[0], info[4]) for info in infos))
    except socket.gaierror:
        raise CannotListen(f"cannot listen on {shown(host, port)}: the name {host} does not resolve (HOST)") from None
    usable: OSError | None = None  # why the last address could not be bound, while none could
    bound = False
    for family, address in addresses:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # a family this machine lacks (IPv6 off): asyncio skips it too
            usable = exc
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT is no obstacle
            if family == socket.AF_INET6 and not workers:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                # asyncio's create_server (uvicorn) skips an address it cannot assign (``localhost``
                # resolving to ::1 in a container without IPv6) and serves the others, from 3.13
                if exc.errno == errno.EADDRNOTAVAIL and not workers and ASYNCIO_SKIPS_UNASSIGNABLE:
                    usable = exc
                    continue
                raise CannotListen(cannot_listen(host, port, exc)) from None
            bound = True
    if not bound and usable is not None:
        raise CannotListen(cannot_listen(host, port, usable))


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """Why ``host:port`` cannot be listened on, and what to do, in one sentence."""
    where = f"cannot listen on {shown(host, port)}"
    if exc.errno == errno.EADDRINUSE:
        taken = listeners(port)
        who = f"another program listens on {', '.join(taken)}" if taken else "the address is already in use"
        return f"{where}: {who}; stop it first, or choose another PORT (--port)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine (HOST)"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges: choose another PORT)"
    return f"{where}: {exc.strerror or exc}"


def listeners(port: int) -> list[str]:
    """The addresses TCP sockets listen on with ``port``, from /proc/net/tcp and tcp6 (Linux;
    elsewhere none are known)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # the kernel prints each 32-bit word as a number in host order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            host = socket.inet_ntop(family, raw).removeprefix("::ffff:")
            found.append(shown(host, port))
    return list(dict.fromkeys(found))


def prepare_multiproc_dir(configured: str | None) -> tuple[Path, bool]:
    """PROMETHEUS_MULTIPROC_DIR, emptied of a previous run's metric files (prometheus-client
    would add them to this run's counts), or a new temporary directory; True when it is ours
    to remove at the end."""
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
        return directory, False
    return Path(tempfile.mkdtemp(prefix="callbridge-workers-")), True


@dataclass
class WorkerSlot:
    worker_id: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restarts: int = 0


class Supervisor:
    """``serve --workers N``: starts, watches, replaces and stops the worker processes."""

    def __init__(self, config: RuntimeConfig, host: str, port: int, count: int) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.count = count
        self.slots = [WorkerSlot(i + 1) for i in range(count)]
        self.stopping = False
        self.interrupted = False
        self.gave_up = False
        self.log = get_logger(component="supervisor")
        self._env: dict[str, str] = {}
        self._socks: list[socket.socket] = []
        self._parent_read = -1
        self._multiproc_dir = Path()
        self._kill_timer: asyncio.TimerHandle | None = None

    async def run(self) -> int:
        settings = self.config.settings
        try:
            self._socks = bind(self.host, self.port, self.count)
        except OSError as exc:
            self.log.error("bind_failed", host=self.host, port=self.port, detail=str(exc))
            say(cannot_listen(self.host, self.port, exc))
            return EXIT_CANNOT_LISTEN
        configured = settings.prometheus_multiproc_dir
        self._multiproc_dir, ours = prepare_multiproc_dir(str(configured) if configured else None)
        machine_db.create(self._multiproc_dir)
        local_agent: OfflineAgent | None = None
        broker: Broker | None = None
        parent_write = -1
        try:
            if self.config.use_local_agent:
                local_agent = await start_offline_agent("127.0.0.1", settings.local_agent_port)
            if self.config.operator_token and not settings.redis_url:
                # the live call API's bus between the workers (with Redis, Redis is the bus)
                broker = await start_broker(self._multiproc_dir)
            self._parent_read, parent_write = os.pipe()
            self._env = self.worker_env(local_agent.url if local_agent is not None else None)
            if broker is not None:
                self._env[ENV_LIVE_BUS] = str(broker.path)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.on_signal, sig)
            self.log.info(
                "workers_starting",
                workers=self.count,
                address=f"{self.host}:{self._socks[0].getsockname()[1]}",
                multiproc_dir=str(self._multiproc_dir),
                local_agent=local_agent.url if local_agent is not None else None,
            )
            await asyncio.gather(*(self.keep(slot) for slot in self.slots))
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            if local_agent is not None:
                await local_agent.stop()
            if broker is not None:
                await broker.close()
            for fd in (self._parent_read, parent_write):
                if fd >= 0:
                    os.close(fd)
            for sock in self._socks:
                sock.close()
            if ours:
                shutil.rmtree(self._multiproc_dir, ignore_errors=True)
        if self.gave_up:
            return EXIT_GAVE_UP
        say("stopped")
        return EXIT_INTERRUPTED if self.interrupted else 0

    def worker_env(self, local_agent_url: str | None) -> dict[str, str]:
        """What every worker starts with: this environment, the secret made here when the
        operator set none (a token minted by one worker must verify on every other), the
        shared directory, and where the local agent is."""
        env = dict(os.environ)
        if self.config.settings.stream_token_secret is None:
            env["STREAM_TOKEN_SECRET"] = self.config.stream_token_secret.decode()
        env[workers.ENV_MULTIPROC_DIR] = str(self._multiproc_dir)
        if local_agent_url:
            env[workers.ENV_LOCAL_AGENT_URL] = local_agent_url
        env[workers.ENV_PARENT_FD] = str(self._parent_read)
        # the workers run this very code, wherever it was imported from
        code_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (code_root, env.get("PYTHONPATH", "")) if p)
        return env

    async def start(self, slot: WorkerSlot) -> asyncio.subprocess.Process:
        sock = self._socks[slot.worker_id - 1]
        env = {**self._env, workers.ENV_WORKER_ID: str(slot.worker_id), workers.ENV_LISTEN_FD: str(sock.fileno())}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER_CODE,
            env=env,
            pass_fds=(sock.fileno(), self._parent_read),
            process_group=0,  # Ctrl-C reaches the supervisor alone, which forwards it once
        )
        slot.process = process
        slot.started_at = time.monotonic()
        if self.stopping:  # the signal came while this one was being started
            process.send_signal(signal.SIGINT if self.interrupted else signal.SIGTERM)
        self.log.info("worker_started", worker=slot.worker_id, pid=process.pid, restarts=slot.restarts)
        return process

    async def keep(self, slot: WorkerSlot) -> None:
        """Run one worker, and replace it each time it dies, until the instance stops."""
        while not self.stopping:
            process = await self.start(slot)
            code = await process.wait()
            mark_process_dead(process.pid, str(self._multiproc_dir))  # type: ignore[no-untyped-call]
            with contextlib.suppress(sqlite3.Error):
                workers.forget_worker(machine_db.path_in(self._multiproc_dir), slot.worker_id)
            slot.process = None
            if self.is_stopping():  # set by a signal while this worker ran
                self.log.info("worker_stopped", worker=slot.worker_id, pid=process.pid, exit_code=code)
                # nobody accepts on its socket any more: closed now, the kernel sends new
                # connections (a readiness probe, say) to the workers still draining instead
                # of queueing them where nothing will answer
                self._socks[slot.worker_id - 1].close()
                return
            lived = time.monotonic() - slot.started_at
            slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH_SECONDS else 0
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            self.log.error("worker_died", worker=slot.worker_id, pid=process.pid, how=how, lived_s=round(lived, 1))
            if slot.quick_deaths >= MAX_QUICK_DEATHS:
                say(f"worker {slot.worker_id} keeps dying at start ({how}): stopping every worker")
                self.gave_up = True
                self.on_signal(signal.SIGTERM)
                return
            delay = min(RESTART_DELAY_MAX, 0.5 * 2 ** (slot.quick_deaths - 1)) if slot.quick_deaths else 0.0
            say(f"worker {slot.worker_id} died ({how}); replacing it" + (f" in {delay:g} s" if delay else ""))
            await asyncio.sleep(delay)
            slot.restarts += 1

    def is_stopping(self) -> bool:
        return self.stopping

    def on_signal(self, sig: int) -> None:
        """Every worker gets the signal: the first starts their drain, a second stops them now."""
        if sig == signal.SIGINT:
            self.interrupted = True
        if not self.stopping:
            self.stopping = True
            say(f"stopping {self.count} workers (each finishes its calls)")
            limit = self.config.settings.drain_timeout_seconds + 10 + STOP_MARGIN_SECONDS
            self._kill_timer = asyncio.get_running_loop().call_later(limit, self.kill_all)
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(sig)

    def kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                self.log.error("worker_killed", worker=slot.worker_id, detail="did not stop in time")
                with contextlib.suppress(ProcessLookupError):
                    slot.process.kill()


def supervise(config: RuntimeConfig, host: str, port: int, count: int) -> int:
    """``serve --workers N``: the exit code, as ``serve``'s (1 when the workers could not be kept running)."""
    if config.settings.stream_token_secret is None:
        get_logger(component="supervisor").warning(
            "stream_token_secret_generated",
            detail="STREAM_TOKEN_SECRET not set: generated one for this instance and its workers; "
            "multi-replica deployments must set the same secret on every replica",
        )
    return asyncio.run(Supervisor(config, host, port, count).run())
