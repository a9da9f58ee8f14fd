"""Operator tools: a function the agent calls, answered by the operator's own HTTP endpoint.

The bridge POSTs JSON (``call_sid``, ``from``, ``to``, ``function``, ``arguments``) signed
like call records (``app/signing.py``) and passes the answer's body to the agent as the
function's ``content``. Every failure becomes a sentence the agent can act on; nothing here
raises. The request runs in a thread (urllib), so the event loop and the audio never wait.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from app.signing import signed_headers

MAX_ANSWER_BYTES = 16 * 1024
"""Bytes of an answer read; a larger one is refused (an LLM cannot use pages of text, and a
tool that sends them is broken)."""

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_WITH_PROXY = urllib.request.build_opener()


async def call_tool(url: str, payload: dict[str, Any], secret: bytes | None, limit_s: float) -> tuple[str, bool]:
    """POST ``payload`` to ``url``; (content for the agent, whether it failed). ``limit_s``
    bounds each socket operation of the request."""
    return await asyncio.to_thread(_post, url, payload, secret, limit_s)


def _post(url: str, payload: dict[str, Any], secret: bytes | None, timeout: float) -> tuple[str, bool]:
    name = str(payload.get("function", "the function"))
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "callbridge"}
    if secret is not None:
        headers |= signed_headers(secret, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    host = urlsplit(url).hostname or ""
    opener = _NO_PROXY if host in ("127.0.0.1", "localhost", "::1") else _WITH_PROXY
    try:
        with opener.open(request, timeout=timeout) as response:
            answer = response.read(MAX_ANSWER_BYTES + 1)
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"{name} failed: the service answered HTTP {exc.code}.", True
    except TimeoutError:
        return f"{name} did not answer within {timeout:g} seconds.", True
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{name} could not be reached ({type(reason).__name__}).", True
    if len(answer) > MAX_ANSWER_BYTES:
        return f"{name} answered with more than {MAX_ANSWER_BYTES // 1024} KB, which is too much to use.", True
    text = answer.decode("utf-8", errors="replace")
    if "json" in content_type:
        try:
            return json.dumps(json.loads(text), separators=(",", ":")), False
        except ValueError:
            return f"{name} answered with invalid JSON.", True
    return text, False
