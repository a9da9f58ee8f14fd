"""Twilio REST helpers for operators: point a number at the bridge, check the setup.

They use twilio's own SDK. ``TWILIO_API_BASE`` (default https://api.twilio.com) can send the
SDK's requests elsewhere: an egress proxy, or a local stand-in in tests.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from app.twilio.webhook import STATUS_PATH, VOICE_PATH

API_BASE = "https://api.twilio.com"
E164 = re.compile(r"\+[1-9]\d{6,14}")


class SetupError(Exception):
    """A problem the operator must fix, worded for them."""


class RedirectingHttpClient(TwilioHttpClient):  # type: ignore[misc]
    def __init__(self, base_url: str) -> None:
        super().__init__(timeout=15)
        self.base_url = base_url.rstrip("/")

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        if url.startswith(API_BASE):
            url = self.base_url + url[len(API_BASE) :]
        return super().request(method, url, *args, **kwargs)


def make_client(account_sid: str | None, auth_token: str | None, api_base: str | None = None) -> Client:
    if not account_sid or not auth_token:
        raise SetupError("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must both be set")
    http = RedirectingHttpClient(api_base) if api_base and api_base != API_BASE else TwilioHttpClient(timeout=15)
    return Client(account_sid, auth_token, http_client=http)


@dataclass(frozen=True)
class Change:
    field: str
    current: str
    desired: str


def desired_number_settings(public_url: str, status_callback: bool) -> dict[str, str]:
    settings = {"voice_url": public_url + VOICE_PATH, "voice_method": "POST"}
    if status_callback:
        settings |= {"status_callback": public_url + STATUS_PATH, "status_callback_method": "POST"}
    return settings


def configure_number(
    client: Client, number: str, public_url: str | None, *, dry_run: bool, status_callback: bool = True
) -> tuple[str, list[Change]]:
    """Point ``number``'s voice webhook (and status callback) at the bridge.

    Returns the number's SID and the changes made (or, with ``dry_run``, that would be made).
    """
    if not E164.fullmatch(number):
        raise SetupError(f"{number!r} is not an E.164 number such as +15551234567")
    if not public_url:
        raise SetupError("PUBLIC_URL must be set: it is the address Twilio will call")
    if not public_url.startswith("https://"):
        raise SetupError(f"PUBLIC_URL must be https:// for Twilio, not {public_url}")
    try:
        found = client.incoming_phone_numbers.list(phone_number=number, limit=2)
    except TwilioException as exc:
        raise SetupError(f"Twilio refused the lookup: {_describe(exc)}") from exc
    if not found:
        raise SetupError(f"{number} is not a phone number of this Twilio account")
    record = found[0]
    desired = desired_number_settings(public_url, status_callback)
    changes = [
        Change(name, str(getattr(record, name) or ""), value)
        for name, value in desired.items()
        if str(getattr(record, name) or "") != value
    ]
    if changes and not dry_run:
        try:
            client.incoming_phone_numbers(record.sid).update(**{c.field: c.desired for c in changes})
        except TwilioException as exc:
            raise SetupError(f"Twilio refused the update: {_describe(exc)}") from exc
    return str(record.sid), changes


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_setup(
    client: Client | None, account_sid: str | None, public_url: str | None, number: str | None
) -> list[Check]:
    checks: list[Check] = []
    if client is None or not account_sid:
        checks.append(Check("credentials", False, "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must both be set"))
    else:
        try:
            account = client.api.v2010.accounts(account_sid).fetch()
            checks.append(
                Check("credentials", account.status == "active", f"account {account.sid} is {account.status}")
            )
        except TwilioException as exc:
            checks.append(Check("credentials", False, f"Twilio refused: {_describe(exc)}"))
    if not public_url:
        checks.append(Check("public_url", False, "PUBLIC_URL is not set"))
    else:
        checks.append(Check("public_url_https", public_url.startswith("https://"), public_url))
        checks.append(Check("public_url_reachable", *_reachable(public_url + "/healthz")))
    if number and client is not None and public_url:
        try:
            _, changes = configure_number(client, number, public_url, dry_run=True)
            detail = "points at this bridge" if not changes else "differs: " + ", ".join(c.field for c in changes)
            checks.append(Check(f"number {number}", not changes, detail))
        except SetupError as exc:
            checks.append(Check(f"number {number}", False, str(exc)))
    return checks


def _describe(exc: Exception) -> str:
    if isinstance(exc, TwilioRestException):
        return f"HTTP {exc.status} {exc.msg}"
    return " ".join(str(part) for part in exc.args)


def _reachable(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200, f"GET {url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        exc.close()
        return False, f"GET {url} answered {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"GET {url} failed: {exc}"
