"""Running the app under uvicorn with a graceful drain.

uvicorn's own shutdown fails every open WebSocket at once (close 1012), which would cut
every call in progress. Here the first SIGTERM/SIGINT only starts a drain: /readyz turns 503
so the load balancer stops routing new calls, and calls in progress run to their end (up to
DRAIN_TIMEOUT_SECONDS). Then uvicorn shuts down. A second signal shuts down at once.

Besides the JSON log records, each step is said in one plain sentence on stderr, for the
operator at the terminal who pressed Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import RuntimeConfig
from app.observability.logging import get_logger
from app.server import AppState, create_app

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


def say(text: str) -> None:
    print(f"callbridge: {text}", file=sys.stderr, flush=True)


def calls(n: int) -> str:
    return f"{n} call{'' if n == 1 else 's'}"


def again(sig: int) -> str:
    return "press Ctrl-C again" if sig == signal.SIGINT else "send the signal again (or press Ctrl-C)"


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, drain_seconds: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_seconds = drain_seconds
        self._drain_task: asyncio.Task[None] | None = None

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


def serve(config: RuntimeConfig, host: str, port: int) -> int:
    """Run until stopped; the process exit code (0, or 130 when a second Ctrl-C forced the stop)."""
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ws_max_size=WS_MAX_SIZE,
        ws_per_message_deflate=False,
        proxy_headers=True,
        forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
        http=header_timeout_protocol(config.settings.http_header_timeout_seconds, app.state.bridge),
    )
    try:
        # uvicorn re-raises the signal that stopped it once it is done: for SIGINT that is a
        # KeyboardInterrupt out of asyncio.run, an exit and not an error
        DrainingServer(uv_config, app.state.bridge, config.settings.drain_timeout_seconds).run()
    except KeyboardInterrupt:
        say("stopped")
        return EXIT_INTERRUPTED
    return 0
