"""Structured JSON logs (structlog) with secret redaction as a last line of defence.

Call code logs through a logger bound with call_sid, stream_sid and request_id, so every line
of a call can be found by any of them. Secrets are never passed to a logger on purpose; the
redactor catches accidents (an exception message that quotes a URL with a key, say).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_secrets: list[str] = []
REDACTED = "[redacted]"


def register_secrets(values: Iterable[str]) -> None:
    for value in values:
        if value and len(value) >= 8 and value not in _secrets:
            _secrets.append(value)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if not _secrets:
        return event_dict
    for key, value in event_dict.items():
        event_dict[key] = _scrub(value)
    return event_dict


def worker_field(worker: int) -> Any:
    """A processor naming the worker process (``--workers``) on every line, ours and uvicorn's."""

    def add(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict.setdefault("worker", worker)
        return event_dict

    return add


def configure(level: str = "info", stream: Any = None, worker: int | None = None) -> None:
    """JSON lines on stdout for our logs and for uvicorn's and websockets' stdlib logs alike.
    ``worker``: this process's worker id, on every line, when ``serve`` runs several."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if worker is not None:
        shared.append(worker_field(worker))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # one line per WebSocket open/close is noise at info level
    logging.getLogger("websockets").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("uvicorn.error").setLevel(numeric)


def get_logger(**fields: Any) -> Any:
    """A lazy logger: safe at import time, it takes the configuration in force when used."""
    return structlog.get_logger("callbridge", **fields)
