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


def configure(level: str = "info", stream: Any = None) -> None:
    numeric = logging.getLevelNamesMapping()[level.upper()]
    logging.basicConfig(stream=stream or sys.stdout, level=numeric, format="%(message)s", force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**fields: Any) -> Any:
    return structlog.get_logger("callbridge").bind(**fields)
