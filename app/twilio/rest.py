"""Twilio REST helpers for operators: point a number at the bridge, check the setup.

They use twilio's own SDK. ``TWILIO_API_BASE`` (default https://api.twilio.com) can send the
SDK's requests elsewhere: an egress proxy, or a local stand-in in tests.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from app.core.events import CallGone, CallUpdated, CallUpdateFailed, RecordingFailed, RecordingStarted
from app.core.vocabulary import RestResult
from app.twilio.webhook import STATUS_PATH, VOICE_PATH

HEALTH_PATH = "/healthz"

API_BASE = "https://api.twilio.com"
E164 = re.compile(r"\+[1-9]\d{6,14}")


T = TypeVar("T")
TIMEOUT_S = 15


class SetupError(Exception):
    """A problem the operator must fix, worded for them."""


class TwilioUnreachable(SetupError):
    """No answer at all from the Twilio API: DNS, connection, proxy, TLS or timeout."""


class RedirectingHttpClient(TwilioHttpClient):  # type: ignore[misc]
    def __init__(self, base_url: str) -> None:
        super().__init__(timeout=TIMEOUT_S)
        self.base_url = base_url.rstrip("/")

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        if url.startswith(API_BASE):
            url = self.base_url + url[len(API_BASE) :]
        return super().request(method, url, *args, **kwargs)


def make_client(account_sid: str | None, auth_token: str | None, api_base: str | None = None) -> Client:
    if not account_sid or not auth_token:
        raise SetupError("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must both be set")
    http = RedirectingHttpClient(api_base) if api_base and api_base != API_BASE else TwilioHttpClient(timeout=TIMEOUT_S)
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
        found = _call(client, lambda: client.incoming_phone_numbers.list(phone_number=number, limit=2))
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
            fields = {c.field: c.desired for c in changes}
            _call(client, lambda: client.incoming_phone_numbers(record.sid).update(**fields))
        except TwilioException as exc:
            raise SetupError(f"Twilio refused the update: {_describe(exc)}") from exc
    return str(record.sid), changes


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    skipped: bool = False  # could not be run (it needs something an earlier check found missing)


def check_setup(
    client: Client | None, account_sid: str | None, public_url: str | None, number: str | None
) -> list[Check]:
    """Every check that can run does, even when Twilio or the bridge is unreachable."""
    checks: list[Check] = []
    twilio_reachable = client is not None
    if client is None or not account_sid:
        checks.append(Check("credentials", False, "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must both be set"))
    else:
        try:
            account = _call(client, lambda: client.api.v2010.accounts(account_sid).fetch())
            checks.append(
                Check("credentials", account.status == "active", f"account {account.sid} is {account.status}")
            )
        except TwilioException as exc:
            checks.append(Check("credentials", False, f"Twilio refused: {_describe(exc)}"))
        except TwilioUnreachable as exc:
            twilio_reachable = False
            checks.append(Check("credentials", False, str(exc)))
    if not public_url:
        checks.append(Check("public_url", False, "PUBLIC_URL is not set"))
    else:
        https = public_url.startswith("https://")
        checks.append(
            Check("public_url_https", https, public_url if https else f"{public_url}: Twilio needs an https:// URL")
        )
        checks.append(Check("public_url_reachable", *public_url_reachable(public_url)))
    if number:
        name = f"number {number}"
        if client is None or not public_url:
            needs = " and ".join(
                what for what, missing in (("credentials", client is None), ("PUBLIC_URL", not public_url)) if missing
            )
            checks.append(Check(name, False, f"not checked: needs {needs}", skipped=True))
        elif not twilio_reachable:
            checks.append(Check(name, False, "not checked: the Twilio API could not be reached", skipped=True))
        else:
            try:
                _, changes = configure_number(client, number, public_url, dry_run=True)
                detail = "points at this bridge" if not changes else "differs: " + ", ".join(c.field for c in changes)
                checks.append(Check(name, not changes, detail))
            except SetupError as exc:
                checks.append(Check(name, False, str(exc)))
    return checks


def _call(client: Client, request: Callable[[], T]) -> T:
    """Run one SDK request; a network failure becomes one sentence for the operator."""
    try:
        return request()
    except requests.RequestException as exc:
        base = getattr(client.http_client, "base_url", API_BASE)
        raise TwilioUnreachable(unreachable_message(base, exc)) from None


def unreachable_message(base: str, exc: requests.RequestException) -> str:
    """What could not be reached, why (as far as the network says), and what to look at."""
    host = base.split("://", 1)[-1].split("/", 1)[0]
    causes = list(_causes(exc))
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    proxy = next((_without_credentials(os.environ[k]) for k in proxies if os.environ.get(k)), None)
    if isinstance(exc, requests.exceptions.ProxyError):
        why = f"the proxy {proxy} failed or refused" if proxy else "the proxy failed or refused"
        look = "HTTPS_PROXY / NO_PROXY"
    elif isinstance(exc, requests.exceptions.SSLError):
        why, look = "the TLS handshake failed", "the system's CA certificates, or a TLS-inspecting proxy"
    elif isinstance(exc, requests.exceptions.Timeout):
        why, look = f"no answer within {TIMEOUT_S} s", "the firewall and outbound HTTPS access"
    elif any(isinstance(c, socket.gaierror) for c in causes):
        why, look = f"the name {host.rsplit(':', 1)[0]} does not resolve", "DNS on this machine"
    elif any(isinstance(c, ConnectionRefusedError) for c in causes):
        why, look = "the connection was refused", "the firewall and outbound HTTPS access"
    elif isinstance(exc, requests.exceptions.ConnectionError):
        why, look = "the connection failed", "the network and outbound HTTPS access"
    else:
        why, look = f"the request could not be sent ({type(exc).__name__})", "the URL"
    if proxy and not isinstance(exc, requests.exceptions.ProxyError):
        look += f", the proxy {proxy} (HTTPS_PROXY)"
    if base.rstrip("/") != API_BASE:
        look += ", TWILIO_API_BASE"
    return f"cannot reach the Twilio API at {base}: {why}; check {look}"


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (requests -> urllib3 -> socket)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(w for w in wrapped if isinstance(w, BaseException))


def _describe(exc: Exception) -> str:
    if isinstance(exc, TwilioRestException):
        return f"HTTP {exc.status} {exc.msg}"
    return " ".join(str(part) for part in exc.args)


REACH_TIMEOUT_S = 5
PLAIN_HTTP_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)
"""What OpenSSL says when the other end answers TLS in plain text (3.0 says the first; 3.2 and
later often the second)."""


def public_url_reachable(public_url: str) -> tuple[bool, str]:
    """Whether GET PUBLIC_URL/healthz answers 200 from here, and if not why, in words."""
    url = public_url + HEALTH_PATH
    try:
        with urllib.request.urlopen(url, timeout=REACH_TIMEOUT_S) as response:
            return response.status == 200, f"GET {url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        exc.close()
        return False, (
            f"PUBLIC_URL {public_url} answers, but GET {HEALTH_PATH} answered HTTP {exc.code} {exc.reason}: "
            "is this bridge behind it?"
        )
    except (OSError, ValueError) as exc:  # urllib's URLError is an OSError
        host = urlsplit(url).hostname or ""
        proxy = urllib.request.getproxies().get(urlsplit(url).scheme)
        through = ""
        if proxy and not urllib.request.proxy_bypass(host):
            through = f" (through the proxy {_without_credentials(proxy)})"
        return False, f"PUBLIC_URL {public_url} is not reachable{through}: {failure_words(exc, host)}"


def failure_words(exc: BaseException, host: str = "", timeout: float = REACH_TIMEOUT_S) -> str:
    """Why a request to ``host`` (made with ``timeout``) got no answer, in words, never an
    exception's repr: a refused connection, a name that does not resolve, a TLS certificate
    not accepted, a timeout..."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not accepted: {cause.verify_message or cause.reason}"
    for cause in causes:
        if isinstance(cause, ssl.SSLError) and cause.reason in PLAIN_HTTP_REASONS:
            return "the TLS handshake failed: no TLS there (plain http?)"
        if isinstance(cause, ssl.SSLError):
            return f"the TLS handshake failed: {cause.reason or cause.strerror or type(cause).__name__}"
        if isinstance(cause, socket.gaierror):
            return f"the name {host} does not resolve" if host else "the name does not resolve"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, TimeoutError):
            return f"no answer within {timeout:g} s"
        if isinstance(cause, ConnectionResetError):
            return "the connection was reset"
    for cause in causes:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
        if isinstance(cause, ValueError):
            return f"not a URL ({cause})"
    return type(exc).__name__


CALL_GONE_CODES = {
    20404: "Twilio 20404: not found",  # the call ended and is no longer a live resource
    21220: "Twilio 21220: call not in progress",  # it exists but has ended: cannot be changed
}
"""Twilio's answers to an update of a call that is over: either means the caller is gone."""


def _request_failed(exc: TwilioException | TwilioUnreachable) -> str:
    """A live call's REST request that failed, in one line: Twilio's error code and answer,
    why it could not be sent, or what else the SDK raised."""
    if isinstance(exc, TwilioRestException):
        return f"Twilio error {exc.code}: HTTP {exc.status} {str(exc.msg)[:200]}"
    if isinstance(exc, TwilioUnreachable):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc)[:200]}"


REST_THREADS = 8
"""Threads for Twilio REST requests of live calls, per process, apart from the event loop's
default executor (which also resolves the agent's host name for every new call): a burst of
hang-ups (a proxy that killed many streams at once) waits here, each bounded by the SDK's
15 s timeout, and never delays the next call's agent connection."""


class CallNotPlaced(Exception):
    """Twilio did not create the call; ``bad_request``: it refused what was asked (a 400)."""

    def __init__(self, words: str, bad_request: bool = False) -> None:
        super().__init__(words)
        self.bad_request = bad_request


class CallUpdater:
    """Hang-ups and transfers of live calls, through the SDK in threads of its own so the event
    loop (every call's audio) never waits on Twilio. Answers are core events; nothing raises."""

    def __init__(self, account_sid: str, auth_token: str, api_base: str | None = None) -> None:
        self._client = make_client(account_sid, auth_token, api_base)
        self._threads = ThreadPoolExecutor(REST_THREADS, thread_name_prefix="twilio-rest")

    async def hang_up(self, call_sid: str) -> CallUpdated | CallGone | CallUpdateFailed:
        return await self._in_thread(self._update, call_sid, {"status": "completed"})

    async def transfer(self, call_sid: str, twiml: str) -> CallUpdated | CallGone | CallUpdateFailed:
        return await self._in_thread(self._update, call_sid, {"twiml": twiml})

    async def start_recording(self, call_sid: str, status_callback_url: str) -> RecordingStarted | RecordingFailed:
        return await self._in_thread(self._record, call_sid, status_callback_url)

    async def place_call(self, request: dict[str, Any]) -> str:
        """Create an outbound call (``Calls.create``'s keyword arguments): its CallSid, or
        ``CallNotPlaced`` with Twilio's words (and whether the request itself was at fault)."""
        return await self._in_thread(self._create, request)

    def _create(self, request: dict[str, Any]) -> str:
        try:
            call = _call(self._client, lambda: self._client.calls.create(**request))
        except (TwilioException, TwilioUnreachable) as exc:
            bad = isinstance(exc, TwilioRestException) and exc.status == 400
            raise CallNotPlaced(_request_failed(exc), bad_request=bad) from None
        return str(call.sid)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def close(self) -> None:
        """Let requests in flight finish (each bounded by the SDK's timeout) without waiting."""
        self._threads.shutdown(wait=False)

    def _record(self, call_sid: str, status_callback_url: str) -> RecordingStarted | RecordingFailed:
        """Both channels (caller and agent apart), as Twilio keeps them with the account's
        other recordings; the status callback, when there is a public URL, says when it is ready."""
        options: dict[str, Any] = {"recording_channels": "dual"}
        if status_callback_url:
            options["recording_status_callback"] = status_callback_url
            options["recording_status_callback_event"] = ["in-progress", "completed", "absent"]
        try:
            recording = _call(self._client, lambda: self._client.calls(call_sid).recordings.create(**options))
        except (TwilioException, TwilioUnreachable) as exc:
            return RecordingFailed(_request_failed(exc))
        return RecordingStarted(str(recording.sid))

    def _update(self, call_sid: str, change: dict[str, str]) -> CallUpdated | CallGone | CallUpdateFailed:
        try:
            _call(self._client, lambda: self._client.calls(call_sid).update(**change))
        except (TwilioException, TwilioUnreachable) as exc:
            if isinstance(exc, TwilioRestException) and exc.code in CALL_GONE_CODES:
                return CallGone(CALL_GONE_CODES[exc.code])
            return CallUpdateFailed(_request_failed(exc))
        return CallUpdated(RestResult.OK, "")
