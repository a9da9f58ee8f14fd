"""The check that keeps a second ``serve`` off a served address, against real sockets: it
refuses what is taken, and serves what asyncio (uvicorn) would serve."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import pytest

from app import serving
from app.devtools.endpoints import free_port


def test_a_listening_socket_is_found_and_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(serving.CannotListen, match=rf"another program listens on 127\.0\.0\.1:{port}"):
            serving.probe("127.0.0.1", port, workers=False)
        with pytest.raises(serving.CannotListen, match="stop it first, or choose another PORT"):
            serving.probe("127.0.0.1", port, workers=True)


def test_an_address_this_machine_lacks_is_handled_as_asyncio_handles_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``localhost`` resolving to an address that cannot be assigned (::1 with IPv6 off): from
    Python 3.13 uvicorn serves the others, so the check must not refuse the start; before, the
    start fails, and the check says why first."""
    port = free_port()
    real = socket.getaddrinfo

    def resolve(host: str | None, *args: Any, **kwargs: Any) -> list[Any]:
        ours = real("127.0.0.1", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        absent = real("192.0.2.1", port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)  # TEST-NET-1
        return ours + absent

    monkeypatch.setattr(serving.socket, "getaddrinfo", resolve)

    async def serves() -> bool:  # what uvicorn does with the same names
        try:
            server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "localhost", port)
        except OSError:
            return False
        server.close()
        await server.wait_closed()
        return True

    if asyncio.run(serves()):
        assert sys.version_info >= (3, 13)
        serving.probe("localhost", port, workers=False)  # no CannotListen
    else:
        with pytest.raises(serving.CannotListen, match="is not an address of this machine"):
            serving.probe("localhost", port, workers=False)


def test_an_address_no_interface_has_is_refused_in_words() -> None:
    with pytest.raises(serving.CannotListen, match=r"192\.0\.2\.1 is not an address of this machine \(HOST\)"):
        serving.probe("192.0.2.1", free_port(), workers=False)


def test_the_lock_keeps_a_second_claim_off_and_names_the_holder() -> None:
    port = free_port()
    first = serving.claim_address("127.0.0.1", port, workers=True)
    try:
        with pytest.raises(serving.CannotListen, match=r"another `callbridge serve` \(pid \d+\) is serving it"):
            serving.claim_address("127.0.0.1", port, workers=True)
    finally:
        first.close()
    serving.claim_address("127.0.0.1", port, workers=True).close()  # freed with its holder
