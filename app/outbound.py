"""Calls the bridge places (``POST /api/calls``): the request checked, the profile's
placeholders filled, and what the call's processes share about it.

A call placed here is met by several requests that may land on different workers or replicas:
the API request that dials it, Twilio's fetch of its TwiML when the callee answers, the status
and answering-machine callbacks, and the media stream. What they share is one record per call
in ``OutboundStore``, where stream tokens' single use lives: Redis across replicas
(``REDIS_URL``), the machine's SQLite file between workers, this process's memory otherwise.
Every record expires (``RECORD_TTL_SECONDS``), so the store stays bounded by the calls of the
last hour.

Placeholders are ``{{name}}`` in the prompt, the greeting and the voicemail message; values
are data: replaced once, as text, never evaluated, and never put into TwiML (they reach the
agent in Settings' JSON and in InjectAgentMessage only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from app import machine_db
from app.observability.logging import get_logger

log = get_logger(component="outbound")

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]{0,63})\s*\}\}")
MAX_VARIABLES = 50
"""Variables one request may carry."""
MAX_VARIABLE_CHARS = 1000
"""Characters of one variable's value (a name, a date, an order summary)."""
RING_TIMEOUT_SECONDS = 30
"""Twilio's ``Timeout``: how long the callee's phone rings before ``no-answer``."""
HOLD_MARGIN_SECONDS = 15.0
"""The place in MAX_CALLS waits for the stream this long beyond ringing and AMD (Twilio's own delays)."""
RECORD_TTL_SECONDS = 3600.0
"""A call's shared record is kept this long after it is placed (well past any call's ring and AMD)."""
MAX_RECORDS = 100_000
"""Records kept in one process's memory (single process without Redis): past it the oldest go."""
STORE_TIMEOUT_SECONDS = 1.0
"""Redis answers within this or the store is taken as unavailable for that request."""
AMD_STATUSES = frozenset(
    {"human", "unknown", "machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"}
)
FINAL_STATUSES = frozenset({"no-answer", "busy", "failed", "canceled", "completed"})
"""Status callbacks after which the call will never stream (again): its place is released."""


class BadRequest(Exception):
    """A 400: the request as sent cannot be dialled. ``missing``: placeholders with no value."""

    def __init__(self, words: str, missing: list[str] | None = None) -> None:
        super().__init__(words)
        self.missing = missing or []


def placeholders(text: str) -> list[str]:
    return [m.group(1) for m in PLACEHOLDER.finditer(text)]


def fill(text: str, variables: dict[str, str]) -> str:
    """``text`` with each ``{{name}}`` replaced by its value, once (a value that looks like a
    placeholder stays as it is: nothing is expanded twice)."""
    return PLACEHOLDER.sub(lambda m: variables[m.group(1)], text)


def templated_texts(agent: dict[str, Any] | str, voicemail: str) -> list[str]:
    """The texts of a profile that take placeholders: every think prompt, the greeting, the voicemail."""
    texts = [voicemail]
    if isinstance(agent, dict):
        think = agent.get("think")
        for one in think if isinstance(think, list) else [think]:
            if isinstance(one, dict) and isinstance(one.get("prompt"), str):
                texts.append(one["prompt"])
        if isinstance(agent.get("greeting"), str):
            texts.append(agent["greeting"])
    return texts


def missing_variables(agent: dict[str, Any] | str, voicemail: str, variables: dict[str, str]) -> list[str]:
    names: list[str] = []
    for text in templated_texts(agent, voicemail):
        names += [n for n in placeholders(text) if n not in variables and n not in names]
    return names


def filled_agent(agent: dict[str, Any] | str, variables: dict[str, str]) -> dict[str, Any] | str:
    """The profile's agent block with its prompt(s) and greeting filled in."""
    if not isinstance(agent, dict):
        return agent
    out = dict(agent)
    think = agent.get("think")
    if isinstance(think, dict | list):
        thinks = think if isinstance(think, list) else [think]
        new = [
            {**t, "prompt": fill(t["prompt"], variables)}
            if isinstance(t, dict) and isinstance(t.get("prompt"), str)
            else t
            for t in thinks
        ]
        out["think"] = new if isinstance(think, list) else new[0]
    if isinstance(agent.get("greeting"), str):
        out["greeting"] = fill(agent["greeting"], variables)
    return out


def checked_variables(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest('"variables" must be an object of names to values')
    if len(value) > MAX_VARIABLES:
        raise BadRequest(f'"variables" holds more than {MAX_VARIABLES} names')
    out: dict[str, str] = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
            raise BadRequest(f"variable name {str(name)[:40]!r} is not a name (letters, digits, _)")
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise BadRequest(f"variable {name!r} must be a string or a number")
        text = str(raw)
        if len(text) > MAX_VARIABLE_CHARS:
            raise BadRequest(f"variable {name!r} is over {MAX_VARIABLE_CHARS} characters")
        out[name] = text
    return out


@dataclass
class OutboundRecord:
    """What every process needs to know of one call placed by the bridge."""

    key: str  # ours, made before Twilio names the call (in the TwiML URL): "ob_" + hex
    to: str
    from_: str
    profile: str  # "" : the default profile
    variables: dict[str, str]
    voicemail: str  # filled in already
    amd: bool
    amd_timeout: float
    created_at: float = field(default_factory=time.time)
    call_sid: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> OutboundRecord:
        return cls(**json.loads(text))

    @staticmethod
    def new_key() -> str:
        return "ob_" + uuid.uuid4().hex


class StoreUnavailable(Exception):
    """The shared store did not answer (Redis down): the request cannot be served consistently."""


class OutboundStore(Protocol):
    """Values by key, each expiring (``RECORD_TTL_SECONDS``). Every fact about a call has one
    writer and its own key (the record: the API; the verdict: the AMD callback; the stream's
    start: the pump), so no write can undo another's."""

    async def put_value(self, key: str, text: str, expires: float) -> None: ...

    async def get_value(self, key: str) -> str | None: ...

    async def close(self) -> None: ...


async def put_record(store: OutboundStore, record: OutboundRecord) -> None:
    """The record, under our key and (once known) the CallSid."""
    for key in filter(None, (record.key, record.call_sid)):
        await store.put_value("call:" + key, record.to_json(), record.created_at + RECORD_TTL_SECONDS)


async def get_record(store: OutboundStore, key: str) -> OutboundRecord | None:
    text = await store.get_value("call:" + key)
    return OutboundRecord.from_json(text) if text else None


async def put_verdict(store: OutboundStore, call_sid: str, answered_by: str, amd_ms: int | None) -> None:
    text = json.dumps({"answered_by": answered_by, "amd_ms": amd_ms})
    await store.put_value("amd:" + call_sid, text, time.time() + RECORD_TTL_SECONDS)


async def get_verdict(store: OutboundStore, call_sid: str) -> tuple[str, int | None] | None:
    text = await store.get_value("amd:" + call_sid)
    if not text:
        return None
    value = json.loads(text)
    return str(value["answered_by"]), value["amd_ms"]


class VerdictBell:
    """Wakes a placed call's verdict watcher the moment Twilio's AMD callback lands in the same
    process, instead of at its next poll of the store: the verdict races the greeting (a
    machine's quiet after its beep looks like a person's). Watchers in other processes still
    find it by polling. One entry per call whose watcher is waiting, removed when it stops."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Event] = {}

    def listen(self, call_sid: str) -> asyncio.Event:
        return self._waiting.setdefault(call_sid, asyncio.Event())

    def forget(self, call_sid: str) -> None:
        self._waiting.pop(call_sid, None)

    def ring(self, call_sid: str) -> None:
        event = self._waiting.get(call_sid)
        if event is not None:
            event.set()


async def mark_streamed(store: OutboundStore, call_sid: str) -> None:
    await store.put_value("streamed:" + call_sid, "1", time.time() + RECORD_TTL_SECONDS)


async def was_streamed(store: OutboundStore, call_sid: str) -> bool:
    return await store.get_value("streamed:" + call_sid) is not None


class MemoryStore:
    """One process: a dict, bounded and expiring."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[float, str]] = {}  # key -> (expires, value)

    async def put_value(self, key: str, text: str, expires: float) -> None:
        now = time.time()
        if len(self._values) >= MAX_RECORDS:
            for old, (at, _) in list(self._values.items()):
                if at < now or len(self._values) >= MAX_RECORDS:
                    del self._values[old]
        self._values[key] = (expires, text)

    async def get_value(self, key: str) -> str | None:
        entry = self._values.get(key)
        return entry[1] if entry is not None and entry[0] >= time.time() else None

    async def close(self) -> None:
        self._values.clear()


class MachineStore:
    """The workers of one machine: the shared SQLite file (``app.machine_db``)."""

    def __init__(self, path: Path) -> None:
        self._db = machine_db.connect(path)

    async def put_value(self, key: str, text: str, expires: float) -> None:
        try:
            with machine_db.transaction(self._db) as db:
                db.execute("DELETE FROM outbound_calls WHERE expires < ?", (time.time(),))
                db.execute("INSERT OR REPLACE INTO outbound_calls VALUES (?, ?, ?)", (key, text, expires))
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from None

    async def get_value(self, key: str) -> str | None:
        try:
            row = self._db.execute(
                "SELECT record FROM outbound_calls WHERE key = ? AND expires >= ?", (key, time.time())
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from None
        return str(row[0]) if row else None

    async def close(self) -> None:
        self._db.close()


class RedisStore:
    """Replicas sharing ``REDIS_URL``: one Redis key per value, expiring with it."""

    PREFIX = "callbridge:outbound:"

    def __init__(self, url: str) -> None:
        self._redis = redis.from_url(
            url, socket_timeout=STORE_TIMEOUT_SECONDS, socket_connect_timeout=STORE_TIMEOUT_SECONDS
        )

    async def put_value(self, key: str, text: str, expires: float) -> None:
        ttl_ms = int((expires - time.time()) * 1000)
        try:
            if ttl_ms <= 0:  # expired already: as if never written
                await self._redis.delete(self.PREFIX + key)
                return
            await self._redis.set(self.PREFIX + key, text, px=ttl_ms)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def get_value(self, key: str) -> str | None:
        try:
            value = await self._redis.get(self.PREFIX + key)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        return value.decode() if isinstance(value, bytes) else value

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()


def store_for(redis_url: str | None, shared_file: Path | None) -> OutboundStore:
    if redis_url:
        return RedisStore(redis_url)
    if shared_file is not None:
        return MachineStore(shared_file)
    return MemoryStore()
