"""The operator's bearer token (``OPERATOR_TOKEN``), shared by every ``/api/`` route and the
console: the live call API and outbound calls.

Unset, the API does not exist (404: nothing to find for a scanner). Set, every request carries
``Authorization: Bearer <token>``, compared in constant time and checked before anything else
of the request is read (a body is never parsed for a caller without the token).
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

MIN_OPERATOR_TOKEN = 24
"""Characters at least: a bearer token guessed online must be out of reach (24 random URL-safe
characters are 144 bits)."""


def bearer_ok(connection: HTTPConnection, token: str) -> bool:
    header = connection.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def refusal(connection: HTTPConnection, token: str | None) -> JSONResponse | None:
    """The answer for a request without the right token (404 when the API is off), else None."""
    if not token:
        return JSONResponse({"error": "not found"}, status_code=404)
    if not bearer_ok(connection, token):
        return JSONResponse(
            {"error": "missing or wrong bearer token (OPERATOR_TOKEN)"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None
