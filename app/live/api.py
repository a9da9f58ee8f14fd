"""The live call API (``/api/calls...``) and the console page (``/console``).

Routes, all behind ``OPERATOR_TOKEN`` (``app.operator_auth``) but the page itself and the
listen socket, which browsers open without headers and which therefore takes a single-use
ticket instead (``POST .../listen``). Everything about a call goes through
``app.live.registry``, which finds the process that holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.core.vocabulary import OperatorAction
from app.live.registry import LiveRegistry
from app.observability.log_limit import LogLimiter
from app.observability.logging import get_logger
from app.operator_auth import refusal
from app.outbound import BadRequest
from app.twilio.messages import SID_PATTERN
from app.twilio.stream_token import StreamTokens, Verified
from app.twilio.token_store import RedisTokenStore, TokenStoreUnavailable

log = get_logger(component="live_api")

CONSOLE_PAGE = Path(__file__).resolve().parent.parent / "console" / "console.html"
MAX_ACTION_BODY = 16 * 1024
"""Bytes of an action's JSON body: a sentence to say or a voice's settings fit many times over."""
MAX_ACTION_TEXT = 4000
"""Characters of a say, instruct or as_caller text (the agent's prompt limit is 25,000 in all)."""
TEXT_ACTIONS = frozenset({OperatorAction.SAY, OperatorAction.INSTRUCT, OperatorAction.AS_CALLER})
LISTEN_PROFILE = "listen"  # what a listen ticket is bound to, besides the call (never a stream's profile)
FORBIDDEN = 1008  # a WebSocket closed before its accept is answered 403 by the server


def json_object(raw: bytes, limit: int) -> dict[str, Any]:
    """An operator request's body: a JSON object of at most ``limit`` bytes, or ``BadRequest``."""
    if len(raw) > limit:
        raise BadRequest(f"the body is over {limit} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def parse_action(raw: bytes) -> dict[str, Any]:
    """The action's fields, checked for presence and type (what the call can take now is the
    call's to say: ``Call.steer_refusal``)."""
    body = json_object(raw, MAX_ACTION_BODY)
    name = body.get("action")
    try:
        action = OperatorAction(str(name))
    except ValueError:
        known = ", ".join(a.value for a in OperatorAction)
        raise BadRequest(f"unknown action {str(name)[:40]!r}; known: {known}") from None
    fields: dict[str, Any] = {"action": action.value}
    if action in TEXT_ACTIONS:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadRequest(f'{action.value} needs a non-empty "text"')
        if len(text) > MAX_ACTION_TEXT:
            raise BadRequest(f'"text" is over {MAX_ACTION_TEXT} characters')
        fields["text"] = text
    elif action is OperatorAction.VOICE:
        fields["speak"] = checked_speak(body.get("speak"))
    elif action is OperatorAction.TRANSFER:
        destination = body.get("destination")
        if not isinstance(destination, str) or not destination:
            raise BadRequest('transfer needs a "destination": a name from the profile\'s list')
        fields["destination"] = destination[:64]
    return fields


def checked_speak(speak: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """``speak`` as a profile's ``agent.speak`` must be: a provider object, or a list of them
    (fallbacks), each ``{"provider": {"type": ...}}``."""
    providers = speak if isinstance(speak, list) else [speak]
    if not providers or len(providers) > 5:
        raise BadRequest('voice needs "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}}')
    for one in providers:
        provider = one.get("provider") if isinstance(one, dict) else None
        if not isinstance(provider, dict) or not isinstance(provider.get("type"), str) or not provider["type"]:
            raise BadRequest('each "speak" needs a "provider" object with a "type", e.g. {"type": "deepgram", ...}')
    return speak  # type: ignore[no-any-return]


class ListenTickets:
    """Single-use tickets for the listen socket, valid for ``LISTEN_TICKET_SECONDS``: signed
    with a key derived from OPERATOR_TOKEN (every replica can check them), used up where stream
    tokens are (Redis across replicas, the machine's file across workers, else this process)."""

    def __init__(self, operator_token: str, ttl: float, tokens: StreamTokens, store: RedisTokenStore | None) -> None:
        key = hmac.new(operator_token.encode(), b"callbridge listen ticket", hashlib.sha256).digest()
        self.tokens = StreamTokens(key, ttl, machine=tokens.machine)
        self.store = store

    def mint(self, call_sid: str) -> str:
        return f"{call_sid}.{self.tokens.mint(call_sid, LISTEN_PROFILE)}"

    async def redeem(self, ticket: str) -> tuple[str, str | None]:
        """(the call, None) for a good ticket used for the first time, else (call, why not)."""
        call_sid, _, token = ticket.partition(".")
        if not SID_PATTERN.fullmatch(call_sid):
            return "", "malformed"
        verified = self.tokens.verify(token, call_sid, LISTEN_PROFILE)
        if isinstance(verified, str):
            return call_sid, verified
        return call_sid, await self._use(verified)

    async def _use(self, verified: Verified) -> str | None:
        if self.store is not None:
            try:
                return (
                    None if await self.store.use_once("listen:" + verified.nonce, verified.expires) else "already used"
                )
            except TokenStoreUnavailable:
                pass  # checked on this machine instead, as for stream tokens
        return self.tokens.use_locally(verified)


def listen_url(request: Request, public_url: str | None, ticket: str) -> str:
    if public_url:
        base = public_url.rstrip("/")
        base = (
            "wss://" + base.removeprefix("https://")
            if base.startswith("https://")
            else "ws://" + base.removeprefix("http://")
        )
    else:
        scheme = "wss" if request.url.scheme == "https" else "ws"
        base = f"{scheme}://{request.headers.get('host', request.url.netloc)}"
    return f"{base}/api/listen/{ticket}"


def live_routes(
    registry: LiveRegistry | None,
    token: str | None,
    tickets: ListenTickets | None,
    public_url: str | None,
) -> list[BaseRoute]:
    """The routes; with no token they all answer 404 (the API and the console are off)."""
    refusals = LogLimiter()

    def guard(request: Request) -> Response | None:
        problem = refusal(request, token)
        if problem is not None and problem.status_code == 401:
            refusals.warn(log, "operator_api_unauthorized", path=request.url.path[:80])
        return problem

    page = CONSOLE_PAGE.read_text(encoding="utf-8") if token else ""  # read once, not per request

    async def console(request: Request) -> Response:
        if not token:
            return JSONResponse({"error": "not found"}, status_code=404)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def list_calls(request: Request) -> Response:
        problem = guard(request)
        if problem is not None or registry is None:
            return problem or JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse({"calls": registry.calls()})

    async def one_call(request: Request) -> Response:
        problem = guard(request)
        if problem is not None or registry is None:
            return problem or JSONResponse({"error": "not found"}, status_code=404)
        detail = await registry.detail(request.path_params["call_sid"])
        if detail is None:
            return JSONResponse({"error": "no such live call"}, status_code=404)
        return JSONResponse(detail)

    async def events(request: Request) -> Response:
        problem = guard(request)
        if problem is not None or registry is None:
            return problem or JSONResponse({"error": "not found"}, status_code=404)
        stream = registry.follow(request.path_params["call_sid"])
        if stream is None:
            return JSONResponse({"error": "no such live call"}, status_code=404)
        return StreamingResponse(
            sse(stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def listen(request: Request) -> Response:
        problem = guard(request)
        if problem is not None or registry is None or tickets is None:
            return problem or JSONResponse({"error": "not found"}, status_code=404)
        call_sid = request.path_params["call_sid"]
        if registry.owner(call_sid) is None:
            return JSONResponse({"error": "no such live call"}, status_code=404)
        return JSONResponse({"url": listen_url(request, public_url, tickets.mint(call_sid))})

    async def actions(request: Request) -> Response:
        problem = guard(request)  # before the body is read
        if problem is not None or registry is None:
            return problem or JSONResponse({"error": "not found"}, status_code=404)
        call_sid = request.path_params["call_sid"]
        if registry.owner(call_sid) is None:
            return JSONResponse({"error": "no such live call"}, status_code=404)
        try:
            fields = parse_action(await bounded_body(request, MAX_ACTION_BODY))
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        answer = await registry.act(call_sid, fields)
        return JSONResponse(answer.body, status_code=answer.status)

    async def listen_socket(ws: WebSocket) -> None:
        if registry is None or tickets is None:
            await ws.close(FORBIDDEN)
            return
        call_sid, problem = await tickets.redeem(ws.path_params["ticket"])
        stream = registry.listen(call_sid) if problem is None else None
        if stream is None:
            refusals.warn(log, "listen_refused", problem=problem or "call not live")
            await ws.close(FORBIDDEN)
            return
        await ws.accept()
        log.info("listen_started", call_sid=call_sid)
        await relay_audio(ws, stream)
        log.info("listen_ended", call_sid=call_sid)

    return [
        Route("/console", console, methods=["GET"]),
        Route("/api/calls", list_calls, methods=["GET"]),
        Route("/api/calls/{call_sid}", one_call, methods=["GET"]),
        Route("/api/calls/{call_sid}/events", events, methods=["GET"]),
        Route("/api/calls/{call_sid}/listen", listen, methods=["POST"]),
        Route("/api/calls/{call_sid}/actions", actions, methods=["POST"]),
        WebSocketRoute("/api/listen/{ticket}", listen_socket),
    ]


async def bounded_body(request: Request, limit: int) -> bytes:
    """The body, read no further than ``limit`` (+1 byte, to tell that it is over)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            break
    return bytes(body)


async def sse(stream: AsyncIterator[str]) -> AsyncIterator[bytes]:
    try:
        async for event in stream:
            yield b"data: " + event.encode() + b"\n\n"
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


async def relay_audio(ws: WebSocket, stream: AsyncIterator[str]) -> None:
    """Frames to the listener until the call ends or the listener leaves, whichever is first
    (a listener who leaves during a quiet moment is not kept waiting for the next frame)."""

    async def until_closed() -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while (await ws.receive())["type"] != "websocket.disconnect":
                pass

    closed = asyncio.create_task(until_closed())
    try:
        while True:
            following = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({following, closed}, return_when=asyncio.FIRST_COMPLETED)
            if following not in done:
                following.cancel()
                break
            try:
                frame = following.result()
            except StopAsyncIteration:
                with contextlib.suppress(Exception):
                    await ws.close(1000)
                break
            await ws.send_text(frame)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        closed.cancel()
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]
