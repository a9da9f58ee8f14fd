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
from typing import assert_never

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from app.core.vocabulary import MetricName

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

FAST = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
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
        return generate_latest(registry)

    def call_status(self, status: str) -> None:
        self.call_status_total.labels(bounded(status, CALL_STATUSES)).inc()
