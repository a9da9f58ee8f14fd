"""The one seam between the product and its test peers: the agent of an offline ``serve``.

With no DEEPGRAM_API_KEY and no AGENT_URL, ``serve`` answers calls with the local agent (a
stand-in for agent.deepgram.com that lives in app.devtools) so that a call works on a machine
with nothing configured. Every other product module stays free of app.devtools: the import
contracts in pyproject.toml (checked by ``bin/test``) allow this module's import only.
"""

from __future__ import annotations

from typing import Protocol


class OfflineAgent(Protocol):
    """What the server needs of the offline agent: where it listens, and a way to stop it."""

    @property
    def url(self) -> str: ...

    async def stop(self) -> None: ...


async def start_offline_agent(host: str, port: int) -> OfflineAgent:
    """Start the local agent on ``host:port`` (0: any free port)."""
    from app.devtools.local_agent import LocalAgent  # the seam (see the module docstring)

    agent = LocalAgent()
    await agent.start(host, port)
    return agent
