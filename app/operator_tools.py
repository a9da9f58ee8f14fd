"""Operator tools: a function the agent calls, answered by the operator's own HTTP endpoint.

The bridge POSTs JSON (``call_sid``, ``from``, ``to``, ``function``, ``arguments``) signed
like call records (``app/signing.py``) and passes the answer's body to the agent as the
function's ``content``. Every failure of the request becomes a sentence the agent can act on;
nothing here raises but ``CancelledError``.

The request runs on the event loop itself (httpx over anyio, no thread), so cancelling the
task that awaits ``call_tool`` (the call's teardown does) aborts it at once: its connection is
closed, never handed back to the pool half-read, and the tool server sees it go.

- **Clients.** One ``httpx.AsyncClient`` per event loop and per kind (direct / through the
  environment's proxies), created on first use and pooling its keep-alive connections. A
  client is never shared between loops (each test, and each worker, runs its own).
  ``aclose_clients()`` closes the running loop's clients (the server's lifespan shutdown calls
  it); a loop that ends without it (``asyncio.run``, a CLI call) closes them while it shuts
  down its async generators.
- **Timeouts.** ``limit_s`` bounds connecting, each write and read, waiting for a pooled
  connection, and the whole request with its answer (a server dripping bytes cannot hold it
  longer): all become "did not answer within N seconds".
- **Proxies.** Loopback hosts (127.0.0.1, localhost, ::1) are always reached directly; any
  other host through ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` minus ``NO_PROXY``
  (httpx's ``trust_env``), read when the loop's client is created.
- **Redirects** are not followed: a 3xx is a failure like any other non-2xx status, so a
  signed body and its signature go only to the configured URL.
- **TLS** is checked against the system's CA store (``ssl.create_default_context``, which
  honours ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), as with urllib before, not certifi's bundle.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpcore  # noqa: F401  httpx imports it at its first client, which would stall a call's loop
import httpx

from app.signing import signed_headers

MAX_ANSWER_BYTES = 16 * 1024
"""Bytes of an answer read; a larger one is refused (an LLM cannot use pages of text, and a
tool that sends them is broken)."""

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=32, keepalive_expiry=5.0)
_TLS = ssl.create_default_context()  # loading the CA store takes tens of ms: once, here, not in a call


async def call_tool(url: str, payload: dict[str, Any], secret: bytes | None, limit_s: float) -> tuple[str, bool]:
    """POST ``payload`` to ``url``; (content for the agent, whether it failed). ``limit_s``
    bounds the whole request, and each of its steps."""
    name = str(payload.get("function", "the function"))
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "callbridge", "Accept-Encoding": "identity"}
    if secret is not None:
        headers |= signed_headers(secret, body)
    try:
        client = await _client(proxied=(urlsplit(url).hostname or "") not in LOOPBACK_HOSTS)
    except (ValueError, ImportError, httpx.InvalidURL) as exc:  # a proxy variable httpx cannot use
        return f"{name} could not be reached ({type(exc).__name__}).", True
    try:
        async with asyncio.timeout(limit_s):
            status, content_type, answer = await _post(client, url, body, headers, limit_s)
    except (TimeoutError, httpx.TimeoutException):
        return f"{name} did not answer within {limit_s:g} seconds.", True
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        return f"{name} could not be reached ({_reason(exc)}).", True
    if not 200 <= status < 300:
        return f"{name} failed: the service answered HTTP {status}.", True
    if answer is None:
        return f"{name} answered with more than {MAX_ANSWER_BYTES // 1024} KB, which is too much to use.", True
    text = answer.decode("utf-8", errors="replace")
    if "json" in content_type:
        try:
            return json.dumps(json.loads(text), separators=(",", ":")), False
        except ValueError:
            return f"{name} answered with invalid JSON.", True
    return text, False


async def _post(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], limit_s: float
) -> tuple[int, str, bytes | None]:
    """(status, Content-Type, body or None when larger than MAX_ANSWER_BYTES). The body of a
    non-2xx answer is not read. Leaving the ``stream`` block before the end of the answer (too
    large, an error, a cancellation) closes the connection instead of pooling it."""
    async with client.stream("POST", url, content=body, headers=headers, timeout=httpx.Timeout(limit_s)) as response:
        content_type = response.headers.get("Content-Type", "")
        if not 200 <= response.status_code < 300:
            return response.status_code, content_type, b""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
            return response.status_code, content_type, None
        answer = bytearray()
        async for chunk in response.aiter_raw():  # as sent: Accept-Encoding asked for no compression
            answer += chunk
            if len(answer) > MAX_ANSWER_BYTES:
                return response.status_code, content_type, None
        return response.status_code, content_type, bytes(answer)


def _reason(exc: BaseException) -> str:
    """The most specific cause of a failed request: ``ConnectionRefusedError`` rather than
    httpx's ``ConnectError`` wrapping it."""
    found = exc
    for _ in range(10):  # httpx's error, httpcore's, anyio's, the socket's
        cause = found.__cause__ or found.__context__  # httpcore raises its own from within ``except``
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        if cause is None:
            break
        found = cause
    if type(found) is OSError:  # "All connection attempts failed": the wrapper says more
        return type(exc).__name__
    return type(found).__name__


# --- one pool of connections per event loop --------------------------------------------------


@dataclass
class _LoopClients:
    """The clients of one event loop, and the async generator that closes them when the loop
    shuts its async generators down."""

    by_kind: dict[bool, httpx.AsyncClient] = field(default_factory=dict)  # proxied -> client
    closer: AsyncGenerator[None, None] | None = None


_loops: dict[asyncio.AbstractEventLoop, _LoopClients] = {}
_loops_lock = threading.Lock()  # each loop runs in its own thread


async def _client(proxied: bool) -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    with _loops_lock:
        for other in [other for other in _loops if other.is_closed()]:
            del _loops[other]  # ended without shutting down its async generators
        entry = _loops.setdefault(loop, _LoopClients())
    client = entry.by_kind.get(proxied)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(verify=_TLS, trust_env=proxied, follow_redirects=False, limits=_LIMITS)
        entry.by_kind[proxied] = client
    if entry.closer is None:
        entry.closer = _close_with_the_loop(loop, entry)
        await anext(entry.closer)  # first iteration: the loop now finalises it at its shutdown
    return client


async def _close_with_the_loop(loop: asyncio.AbstractEventLoop, entry: _LoopClients) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        with _loops_lock:
            if _loops.get(loop) is entry:
                del _loops[loop]
        for client in list(entry.by_kind.values()):
            await client.aclose()
        entry.by_kind.clear()


async def aclose_clients() -> None:
    """Close the running loop's tool clients and their pooled connections (at shutdown; a
    later ``call_tool`` on this loop would open new ones)."""
    loop = asyncio.get_running_loop()
    with _loops_lock:
        entry = _loops.get(loop)
        if entry is not None and entry.closer is None:  # no client was ever made
            del _loops[loop]
    if entry is not None and entry.closer is not None:
        await entry.closer.aclose()
