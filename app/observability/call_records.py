"""Delivery of call records to ``CALL_EVENTS_URL``: signed, retried, bounded, never blocking a call.

A record is POSTed as JSON once the call has ended. Up to three attempts with back-off; a
4xx answer is final. At most ``max_pending`` deliveries are in flight; beyond that a record
is dropped with a log line and a metric rather than queueing without bound.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from app import signing
from app.observability.logging import get_logger
from app.observability.metrics import Metrics

log = get_logger(component="call_records")


class CallRecordSender:
    def __init__(
        self,
        url: str | None,
        secret: bytes | None,
        metrics: Metrics,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.5,
        max_pending: int = 200,
        worker: int | None = None,
    ) -> None:
        self.url = url
        self.secret = secret
        self.metrics = metrics
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.max_pending = max_pending
        self.worker = worker  # with --workers: the worker that carried the call, in each record
        self._pending: set[asyncio.Task[None]] = set()

    def submit(self, record: dict[str, Any]) -> None:
        if not self.url:
            return
        if len(self._pending) >= self.max_pending:
            self.metrics.call_records.labels("dropped").inc()
            log.error("call_record_dropped", reason="too many deliveries in flight", call_sid=record.get("call_sid"))
            return
        if self.worker is not None:
            record = {**record, "worker": self.worker}
        body = json.dumps(record, separators=(",", ":"), default=str).encode()
        task = asyncio.create_task(self._deliver(body, str(record.get("call_sid", ""))))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _deliver(self, body: bytes, call_sid: str) -> None:
        assert self.url is not None
        problem = ""
        for attempt in range(1, self.attempts + 1):
            status, problem = await asyncio.to_thread(self._post, body)
            if 200 <= status < 300:
                self.metrics.call_records.labels("delivered").inc()
                return
            if 400 <= status < 500 and status not in (408, 429):
                break  # the receiver refuses this record; retrying will not change that
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        self.metrics.call_records.labels("failed").inc()
        log.error("call_record_failed", call_sid=call_sid, problem=problem, attempts=attempt)

    def _post(self, body: bytes) -> tuple[int, str]:
        assert self.url is not None
        headers = {"Content-Type": "application/json", "User-Agent": "callbridge"}
        if self.secret:
            headers.update(signing.signed_headers(self.secret, body))
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return int(response.status), ""
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code, f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    async def close(self, limit_s: float = 5.0) -> None:
        """Give deliveries in flight a moment to finish at shutdown."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=limit_s)
