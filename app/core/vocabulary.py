"""The closed sets of values the call produces: outcomes, reasons, kinds, levels, metric names.

Each is an enum so that code consuming it (metrics, the call record, the pumps) dispatches
with ``match`` and ``assert_never``: a value added here that some consumer forgets is a mypy
error, not a silent ``other``. String values are what operators see in logs and labels.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How a call that was accepted (stream token redeemed) ended: who ended it."""

    CALLER_HANGUP = "caller_hangup"  # Twilio sent stop or closed its socket
    AGENT_ERROR = "agent_error"  # the agent could not be had, and neither could the fallback (no REST)
    BRIDGE_ERROR = "bridge_error"  # our fault: a peer stuck on a full queue, an internal error
    BRIDGE_SHUTDOWN = "bridge_shutdown"  # this process stopped while the call was in progress
    COMPLETED = "completed"  # the bridge hung up after a goodbye (HangupReason says why)
    TRANSFERRED = "transferred"  # the caller was handed to a listed destination (transfer_call)
    FALLBACK = "fallback"  # the agent could not be reached: the caller got the fallback TwiML
    STREAM_LOST = "stream_lost"  # no media from Twilio for media_timeout_seconds: a dead stream, completed by REST
    OVERSIZE_FRAME = "oversize_frame"  # Twilio's socket closed (1009) for a frame over the size limit


class FallbackReason(StrEnum):
    """Why a call was redirected to the profile's fallback (label of callbridge_fallbacks_total)."""

    AGENT_REFUSED = "agent_refused"  # the upgrade was answered with an HTTP error (401, 429, ...)
    AGENT_UNREACHABLE = "agent_unreachable"  # no connection: DNS, refused, timeout
    AGENT_NOT_READY = "agent_not_ready"  # no Welcome or SettingsApplied in time
    AGENT_FAILED = "agent_failed"  # Error, or the socket closed, before the session was ready
    RECONNECT_FAILED = "reconnect_failed"  # lost mid-call and not restored within the budget
    CANNOT_HEAL = "cannot_heal"  # lost mid-call for a reason a new session would repeat (settings, key)
    TWILIO_NOT_READING = "twilio_not_reading"  # the media socket took nothing for PEER_STUCK_SECONDS


class HangupReason(StrEnum):
    """Why the bridge hung up a call that ended ``completed``."""

    END_CALL = "end_call"  # the agent called end_call
    SILENCE = "silence"  # nobody spoke after a check-in
    MAX_DURATION = "max_duration"  # the profile's max_call_seconds was reached
    OPERATOR = "operator"  # an operator hung up from the console or the live call API
    VOICEMAIL = "voicemail"  # outbound: a machine answered; the message was left (or there was none to leave)
    FAX = "fax"  # outbound: a fax machine answered


class FunctionResult(StrEnum):
    """How a client-side function request was answered (label of callbridge_function_calls_total)."""

    OK = "ok"
    ERROR = "error"  # the function failed, or its arguments were not valid JSON
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"  # no such function here
    REFUSED = "refused"  # a built-in refused it (a transfer to an unlisted name, a second end_call)


class RestResult(StrEnum):
    """How a Twilio REST call update went (label of callbridge_call_updates_total)."""

    OK = "ok"
    ALREADY_ENDED = "already_ended"  # Twilio error 20404 or 21220: the call is over already
    FAILED = "failed"
    NO_CREDENTIALS = "no_credentials"  # offline: the stream is closed instead, ending the call


class ConsentMode(StrEnum):
    """How a caller agrees to be recorded (profile ``bridge.recording.consent``)."""

    IMPLIED = "implied"  # the greeting announces it; heard in full, the call is recorded
    EXPLICIT = "explicit"  # recorded only after the caller presses the key or says yes


class Consent(StrEnum):
    """How consent was given (the call record's ``recording.consent``)."""

    IMPLIED = "implied"  # the announcement played through
    KEY = "key"  # the caller pressed the consent key
    SPEECH = "speech"  # the caller said yes
    NONE = "none"  # no consent: nothing was recorded


class RecordingResult(StrEnum):
    """What became of a call's recording (label of callbridge_recordings_total)."""

    STARTED = "started"  # Twilio is recording both channels
    FAILED = "failed"  # consent given, but Twilio refused or could not be reached
    NO_CONSENT = "no_consent"  # the caller did not agree (or cut the announcement short)


class RejectReason(StrEnum):
    """Why a media stream was refused before it became a call (no agent session, no record)."""

    NO_START = "no_start"  # closed, or silent past the start deadline, before Twilio's start
    BAD_START = "bad_start"  # a start message we cannot use (malformed ids, other media format)
    BAD_TOKEN = "bad_token"  # stream token missing, forged, for another call, expired or reused
    BAD_SIGNATURE = "bad_signature"  # decided at the upgrade by the server, before any Call exists
    SHUTTING_DOWN = "shutting_down"  # the process stopped before the stream started
    OVER_CAPACITY = "over_capacity"  # token good, but not admitted here and this instance is at MAX_CALLS
    EVICTED = "evicted"  # no token yet, and the pool of such sockets was full: the oldest made room
    INTERNAL_ERROR = "internal_error"  # a bug before the stream started


class InvalidKind(StrEnum):
    """Input from a peer that could not be used. Counted per call, logged once per kind."""

    OVERSIZE = "oversize"
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    BAD_MEDIA = "bad_media"
    OTHER_TRACK = "other_track"
    BAD_BASE64 = "bad_base64"
    BAD_MARK = "bad_mark"
    BAD_DTMF = "bad_dtmf"
    UNKNOWN_EVENT = "unknown_event"
    BINARY_FRAME = "binary_frame"
    WRONG_STREAM_SID = "wrong_stream_sid"
    UNKNOWN_MARK = "unknown_mark"
    AGENT_INVALID = "agent_invalid"
    OUT_OF_ORDER = "out_of_order"  # a well-formed event the call's state cannot take


class Overflow(StrEnum):
    """A bound reached by a healthy-looking peer: not invalid input, a full buffer or queue."""

    CALLER_PREBUFFER = "caller_prebuffer"  # caller audio waiting for the agent beyond its bound
    AGENT_QUEUE = "agent_queue"  # the agent does not read what we send
    TWILIO_QUEUE = "twilio_queue"  # Twilio does not read what we send


class DropReason(StrEnum):
    """Why audio bytes were dropped (label of ``callbridge_audio_dropped_bytes_total``)."""

    AGENT_NOT_READY = "agent_not_ready"  # oldest caller audio past the pre-buffer bound
    BARGE_IN = "barge_in"  # agent audio still queued in the bridge when clear was sent
    PEER_NOT_READING = "peer_not_reading"  # oldest queued audio dropped: the socket was not read


class Direction(StrEnum):
    CALLER_TO_AGENT = "caller_to_agent"
    AGENT_TO_CALLER = "agent_to_caller"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class MetricName(StrEnum):
    """Metrics the core measures through ``Measure`` actions (see observability/metrics.py)."""

    ACTIVE_CALLS = "active_calls"  # gauge: +1 when a stream is accepted, -1 when it ends
    CALLS = "calls"  # counter by Outcome
    STREAMS_REJECTED = "streams_rejected"  # counter by RejectReason
    AGENT_CONNECT = "agent_connect"  # histogram: session start to SettingsApplied
    FIRST_AGENT_AUDIO = "first_agent_audio"  # histogram: stream start to first agent audio
    BARGE_INS = "barge_ins"  # counter
    AGENT_LATENCY = "agent_latency"  # histogram by kind (total, ttt, tts)
    AGENT_ERRORS = "agent_errors"  # counter by agent code
    AGENT_WARNINGS = "agent_warnings"  # counter by agent code
    FUNCTION_CALLS = "function_calls"  # counter by FunctionResult
    CALL_UPDATES = "call_updates"  # counter by RestResult
    FALLBACKS = "fallbacks"  # counter by FallbackReason
    RECORDINGS = "recordings"  # counter by RecordingResult
    RESPONSE_LATENCY = "response_latency"  # histogram: caller's end of speech to the reply's first audio out
    AGENT_REPORTED_LATENCY = "agent_reported_latency"  # histogram by LatencyReport field
    OPERATOR_ACTIONS = "operator_actions"  # counter by OperatorAction


class OperatorAction(StrEnum):
    """What an operator can do to a live call (``POST /api/calls/{sid}/actions``)."""

    SAY = "say"  # the agent says this now (InjectAgentMessage)
    INSTRUCT = "instruct"  # added to the agent's prompt (UpdatePrompt): the supervisor's whisper
    AS_CALLER = "as_caller"  # as if the caller said it (InjectUserMessage)
    VOICE = "voice"  # another voice (UpdateSpeak)
    HANG_UP = "hang_up"  # a short goodbye, then Status=completed
    TRANSFER = "transfer"  # an announcement, then the profile's destination


class LiveEventType(StrEnum):
    """What a live call tells the console (``GET /api/calls/{sid}/events``): per turn, never per frame."""

    STATE = "state"  # the call's state changed (``state``)
    BARGE_IN = "barge_in"  # the caller talked over the agent and Twilio was told to clear
    AGENT_SPEAKING = "agent_speaking"  # the agent started an utterance
    AGENT_DONE = "agent_done"  # the agent finished sending an utterance
    TRANSCRIPT = "transcript"  # ``role``, ``text``: only where transcripts may be shown
    FUNCTION = "function"  # a function the agent called was answered: ``name``, ``result``
    ACTION = "action"  # an operator action: ``action``, ``action_id``, ``result`` (sent, confirmed, refused...)
    LATENCY = "latency"  # ``response_ms``: the caller's end of speech to the reply's first audio out
    ENDED = "ended"  # ``outcome``: the last event of a call


LATENCY_REPORT_FIELDS = frozenset(
    {
        "ttt_token_latency",
        "ttt_text_latency",
        "ttt_tool_latency",
        "ttt_thinking_latency",
        "tts_latency",
        "total_latency",
    }
)
"""The fields of the agent's ``LatencyReport`` kept as metrics (label ``field``); others are ignored."""
