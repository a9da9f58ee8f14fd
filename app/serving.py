"""Running the app under uvicorn with a graceful drain.

uvicorn's own shutdown fails every open WebSocket at once (close 1012), which would cut
every call in progress. Here the first SIGTERM/SIGINT only starts a drain: /readyz turns 503
so the load balancer stops routing new calls, and calls in progress run to their end (up to
DRAIN_TIMEOUT_SECONDS). Then uvicorn shuts down. A second signal shuts down at once.
"""

from __future__ import annotations

import asyncio
import os
from types import FrameType

import uvicorn

from app.config import RuntimeConfig
from app.server import AppState, create_app

WS_MAX_SIZE = 64 * 1024  # Twilio frames are ~250 bytes; refuse anything absurd at the socket


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, drain_seconds: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_seconds = drain_seconds
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self.state.loop
        if self.state.draining or self.should_exit or self.drain_seconds <= 0 or loop is None:
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await self.state.drain(self.drain_seconds)
        self.should_exit = True


def serve(config: RuntimeConfig, host: str, port: int) -> None:
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
    )
    DrainingServer(uv_config, app.state.bridge, config.settings.drain_timeout_seconds).run()
