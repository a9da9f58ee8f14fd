"""Who may hold a place: MAX_CALLS counts calls, and sockets without a token are kept apart.

A place under ``MAX_CALLS`` is held by a call the webhook admitted (for ``ADMISSION_HOLD_SECONDS``,
while Twilio opens its stream) and by a media stream whose one-time token was redeemed. A
WebSocket that has not presented a token is nobody yet: anyone on the internet can open one,
so it never counts towards MAX_CALLS. Such sockets wait in a pool of their own
(``MAX_TOKENLESS_STREAMS``) for at most ``STREAM_START_TIMEOUT_SECONDS``; when the pool is full
the oldest is evicted to make room. A real stream is in the pool only from its upgrade until
its ``start`` arrives with a token signed for its CallSid: one network round trip to Twilio
(then, with a shared token store, it leaves before the store answers). So token-less sockets,
held or churned, push out only each other unless a flood completes a whole pool of upgrades
within that round trip: the pool must exceed the attack's upgrades per second times the
round trip (512 against 100 ms is 5,120 upgrades a second, several times what one process
accepts; measured here: about 1,000 a second from one client on loopback).

With ``serve --workers N`` the count of calls is the instance's (``InstanceLoad``, in the
machine's shared file); the pool is each worker's own (it guards the worker's own memory).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from app.observability.log_limit import LogLimiter
from app.observability.logging import get_logger
from app.workers import InstanceLoad

log = get_logger(component="admission")

ADMISSION_HOLD_SECONDS = 10.0
"""How long a call admitted by the webhook holds its place while Twilio opens its stream
(normally well under a second)."""

S = TypeVar("S")


class TokenlessPool(Generic[S]):
    """Sockets accepted whose stream token is not redeemed yet, oldest first, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiting: dict[S, None] = {}  # insertion-ordered: the first is the oldest

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, socket: S) -> S | None:
        """Take ``socket`` in; the one evicted to make room, if the pool was full."""
        evicted = None
        if len(self._waiting) >= self.limit:
            evicted = next(iter(self._waiting))
            del self._waiting[evicted]
        self._waiting[socket] = None
        return evicted

    def discard(self, socket: S) -> None:
        self._waiting.pop(socket, None)


class Admission(Generic[S]):
    """The places of this process (or instance): webhook admissions, calls, token-less sockets."""

    def __init__(
        self,
        max_calls: int,
        max_tokenless: int,
        load: InstanceLoad | None = None,
        refusals: LogLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_calls = max_calls
        self.load = load
        self.refusals = refusals or LogLimiter()
        self.clock = clock
        self.draining = False
        self.admissions: dict[str, float] = {}  # CallSid -> admitted at, stream not started (bounded by max_calls)
        self.calls: set[S] = set()  # streams whose token was redeemed, on this process
        self.tokenless: TokenlessPool[S] = TokenlessPool(max_tokenless)

    # --- the webhook ---------------------------------------------------------------------

    def try_admit(self, call_sid: str, hold: float = ADMISSION_HOLD_SECONDS) -> str | None:
        """Admit a call, or say why not ("draining", "over_capacity"). Calls admitted whose
        stream has not started yet count, so a burst cannot overshoot. With workers, the check
        and the admission are one step in the machine's file; should that file fail, this
        worker's own calls are checked (and it is logged). ``hold``: how long the place waits
        for the stream (an outbound call's rings and answering-machine check first)."""
        if self.draining:
            return "draining"
        extra = max(0.0, hold - ADMISSION_HOLD_SECONDS)
        if self.load is not None:
            try:
                return None if self.load.admit(call_sid, self.max_calls, extra_hold=extra) else "over_capacity"
            except sqlite3.Error as exc:
                self._shared_file_failed(exc)
        self._expire()
        if self._full():
            return "over_capacity"
        self.admissions[call_sid] = self.clock() + extra  # expires ``hold`` from now
        return None

    def rekey(self, old: str, new: str) -> None:
        """An admission made before the call had its CallSid (outbound) now goes by it."""
        if self.load is not None:
            try:
                self.load.rekey(old, new)
                return
            except sqlite3.Error as exc:
                self._shared_file_failed(exc)
        if old in self.admissions:
            self.admissions[new] = self.admissions.pop(old)

    def release(self, call_sid: str) -> None:
        """A call admitted that will never stream (not answered, or not dialled): its place is free."""
        if self.load is not None:
            try:
                self.load.release(call_sid)
                return
            except sqlite3.Error as exc:
                self._shared_file_failed(exc)
        self.admissions.pop(call_sid, None)

    # --- media sockets -------------------------------------------------------------------

    def socket_opened(self, socket: S) -> S | None:
        """A media socket was accepted: it waits in the token-less pool. Returns the socket
        evicted to make room (the caller ends it), if any."""
        return self.tokenless.add(socket)

    def claim(self, socket: S, call_sid: str) -> bool:
        """``socket`` redeemed the token of ``call_sid``: it leaves the pool and becomes a call,
        in the place its webhook admission held, or in a free one. False: no place (the stream
        is refused as over capacity)."""
        self.token_verified(socket)
        if self.load is not None:
            try:
                taken = self.load.claim(call_sid, self.max_calls, len(self.calls) + 1, refuse_new=self.draining)
            except sqlite3.Error as exc:
                self._shared_file_failed(exc)
            else:
                if taken:
                    self.calls.add(socket)
                return taken
        self._expire()
        admitted = self.admissions.pop(call_sid, None) is not None
        if not admitted and (self.draining or self._full()):
            return False
        self.calls.add(socket)
        return True

    def token_verified(self, socket: S) -> None:
        """``socket``'s token carries our signature for its CallSid: whatever a shared store
        says of its single use, it is no longer a token-less socket, and leaves the pool."""
        self.tokenless.discard(socket)

    def waiting(self) -> int:
        """Calls the webhook admitted whose stream has not started yet (their holds not lapsed)."""
        if self.load is not None:
            try:
                return self.load.waiting()
            except sqlite3.Error as exc:
                self._shared_file_failed(exc)
        self._expire()
        return len(self.admissions)

    def socket_closed(self, socket: S) -> None:
        self.tokenless.discard(socket)
        if socket in self.calls:
            self.calls.discard(socket)
            self.publish()

    # --- the count -----------------------------------------------------------------------

    def active(self) -> int:
        """Calls in progress (token redeemed) on this instance: every worker's, when there are several."""
        if self.load is not None:
            try:
                return self.load.active()
            except sqlite3.Error as exc:
                self._shared_file_failed(exc)
        return len(self.calls)

    def publish(self) -> None:
        """This worker's count of calls into the machine's file (with workers)."""
        if self.load is not None:
            try:
                self.load.set_active(len(self.calls))
            except sqlite3.Error as exc:
                self._shared_file_failed(exc)

    def _full(self) -> bool:
        """This process's calls and admissions fill MAX_CALLS (without the machine's file)."""
        return len(self.calls) + len(self.admissions) >= self.max_calls

    def _expire(self) -> None:
        now = self.clock()
        for call_sid, at in list(self.admissions.items()):
            if now - at > ADMISSION_HOLD_SECONDS:  # Twilio never opened that stream
                del self.admissions[call_sid]

    def _shared_file_failed(self, exc: sqlite3.Error) -> None:
        self.refusals.warn(log, "instance_load_unavailable", detail=str(exc), fallback="this worker's calls")
