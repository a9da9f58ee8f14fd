"""A tiny HTTP/1.1 operator tool server on 127.0.0.1, on asyncio streams in its own thread:
what each request carried, on which connection, and when the client closed that connection.
Its behaviour depends on the path (see ``ToolServer._answer``). Also serves as a plain
forward proxy: a request in absolute form (``POST http://host/path``) is answered the same."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.conftest import LoopThread

ANSWER = {"status": "shipped", "eta_days": 2}
HOLD_AT_MOST_S = 60.0  # how long /hang waits for the client to go (a test's own bound is shorter)


@dataclass
class Connection:
    number: int
    closed: threading.Event = field(default_factory=threading.Event)
    closed_at: float | None = None  # time.monotonic() when the client's close was seen
    closed_wall: float | None = None  # time.time() then

    def close_seen(self) -> None:
        if not self.closed.is_set():
            self.closed_at, self.closed_wall = time.monotonic(), time.time()
            self.closed.set()


@dataclass
class Request:
    target: str  # as on the request line: absolute when sent through a proxy
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    connection: Connection
    at: float  # time.monotonic() when the whole request had arrived
    wall: float  # time.time() then


class ToolServer:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.connections: list[Connection] = []
        self.arrived = threading.Event()  # set at each request (clear it to wait for the next)
        self._loop = LoopThread()
        self._server: asyncio.Server = self._loop.run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            handlers = asyncio.all_tasks() - {asyncio.current_task()}
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await asyncio.sleep(0.01)  # the transports' own closing callbacks

        self._loop.run(stop())
        self._loop.close()

    def wait_for_request(self, path: str, timeout: float = 5.0) -> Request:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.requests if r.path == path]
            if found:
                return found[-1]
            time.sleep(0.005)
        raise AssertionError(f"no request for {path} within {timeout} s")

    # --- the server's side ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(len(self.connections))
        self.connections.append(connection)
        try:
            while True:
                request = await self._read_request(reader, connection)
                if request is None:
                    break
                self.requests.append(request)
                self.arrived.set()
                if not await self._answer(request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # gone mid-request
        finally:
            connection.close_seen()
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader, connection: Connection) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None  # the client closed a kept-alive connection
        request_line, *lines = head.decode("latin-1").split("\r\n")
        _method, target, _version = request_line.split(" ")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        path = urlsplit(target).path or "/"
        return Request(target, path, headers, body, connection, time.monotonic(), time.time())

    async def _answer(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer ``request``; False once the connection is over."""
        path = request.path
        if path == "/json":
            return await self._send(writer, 200, json.dumps(ANSWER).encode(), "application/json")
        if path == "/text":
            return await self._send(writer, 200, b"Order 42 ships on Monday.", "text/plain; charset=utf-8")
        if path == "/invalid-json":
            return await self._send(writer, 200, b'{"status": ', "application/json")
        if path.startswith("/status/"):
            code = int(path.removeprefix("/status/"))
            return await self._send(writer, code, b"no", "text/plain", extra=f"Location: {self.url}/json\r\n")
        if path == "/big":  # declared too large: the client need not read a byte of it
            return await self._send(writer, 200, b"x" * (16 * 1024 + 1), "text/plain")
        if path == "/endless":  # no length, chunks until the client goes
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"y" * 4096
            while not reader.at_eof():
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                await asyncio.sleep(0.001)
            return False
        if path == "/drip":  # one byte every 0.2 s: each read is quick, the whole answer is not
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n")
            for _ in range(100):
                writer.write(b"z")
                await writer.drain()
                if await _client_gone(reader, 0.2):
                    return False
            return True
        if path == "/slow":  # answers after 5 s, unless the client went before
            if await _client_gone(reader, 5.0):
                return False
            return await self._send(writer, 200, json.dumps(ANSWER).encode(), "application/json")
        if path == "/hang":  # never answers: waits for the client to close the connection
            await _client_gone(reader, HOLD_AT_MOST_S)
            return False
        return await self._send(writer, 404, b"", "text/plain")

    async def _send(
        self, writer: asyncio.StreamWriter, code: int, body: bytes, content_type: str, extra: str = ""
    ) -> bool:
        head = f"HTTP/1.1 {code} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        return True


async def _client_gone(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Wait ``seconds`` or until the client closes its side (True)."""
    try:
        data = await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""
