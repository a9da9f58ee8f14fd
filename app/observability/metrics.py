"""Prometheus metrics. One statement per metric in ``Metrics.__init__``; label values are small
fixed sets (never a call id), so cardinality stays bounded whatever the peers send.

Hot-path counters (frames, bytes) are not touched per frame: the call adds its own counts
and the pump flushes the difference here every tick and at the end of the call.

With worker processes (``serve --workers N``) prometheus-client runs in its multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor): every worker writes its values to
files of that directory and ``/metrics``, on whichever worker answers, sums them all. Counters
and histograms of a dead worker keep counting in the sum (they never go down); its gauge
values are dropped (``mark_process_dead``, see ``active_calls``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import assert_never

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.core.vocabulary import FallbackReason, MetricName, Outcome, RejectReason

WEBHOOK_RESULTS = ("answered", "bad_request", "bad_signature", "draining", "over_capacity")
"""Labels of ``callbridge_webhook_requests_total`` (what ``app.server`` counts)."""

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

FAST = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
RESPONSE = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Response latency buckets: people notice a reply after ~1 s; the alert bound (1.5 s) is a bucket edge."""
SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)

AGENT_CODES = frozenset(
    {
        "CLIENT_MESSAGE_TIMEOUT",
        "UNPARSABLE_CLIENT_MESSAGE",
        "NON_SETTINGS_MESSAGE_BEFORE_SETTINGS",
        "SETTINGS_ALREADY_APPLIED",
        "INVALID_SETTINGS",
        "FAILED_TO_START_LISTENING",
        "ASR_CONNECTION_CLOSED",
        "INTERNAL_SERVER_ERROR",
        "THINK_REQUEST_FAILED",
        "SPEAK_REQUEST_FAILED",
        "FUNCTION_CALL_FAILED",
        "PROMPT_TOO_LONG",
    }
)


CALL_STATUSES = frozenset(
    {"queued", "initiated", "ringing", "in-progress", "completed", "busy", "failed", "no-answer", "canceled"}
)

RECORDING_STATUSES = frozenset({"in-progress", "completed", "absent", "failed"})


def bounded(value: str, allowed: frozenset[str]) -> str:
    """A label value from a peer, folded to "other" unless it is one we know."""
    return value if value in allowed else "other"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # livesum: the calls of the workers alive now, summed; a dead worker's calls ended with it
        self.active_calls = Gauge(
            "callbridge_active_calls", "Calls with an open media stream.", registry=r, multiprocess_mode="livesum"
        )
        # the limit, so a dashboard and an alert can compare the two (every worker sets the same)
        self.max_calls = Gauge(
            "callbridge_max_calls", "MAX_CALLS: calls this instance takes at once.", registry=r, multiprocess_mode="max"
        )
        self.calls = Counter("callbridge_calls_total", "Calls ended, by outcome.", ["outcome"], registry=r)
        self.webhooks = Counter(
            "callbridge_webhook_requests_total", "Voice webhook requests, by result.", ["result"], registry=r
        )
        self.streams_rejected = Counter(
            "callbridge_streams_rejected_total",
            "Media streams refused before any agent session, by reason.",
            ["reason"],
            registry=r,
        )
        self.agent_connect = Histogram(
            "callbridge_agent_connect_seconds",
            "Agent session start to SettingsApplied (connect, Welcome, Settings).",
            buckets=SLOW,
            registry=r,
        )
        self.first_agent_audio = Histogram(
            "callbridge_first_agent_audio_seconds",
            "Stream start to the first agent audio (usually the greeting).",
            buckets=SLOW,
            registry=r,
        )
        self.barge_ins = Counter("callbridge_barge_ins_total", "Times the caller interrupted the agent.", registry=r)
        self.clear_latency = Histogram(
            "callbridge_barge_in_clear_seconds",
            "Bridge-side time from UserStartedSpeaking received to Twilio clear sent.",
            buckets=FAST,
            registry=r,
        )
        self.agent_latency = Histogram(
            "callbridge_agent_latency_seconds",
            "Agent-reported latency from AgentStartedSpeaking, by kind (total, ttt, tts).",
            ["kind"],
            buckets=SLOW,
            registry=r,
        )
        self.frames = Counter(
            "callbridge_audio_frames_total", "Audio frames relayed, by direction.", ["direction"], registry=r
        )
        self.bytes = Counter(
            "callbridge_audio_bytes_total",
            "Audio bytes relayed (Twilio-side mu-law), by direction.",
            ["direction"],
            registry=r,
        )
        self.dropped = Counter(
            "callbridge_audio_dropped_bytes_total",
            "Audio bytes dropped, by direction and reason.",
            ["direction", "reason"],
            registry=r,
        )
        self.agent_errors = Counter(
            "callbridge_agent_errors_total", "Error messages from the agent, by code.", ["code"], registry=r
        )
        self.agent_warnings = Counter(
            "callbridge_agent_warnings_total", "Warning messages from the agent, by code.", ["code"], registry=r
        )
        self.invalid_inputs = Counter(
            "callbridge_invalid_inputs_total",
            "Inputs from the network that could not be used (bad frames, out-of-order events), by kind.",
            ["kind"],
            registry=r,
        )
        self.function_calls = Counter(
            "callbridge_function_calls_total",
            "Client-side function requests answered, by result (ok, error, timeout, unknown, refused).",
            ["result"],
            registry=r,
        )
        self.call_updates = Counter(
            "callbridge_call_updates_total",
            "Hang-ups and transfers through Twilio's REST API, by result.",
            ["result"],
            registry=r,
        )
        self.fallbacks = Counter(
            "callbridge_fallbacks_total",
            "Calls redirected to the profile's fallback because the agent could not be reached, by reason.",
            ["reason"],
            registry=r,
        )
        self.recordings = Counter(
            "callbridge_recordings_total",
            "Calls of a recording profile: recorded after consent, failed at Twilio, or not recorded for want of consent.",
            ["result"],
            registry=r,
        )
        self.recording_status = Counter(
            "callbridge_recording_status_total",
            "Recording status callbacks from Twilio (signature checked), by status.",
            ["status"],
            registry=r,
        )
        self.header_timeouts = Counter(
            "callbridge_http_header_timeouts_total",
            "Connections closed because a request's headers did not arrive in time (HTTP_HEADER_TIMEOUT_SECONDS).",
            registry=r,
        )
        self.token_store_errors = Counter(
            "callbridge_token_store_errors_total",
            "Stream tokens checked on this machine only because Redis (REDIS_URL) did not answer.",
            registry=r,
        )
        self.overflows = Counter(
            "callbridge_overflows_total",
            "Times a bound was reached (pre-buffer full, a peer not reading), by kind.",
            ["kind"],
            registry=r,
        )
        self.call_status_total = Counter(
            "callbridge_call_status_total", "Twilio call status callbacks, by final status.", ["status"], registry=r
        )
        self.call_records = Counter(
            "callbridge_call_records_total",
            "Call records POSTed to CALL_EVENTS_URL, by result.",
            ["result"],
            registry=r,
        )

        self.response_latency = Histogram(
            "callbridge_response_latency_seconds",
            "Per caller turn: the end of the caller's speech (the bridge's own detector) to the first "
            "audio of the agent's reply sent to Twilio.",
            buckets=RESPONSE,
            registry=r,
        )
        self.agent_reported_latency = Histogram(
            "callbridge_agent_reported_latency_seconds",
            "The agent's own LatencyReport, by field (ttt_token_latency, tts_latency, total_latency, ...).",
            ["field"],
            buckets=SLOW,
            registry=r,
        )
        self.operator_actions = Counter(
            "callbridge_operator_actions_total",
            "Operator actions on live calls (say, instruct, as_caller, voice, hang_up, transfer).",
            ["action"],
            registry=r,
        )
        self.listen_dropped = Counter(
            "callbridge_listen_frames_dropped_total",
            "Audio frames not sent to a console listener that was not keeping up (the call is never slowed).",
            registry=r,
        )

        # every known label from 0: ``increase()`` misses a series whose first sample is already 1,
        # so the first refusal after a restart would never fire an alert
        for outcome in Outcome:
            self.calls.labels(outcome.value)
        for reason in RejectReason:
            self.streams_rejected.labels(reason.value)
        for fallback in FallbackReason:
            self.fallbacks.labels(fallback.value)
        for result in WEBHOOK_RESULTS:
            self.webhooks.labels(result)
        ProcessCollector(registry=r)  # one process; with workers, ``exposition`` sums them all

    def record(self, name: MetricName, value: float = 1.0, label: str = "") -> None:
        """Apply a core ``Measure``. A metric added to ``MetricName`` and forgotten here is a
        mypy error (``assert_never``), not a silent no-op."""
        match name:
            case MetricName.ACTIVE_CALLS:
                self.active_calls.inc(value)
            case MetricName.CALLS:
                self.calls.labels(label).inc(value)
            case MetricName.STREAMS_REJECTED:
                self.streams_rejected.labels(label).inc(value)
            case MetricName.AGENT_CONNECT:
                self.agent_connect.observe(value)
            case MetricName.FIRST_AGENT_AUDIO:
                self.first_agent_audio.observe(value)
            case MetricName.BARGE_INS:
                self.barge_ins.inc(value)
            case MetricName.AGENT_LATENCY:
                self.agent_latency.labels(label).observe(value)
            case MetricName.AGENT_ERRORS:
                self.agent_errors.labels(bounded(label, AGENT_CODES)).inc(value)
            case MetricName.AGENT_WARNINGS:
                self.agent_warnings.labels(bounded(label, AGENT_CODES)).inc(value)
            case MetricName.FUNCTION_CALLS:
                self.function_calls.labels(label).inc(value)
            case MetricName.CALL_UPDATES:
                self.call_updates.labels(label).inc(value)
            case MetricName.FALLBACKS:
                self.fallbacks.labels(label).inc(value)
            case MetricName.RECORDINGS:
                self.recordings.labels(label).inc(value)
            case MetricName.RESPONSE_LATENCY:
                self.response_latency.observe(value)
            case MetricName.AGENT_REPORTED_LATENCY:
                self.agent_reported_latency.labels(label).observe(value)
            case MetricName.OPERATOR_ACTIONS:
                self.operator_actions.labels(label).inc(value)
            case _:
                assert_never(name)

    def recording_status_callback(self, status: str) -> None:
        self.recording_status.labels(bounded(status, RECORDING_STATUSES)).inc()

    def exposition(self) -> bytes:
        """The text for ``/metrics``: this process's registry or, with worker processes, the
        sum over every worker's files."""
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        registry.register(WorkersProcessCollector(directory))
        return generate_latest(registry)

    def call_status(self, status: str) -> None:
        self.call_status_total.labels(bounded(status, CALL_STATUSES)).inc()


_PID_IN_NAME = re.compile(r"_(\d+)\.db$")


class WorkersProcessCollector(Collector):
    """CPU and memory of the whole instance with worker processes: every live worker that has
    written metrics files (their names end in its pid) is read from /proc and the figures
    summed, so a dashboard sees the instance whichever worker answers the scrape."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def collect(self) -> Iterable[Metric]:
        pids = {int(m.group(1)) for p in self.directory.glob("*.db") if (m := _PID_IN_NAME.search(p.name))}
        cpu = rss = 0.0
        for pid in sorted(pids):
            if not Path(f"/proc/{pid}").exists():
                continue
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():  # type: ignore[misc]
                for sample in family.samples:
                    if sample.name == "process_cpu_seconds_total":
                        cpu += sample.value
                    elif sample.name == "process_resident_memory_bytes":
                        rss += sample.value
        yield CounterMetricFamily("process_cpu_seconds", "CPU seconds of every worker process, summed.", value=cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of every worker, summed.", value=rss)
