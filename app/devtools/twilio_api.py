"""A local stand-in for Twilio's REST API (api.twilio.com), for tests and offline runs.

A small threaded HTTP server on the loopback interface. It checks HTTP Basic auth with the
account SID and auth token, as Twilio does, records every request (method, path, query, form,
time, status answered), and serves what callbridge uses:

- the account (``GET /2010-04-01/Accounts/{sid}.json``), for ``callbridge twilio check``;
- incoming phone numbers: list by ``PhoneNumber`` and update, for ``configure-number``;
- calls: fetch, and update (``POST .../Calls/{CallSid}.json``) with ``Status=completed`` (hang
  up) or ``Twiml=`` / ``Url=`` (redirect, e.g. a transfer with ``<Dial>``);
- call recordings: start one (``POST .../Calls/{CallSid}/Recordings.json``); like Twilio, it then
  POSTs the ``in-progress`` status to ``RecordingStatusCallback``, signed with the auth token
  (``X-Twilio-Signature``), so the receiving end's signature check is exercised for real;
- outbound calls (``POST .../Calls.json``, ``calls.create`` in the SDK): answered 201 with a
  ``queued`` call resource (400 with Twilio's error body for a bad ``To``/``From``/``Url``), then,
  as Twilio does, the number is "dialled" in the background: a simulated callee chosen by the
  ``To`` number (``app.devtools.callees``: a person, a voicemail, a phone menu, a fax, busy, ...)
  rings, answers or not, and the signed status callbacks, the webhook (``Url``, or the ``Twiml``
  given), the media stream and the asynchronous AMD callback follow, each at the callee's pace.
  What each callee went through is in ``outbound`` (by CallSid); :meth:`wait_outbound` waits
  for one to finish.

Calls are known once registered (the simulated caller registers its CallSid, as Twilio knows
a call before the webhook fires). An update of a known, live call answers 200 with a call
resource shaped like Twilio's and notifies whoever registered the call, which then behaves
like Twilio: it ends the media stream. An unknown or already-ended call answers 404 with
Twilio's error body (code 20404). Point the twilio SDK at it with ``TWILIO_API_BASE`` (see
``app.twilio.rest.make_client``) or :meth:`TwilioApiStandIn.client`.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from app.devtools.endpoints import LOCAL_HOSTNAMES, LOOPBACK

if TYPE_CHECKING:
    from twilio.rest import Client

    from app.devtools.callees import Callee, CalleeResult, OutboundDial

API_VERSION = "2010-04-01"
DEFAULT_ACCOUNT_SID = "AC" + "0" * 32
DEFAULT_AUTH_TOKEN = "local-twilio-stand-in-token"
NUMBER_FIELDS = {
    "VoiceUrl": "voice_url",
    "VoiceMethod": "voice_method",
    "StatusCallback": "status_callback",
    "StatusCallbackMethod": "status_callback_method",
}
ENDING_STATUSES = frozenset({"completed", "canceled"})
NOT_YET_ANSWERED = frozenset({"queued", "ringing"})  # an outbound call still being dialled
MAX_BODY = 64 * 1024
E164 = re.compile(r"\+[1-9]\d{6,14}")  # what Twilio dials; anything else is error 21211
CALLBACK_TIMEOUT_S = 5.0  # a callback the receiver does not answer within this counts as failed (0)


@dataclass(frozen=True)
class RestRequest:
    """One request the stand-in received."""

    method: str
    path: str  # without the query string
    query: dict[str, str]
    form: dict[str, str]  # the urlencoded body of a POST; a repeated field's values joined by " "
    at: float  # time.monotonic() on arrival
    status: int  # what the stand-in answered

    @property
    def call_sid(self) -> str | None:
        """The CallSid in the path, for requests about one call."""
        parts = self.path.removesuffix(".json").split("/")
        if len(parts) >= 6 and parts[4] == "Calls":
            return parts[5]
        return None


@dataclass(frozen=True)
class CallUpdate:
    """What the bridge asked Twilio to do with a call, as the registered caller is told."""

    call_sid: str
    kind: str  # "hangup" (Status=completed/canceled) | "redirect" (Twiml= or Url=)
    twiml: str | None
    url: str | None
    form: dict[str, str]
    at: float


@dataclass
class CallState:
    sid: str
    from_: str
    to: str
    on_update: Callable[[CallUpdate], None] | None
    status: str = "in-progress"
    created: float = field(default_factory=time.time)
    ended: float | None = None
    twiml: str | None = None  # the last TwiML (or Url) it was redirected to
    direction: str = "inbound"  # "outbound-api" for a call placed through Calls.json
    answered_by: str | None = None  # the AMD verdict of an outbound call, once sent

    def resource(self, account_sid: str) -> dict[str, Any]:
        """A call resource shaped like Twilio's JSON (the fields the SDK reads)."""
        uri = f"/{API_VERSION}/Accounts/{account_sid}/Calls/{self.sid}.json"
        ended = self.ended is not None
        return {
            "sid": self.sid,
            "account_sid": account_sid,
            "parent_call_sid": None,
            "date_created": formatdate(self.created, usegmt=True),
            "date_updated": formatdate(time.time(), usegmt=True),
            "start_time": formatdate(self.created, usegmt=True),
            "end_time": formatdate(self.ended, usegmt=True) if self.ended is not None else None,
            "duration": str(int(self.ended - self.created)) if self.ended is not None else None,
            "to": self.to,
            "to_formatted": self.to,
            "from": self.from_,
            "from_formatted": self.from_,
            "phone_number_sid": None,
            "status": self.status,
            "direction": self.direction,
            "answered_by": self.answered_by,
            "api_version": API_VERSION,
            "forwarded_from": None,
            "group_sid": None,
            "caller_name": None,
            "queue_time": "0",
            "trunk_sid": None,
            "price": None if not ended else "-0.00850",
            "price_unit": "USD",
            "uri": uri,
            "subresource_uris": {"notifications": uri.replace(".json", "/Notifications.json")},
        }


class TwilioApiStandIn:
    """Twilio's REST API on ``127.0.0.1:port`` (0: a free port). Use as a context manager, or
    :meth:`start` / :meth:`stop`.

    ``requests`` records every request; ``numbers`` holds the account's phone numbers (by SID)
    and ``number_updates`` the forms of their updates; ``calls`` the registered calls.
    ``fail_call_updates`` (status, Twilio error code, message) makes call updates fail;
    ``call_update_delay`` makes them slow (seconds), both for tests of the bridge's handling.

    Outbound calls: ``callees`` maps a ``To`` number to the simulated callee that answers it
    (numbers not there: ``app.devtools.callees.DEFAULT_CALLEES``, else ``default_callee``, a
    person); ``outbound`` holds each outbound call's :class:`~app.devtools.callees.CalleeResult`
    by CallSid. ``ring_cap_s`` caps how long a call rings unanswered before ``no-answer`` (Twilio
    rings for ``Timeout``, 60 s by default: tests would wait that long).
    """

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        *,
        port: int = 0,
        account_status: str = "active",
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.account_status = account_status
        self.requests: list[RestRequest] = []
        self.numbers: dict[str, dict[str, Any]] = {}
        self.number_updates: list[dict[str, str]] = []
        self.calls: dict[str, CallState] = {}
        self.fail_call_updates: tuple[int, int, str] | None = None
        self.recordings: list[dict[str, Any]] = []  # recordings started, as answered
        self.recording_callbacks: list[tuple[str, int]] = []  # (status callback URL, HTTP status it answered)
        self.call_update_delay = 0.0
        self.callees: dict[str, Callee] = {}
        self.default_callee: Callee | None = None
        self.outbound: dict[str, CalleeResult] = {}
        self.ring_cap_s = 3.0
        self._dials: dict[str, OutboundDial] = {}
        self._lock = threading.Lock()
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> TwilioApiStandIn:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer((LOOPBACK, self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="twilio-api-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; outbound calls still going are cut short (their callees hang up)."""
        with self._lock:
            dials = list(self._dials.values())
        for dial in dials:
            dial.abort()
        deadline = time.monotonic() + 5
        for dial in dials:
            dial.wait(max(0.0, deadline - time.monotonic()))
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> TwilioApiStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the Twilio API stand-in is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """What to set ``TWILIO_API_BASE`` to."""
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that point callbridge (``serve`` and ``callbridge twilio``) here."""
        return {
            "TWILIO_API_BASE": self.base_url,
            "TWILIO_ACCOUNT_SID": self.account_sid,
            "TWILIO_AUTH_TOKEN": self.auth_token,
        }

    def client(self) -> Client:
        """A twilio SDK ``Client`` whose requests come here (as callbridge builds it)."""
        from app.twilio.rest import make_client

        return make_client(self.account_sid, self.auth_token, self.base_url)

    # --- the account's numbers and calls ---------------------------------------------------

    def add_number(self, phone_number: str, sid: str | None = None, **fields: str) -> str:
        """Give the account a phone number (fields: voice_url, voice_method, status_callback, ...)."""
        sid = sid or "PN" + format(len(self.numbers) + 1, "032x")
        record: dict[str, Any] = {
            "sid": sid,
            "account_sid": self.account_sid,
            "phone_number": phone_number,
            "friendly_name": phone_number,
            "voice_url": "",
            "voice_method": "POST",
            "status_callback": "",
            "status_callback_method": "POST",
            "api_version": API_VERSION,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/IncomingPhoneNumbers/{sid}.json",
        }
        record.update(fields)
        with self._lock:
            self.numbers[sid] = record
        return sid

    def register_call(
        self,
        call_sid: str,
        on_update: Callable[[CallUpdate], None] | None = None,
        *,
        from_: str = "+15550000001",
        to: str = "+15550000002",
    ) -> None:
        """Make ``call_sid`` a live call. ``on_update`` is called for each accepted update of it
        (hang-up or redirect) on the server's thread, before the API answers: it must not block."""
        with self._lock:
            self.calls[call_sid] = CallState(call_sid, from_, to, on_update)

    def post_signed(self, url: str, params: dict[str, str], method: str = "POST") -> int:
        """Send ``params`` to ``url`` as Twilio sends its callbacks (a form POST, or a GET with
        them in the query string), signed with the auth token; the HTTP status answered, 0 when
        nothing answered within ``CALLBACK_TIMEOUT_S``. Blocking."""
        from twilio.request_validator import RequestValidator

        validator = RequestValidator(self.auth_token)
        if method.upper() == "GET":
            url = url + ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(params)
            request = urllib.request.Request(url, headers={"X-Twilio-Signature": validator.compute_signature(url, {})})
        else:
            request = urllib.request.Request(
                url,
                data=urllib.parse.urlencode(params).encode(),
                headers={
                    "X-Twilio-Signature": validator.compute_signature(url, params),
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
        local = urllib.parse.urlsplit(url).hostname in LOCAL_HOSTNAMES
        opener = (
            urllib.request.build_opener(urllib.request.ProxyHandler({})) if local else urllib.request.build_opener()
        )
        try:
            with opener.open(request, timeout=CALLBACK_TIMEOUT_S) as answer:
                answer.read()
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code
        except OSError:
            return 0

    def wait_outbound(self, call_sid: str, timeout: float = 30.0) -> CalleeResult:
        """The result of outbound call ``call_sid`` once its callee is done with it (the last
        status callback answered); TimeoutError if it is not within ``timeout`` seconds."""
        with self._lock:
            dial = self._dials.get(call_sid)
        if dial is None:
            raise KeyError(f"no outbound call {call_sid}")
        if not dial.wait(timeout):
            raise TimeoutError(f"outbound call {call_sid} still going after {timeout} s")
        return dial.result

    def callee_for(self, number: str) -> Callee:
        """Who answers ``number``: a callee registered here, else a documented default number's,
        else ``default_callee`` (a person)."""
        from app.devtools.callees import DEFAULT_CALLEES, Callee, CalleeKind

        with self._lock:
            callee = self.callees.get(number)
        return callee or DEFAULT_CALLEES.get(number) or self.default_callee or Callee(CalleeKind.PERSON)

    def set_call_status(self, call_sid: str, status: str, *, ended: bool = False) -> None:
        """An outbound call moves on (ringing, in-progress, busy...); a call already ended (hung
        up through the API) keeps the status it ended with."""
        with self._lock:
            call = self.calls.get(call_sid)
            if call is None or call.ended is not None:
                return
            call.status = status
            if ended:
                call.ended = time.time()

    def set_answered_by(self, call_sid: str, answered_by: str) -> None:
        with self._lock:
            call = self.calls.get(call_sid)
            if call is not None:
                call.answered_by = answered_by

    def end_call(self, call_sid: str) -> None:
        """The call ended on its own (the caller hung up, or the stream closed): further updates
        answer 404, like Twilio's for a call that is over."""
        with self._lock:
            call = self.calls.get(call_sid)
            if call is not None and call.ended is None:
                call.status = "completed"
                call.ended = time.time()

    def requests_for(self, call_sid: str) -> list[RestRequest]:
        with self._lock:
            return [r for r in self.requests if r.call_sid == call_sid]

    def call_updates(self, call_sid: str | None = None) -> list[RestRequest]:
        """The POSTs to calls (all, or one call's), whatever they were answered."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "POST" and r.call_sid is not None and (call_sid is None or r.call_sid == call_sid)
            ]

    # --- request handling (server threads) -------------------------------------------------

    def _authorized(self, header: str | None) -> bool:
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return header == expected

    def _record(self, request: RestRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def handle(
        self, method: str, path: str, query: dict[str, str], form: dict[str, str]
    ) -> tuple[int, dict[str, Any], Callable[[], None] | None]:
        """(status, JSON body, what to do once the answer is sent) for one authorised request."""
        base = f"/{API_VERSION}/Accounts/{self.account_sid}"
        if not path.startswith(base):
            return self._not_found(path)
        rest = path[len(base) :]
        if method == "GET" and rest == ".json":
            return 200, self._account(), None
        if rest == "/IncomingPhoneNumbers.json" and method == "GET":
            return 200, self._number_page(path, query.get("PhoneNumber", "")), None
        if rest.startswith("/IncomingPhoneNumbers/") and method == "POST":
            return self._update_number(path, rest.split("/")[2].removesuffix(".json"), form)
        if rest == "/Calls.json" and method == "POST":
            return self._create_call(path, form)
        if rest.startswith("/Calls/") and rest.endswith("/Recordings.json") and method == "POST":
            return self._start_recording(path, rest.split("/")[2], form)
        if rest.startswith("/Calls/") and rest.endswith(".json") and rest.count("/") == 2:
            sid = rest.split("/")[2].removesuffix(".json")
            if method == "GET":
                with self._lock:
                    call = self.calls.get(sid)
                    return (200, call.resource(self.account_sid), None) if call else self._not_found(path)
            if method == "POST":
                return self._update_call(path, sid, form)
        return self._not_found(path)

    def _not_found(self, path: str) -> tuple[int, dict[str, Any], None]:
        return _error(404, 20404, f"The requested resource {path} was not found")

    def _create_call(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any], Callable[[], None] | None]:
        """Place an outbound call: checked like Twilio checks it, then dialled in the background
        once the 201 is on its way."""
        from app.devtools.callees import OutboundDial

        to, from_ = form.get("To", ""), form.get("From", "")
        if not to:
            return _error(400, 21201, "No 'To' number is specified")
        if not E164.fullmatch(to):
            return _error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not from_:
            return _error(400, 21603, "A 'From' phone number is required.")
        if not form.get("Twiml") and not form.get("Url"):
            return _error(400, 21205, "Url parameter is required.")
        url = form.get("Url", "")
        if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            return _error(400, 21205, f"Url is not a valid URL: {url}")
        sid = "CA" + uuid.uuid4().hex
        call = CallState(sid, from_, to, None, status="queued", direction="outbound-api")
        dial = OutboundDial(self, call, dict(form), self.callee_for(to))
        call.on_update = dial.on_update
        with self._lock:
            self.calls[sid] = call
            self._dials[sid] = dial
            self.outbound[sid] = dial.result
            body = call.resource(self.account_sid)
        body |= {"start_time": None, "duration": None}
        return 201, body, dial.start

    def _account(self) -> dict[str, Any]:
        return {
            "sid": self.account_sid,
            "friendly_name": "callbridge stand-in",
            "status": self.account_status,
            "type": "Full",
            "auth_token": "",
            "owner_account_sid": self.account_sid,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}.json",
        }

    def _number_page(self, path: str, wanted: str) -> dict[str, Any]:
        with self._lock:
            found = [dict(n) for n in self.numbers.values() if n["phone_number"] == wanted]
        return {
            "incoming_phone_numbers": found,
            "next_page_uri": None,
            "page": 0,
            "page_size": 50,
            "first_page_uri": path,
            "previous_page_uri": None,
            "uri": path,
            "start": 0,
            "end": len(found),
        }

    def _update_number(self, path: str, sid: str, form: dict[str, str]) -> tuple[int, dict[str, Any], None]:
        with self._lock:
            number = self.numbers.get(sid)
            if number is None:
                return self._not_found(path)
            self.number_updates.append(dict(form))
            for key, value in form.items():
                if key in NUMBER_FIELDS:
                    number[NUMBER_FIELDS[key]] = value
            return 200, dict(number), None

    def _start_recording(
        self, path: str, call_sid: str, form: dict[str, str]
    ) -> tuple[int, dict[str, Any], Callable[[], None] | None]:
        with self._lock:
            call = self.calls.get(call_sid)
            if call is None or call.ended is not None:
                return self._not_found(path)
            sid = "RE" + uuid.uuid4().hex
            uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{call_sid}/Recordings/{sid}.json"
            recording = {
                "sid": sid,
                "account_sid": self.account_sid,
                "call_sid": call_sid,
                "status": "in-progress",
                "channels": 2 if form.get("RecordingChannels") == "dual" else 1,
                "source": "StartCallRecording",
                "start_time": formatdate(time.time(), usegmt=True),
                "date_created": formatdate(time.time(), usegmt=True),
                "api_version": API_VERSION,
                "uri": uri,
            }
            self.recordings.append({**recording, "form": dict(form)})
        callback = form.get("RecordingStatusCallback")
        if not callback:
            return 201, recording, None
        params = {
            "AccountSid": self.account_sid,
            "CallSid": call_sid,
            "RecordingSid": sid,
            "RecordingUrl": f"https://api.twilio.com{uri.removesuffix('.json')}",
            "RecordingStatus": "in-progress",
            "RecordingChannels": str(recording["channels"]),
            "RecordingSource": "StartCallRecording",
        }
        return 201, recording, lambda: self._post_signed(callback, params)

    def _post_signed(self, url: str, params: dict[str, str]) -> None:
        """POST ``params`` to ``url`` as Twilio does its callbacks (form-encoded, signed), from a
        thread of its own: the API's answer does not wait for it."""

        def post() -> None:
            status = self.post_signed(url, params)
            with self._lock:
                self.recording_callbacks.append((url, status))

        threading.Thread(target=post, daemon=True).start()

    def _update_call(
        self, path: str, sid: str, form: dict[str, str]
    ) -> tuple[int, dict[str, Any], Callable[[], None] | None]:
        if self.call_update_delay > 0:
            time.sleep(self.call_update_delay)
        if self.fail_call_updates is not None:
            status, code, message = self.fail_call_updates
            body = {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            }
            return status, body, None
        with self._lock:
            call = self.calls.get(sid)
            if call is None or call.ended is not None:
                return self._not_found(path)
            new_status = form.get("Status")
            if new_status is not None and new_status not in ENDING_STATUSES:
                return (
                    400,
                    {
                        "code": 21218,
                        "message": f"Invalid Status: {new_status}",
                        "more_info": "https://www.twilio.com/docs/errors/21218",
                        "status": 400,
                    },
                    None,
                )
            if new_status is not None:
                outbound = call.direction == "outbound-api"
                if outbound and new_status == "canceled" and call.status not in NOT_YET_ANSWERED:
                    # like Twilio: canceling only ends a call not yet answered
                    return 200, call.resource(self.account_sid), None
                update = CallUpdate(sid, "hangup", None, None, dict(form), time.monotonic())
                call.status = "canceled" if outbound and call.status in NOT_YET_ANSWERED else "completed"
                call.ended = time.time()
            elif "Twiml" in form or "Url" in form:
                update = CallUpdate(sid, "redirect", form.get("Twiml"), form.get("Url"), dict(form), time.monotonic())
                call.twiml = form.get("Twiml") or form.get("Url")
            else:  # nothing to do (e.g. only a status callback): answer with the call as it is
                return 200, call.resource(self.account_sid), None
            body = call.resource(self.account_sid)
            callback = call.on_update
        return 200, body, (lambda: callback(update)) if callback is not None else None


def _error(status: int, code: int, message: str) -> tuple[int, dict[str, Any], None]:
    """Twilio's error body."""
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return status, body, None


def parse_form(body: str) -> dict[str, str]:
    """A urlencoded form as one string per field: a repeated field (``StatusCallbackEvent``) has
    its values joined by spaces, the way Twilio's documentation lists them."""
    form: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(body):
        form[key] = f"{form[key]} {value}" if key in form else value
    return form


class _Handler(BaseHTTPRequestHandler):
    api: TwilioApiStandIn
    protocol_version = "HTTP/1.1"

    def _serve(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_BODY)) if length else b""
        form = parse_form(body.decode(errors="replace")) if method == "POST" else {}
        after: Callable[[], None] | None = None
        if not self.api._authorized(self.headers.get("Authorization")):
            status, answer = 401, {"code": 20003, "message": "Authenticate", "more_info": "", "status": 401}
        else:
            status, answer, after = self.api.handle(method, url.path, query, form)
        self.api._record(RestRequest(method, url.path, query, form, time.monotonic(), status))
        if after is not None:  # the call has changed by the time the API answers
            after()
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass
