"""Per-call settings and every limit of a call, each with what it depends on and what it costs.

A limit that depends on a setting is derived from it here (``CallOptions.agent_queue_limit``),
never written down twice, so any profile the config accepts works: a 60 s pre-buffer gets an
agent queue that can take its flush.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.codecs import FRAME_MS, TWILIO_FORMAT, AudioFormat
from app.core.vocabulary import ConsentMode

FRAMES_PER_SECOND = 1000 // FRAME_MS  # Twilio sends one 20 ms media frame at a time

TICK_SECONDS = 0.5
"""How often the pump feeds ``Tick``: the resolution of every deadline below (start, agent
ready, keep-alive). Costs one wake-up per call per tick."""

METRICS_FLUSH_SECONDS = 5.0
"""How often a call's frame and byte counters are added to the Prometheus metrics (and at
its end). Prometheus scrapes every 15 s by default, so 5 s keeps them as current as anyone
sees; flushing every tick was about 3% of the bridge's CPU at 50 calls."""

AGENT_BACKLOG_SECONDS = 30.0
"""Live caller audio the agent send queue holds beyond the pre-buffer's flush: far beyond any
network hiccup. Past it the oldest audio is dropped and counted; an agent that reads nothing
for ``PEER_STUCK_SECONDS`` has its session dropped and reopened (``Overflow.AGENT_QUEUE``)."""

RECONNECT_BACKOFF_SECONDS = (0.0, 0.5, 1.0, 2.0)
"""Wait before reconnect attempt 1, 2, 3, 4... (the last value repeats), from the failure."""

SOCKET_SEND_BUFFER = 64 * 1024
"""Kernel send buffer of every call socket (Twilio's, the agent's; Linux doubles it). Left to
itself Linux grows it up to 4 MiB (``tcp_wmem``): minutes of audio a stuck peer would absorb
before the bridge's own queue, and ``PEER_STUCK_SECONDS``, saw anything. 64 KiB is still
several seconds of audio either way and, at 100 ms round trip, over 1 MB/s of throughput."""

PEER_STUCK_SECONDS = 10.0
"""A peer (the agent or Twilio) that takes nothing from its send queue for this long while
items wait is stuck. A stuck agent is a lost session: dropped, then reconnected within the
budget or the fallback. A stuck Twilio socket cannot carry anything the caller would hear:
the call is redirected to the fallback through the REST API. Meanwhile, a full queue drops its
oldest audio, so memory stays at the queue's bounds; calls on other sockets are unaffected.
Ten seconds: far beyond a network hiccup or a GC pause, short enough that a caller on a
stalled line is not left waiting long."""

TWILIO_QUEUE_LIMIT = 4000
"""Twilio-bound items (media, marks, clear) queued in the bridge. The agent sends speech
faster than real time, in bursts of a whole utterance; Twilio reads at socket speed, so the
queue is normally near empty and fills only when Twilio stops reading. The items' audio is
bounded apart, by ``TWILIO_QUEUE_AUDIO_BYTES``; this bounds their count (~150 bytes of
overhead each, so 0.6 MB at most)."""

TWILIO_QUEUE_AUDIO_SECONDS = 120.0
TWILIO_QUEUE_AUDIO_BYTES = TWILIO_FORMAT.bytes_for(TWILIO_QUEUE_AUDIO_SECONDS)
"""Agent audio queued for Twilio, in mu-law bytes (what Twilio gets, whatever the agent's
format): two minutes, longer than any one answer, so only a Twilio that stopped reading
reaches it (``Overflow.TWILIO_QUEUE``). As base64 text that is 1.3 MB per call at most,
however large the agent's chunks are."""

MAX_OUTSTANDING_MARKS = 256
"""Marks sent to Twilio and not yet returned, and marks cleared by barge-in that Twilio has
not returned yet: one per agent utterance. A Twilio that never returns marks cannot grow
these sets past this; the oldest is forgotten (its mark then counts as unknown)."""

MAX_UTTERANCES_RECORDED = 500
"""Agent utterances whose heard/full length the call record keeps (``heard.py``); the oldest
go first. At the maximum call duration's pace of speech this is far more than a call has;
about 100 bytes each."""

MAX_RECONNECT_WAITS_RECORDED = 50
"""How long the caller waited for each restored agent session: the latest this many are in the
call record (all are counted, in ``reconnects``). The reconnect budget bounds the attempts
per loss, not the losses of a long call."""

MAX_LOGGED_UNKNOWN_AGENT_TYPES = 32
"""Distinct unknown agent message types logged per call (each once); the rest are ignored
silently so a peer inventing types cannot flood the log."""


HOLD_AFTER_SECONDS = 2.0
"""A function still running this long gets the agent to say it is working on it (once)."""

GOODBYE_GRACE_SECONDS = 4.0
"""After end_call (or a transfer), how long the bridge waits for the agent to start its
goodbye before hanging up on a quiet line: the LLM's answer to the function takes 1-2 s."""

GOODBYE_TIMEOUT_SECONDS = 10.0
"""The longest a goodbye (or transfer announcement) may take to play before the bridge hangs
up (or transfers) anyway: a stuck agent or Twilio never keeps the line open."""

CALL_UPDATE_TIMEOUT_SECONDS = 20.0
"""Hang-up or transfer sent to Twilio's REST API and no answer (its own timeout is 15 s):
the stream is closed regardless, which ends the call, so nothing is left billing."""

KEYPAD_PAUSE_SECONDS = 1.5
"""Digits pressed within this of each other are one burst, told to the agent in one message
(``#`` ends a burst at once). Ticks make the real pause 1.5-2 s."""

MAX_KEYPAD_DIGITS = 64
"""Digits in one burst; beyond it the burst is sent at once (a stuck key cannot grow it)."""

MAX_PENDING_FUNCTIONS = 16
"""Operator tools running at once in one call; more in flight are answered "busy"."""

MAX_HELD_DURING_TONES = TWILIO_FORMAT.bytes_for(20.0)
"""Agent audio held while keypad tones play (send_dtmf: 32 keys take 5 s): past it the oldest goes."""

AMD_GRACE_SECONDS = 3.0
"""After Twilio's MachineDetectionTimeout, this long for its verdict to arrive; then a person."""

CALLEE_QUIET_SECONDS = 0.6
"""Outbound: the callee's first words ("Hello?") are over after this much quiet; the greeting follows."""

SILENT_CALLEE_SECONDS = 4.0
"""Outbound without AMD: a callee who says nothing this long after answering is greeted all the same."""

GREETING_HOLD_SECONDS = 15.0
"""Outbound: the callee's audio is held while the greeting is sent (so their "Hello?" cannot cut it
short); after this, whatever happened, it flows to the agent again."""

VOICEMAIL_TIMEOUT_SECONDS = 90.0
"""A voicemail message longer than this (from the verdict) is cut: the call is completed."""

MAX_OPERATOR_ACTIONS_RECORDED = 100
"""Operator actions a call keeps for its record (``operator_actions``): the latest ones."""

OPERATOR_GOODBYE = "I'm going to end our call now. Thank you for calling, goodbye!"
"""What the agent says when an operator hangs up (``hang_up``); the call ends once it played."""

OPERATOR_TRANSFER_ANNOUNCEMENT = "Please hold while I transfer your call."
"""What the agent says when an operator transfers the call; the transfer follows once it played."""

MAX_FUNCTION_CONTENT = 16 * 1024
"""Characters of a tool's answer passed to the agent (the rest is cut, and the agent told)."""


@dataclass(frozen=True)
class ToolSpec:
    """An operator tool: a client-side function answered by a signed POST to ``url``."""

    name: str
    url: str
    timeout: float = 10.0


@dataclass(frozen=True)
class Telephony:
    """The profile's ``bridge.telephony`` and ``bridge.tools``: what the agent may do to the call."""

    end_call: bool = True
    transfer: tuple[tuple[str, str], ...] = ()  # (name, E.164 number or sip: URI); offered when not empty
    dtmf: bool = True
    silence_check_in: float = 15.0  # 0: off
    max_call: float = 3600.0
    media_timeout: float = 10.0
    """No Twilio media for this long in a call: the stream is dead (Twilio sends a frame every
    20 ms, silence included), and the call is completed through the REST API. 0: off."""
    tools: tuple[ToolSpec, ...] = ()
    dtmf_out: bool = False  # offer send_dtmf: keypad tones into the call (bridge.telephony.dtmf_out)
    rest_available: bool = False  # Twilio REST credentials: needed to transfer
    check_in_message: str = "Are you still there?"
    silence_goodbye_message: str = "I haven't heard from you, so I'll end the call now. Goodbye!"
    time_limit_message: str = "We've reached the time limit for this call. Thank you for calling, goodbye!"
    hold_message: str = "One moment please, I'm looking into that."

    def destination(self, name: str) -> str | None:
        return dict(self.transfer).get(name)

    def tool(self, name: str) -> ToolSpec | None:
        return next((t for t in self.tools if t.name == name), None)


DEFAULT_CONSENT_WORDS = ("yes", "yeah", "yep", "sure", "agree", "consent")
"""Words that, said by the caller while consent is awaited (and without a "no", ``recording.py``),
are explicit consent. Not "ok": callers say it to mean "go on", not "yes"."""


@dataclass(frozen=True)
class RecordingSpec:
    """The profile's ``bridge.recording``: the call is recorded (both channels, by Twilio)
    only once the caller has consented; the announcement leads the greeting (``config.py``)."""

    consent: ConsentMode
    consent_key: str = "1"
    consent_words: tuple[str, ...] = DEFAULT_CONSENT_WORDS
    consent_window: float = 30.0
    """Explicit consent counts from the start of the call until this long after the
    announcement has played (or was cut short); then, without it, nothing is recorded."""
    status_callback_url: str = ""  # where Twilio reports the recording ("" without PUBLIC_URL)


@dataclass(frozen=True)
class OutboundSpec:
    """A call the bridge placed (``POST /api/calls``): how it meets whoever answers."""

    voicemail: str = ""  # left on a machine after its greeting ("" : none; the call is completed at once)
    amd: bool = True  # Twilio's asynchronous answering-machine detection runs on the call
    amd_timeout: float = 30.0  # Twilio's MachineDetectionTimeout; no verdict by then plus AMD_GRACE_SECONDS: a person


@dataclass(frozen=True)
class CallOptions:
    """Per-call settings, derived from the agent profile and the service config."""

    agent: dict[str, Any] | str
    agent_input: AudioFormat = TWILIO_FORMAT
    agent_output: AudioFormat = TWILIO_FORMAT
    tags: tuple[str, ...] = ()
    start_timeout: float = 5.0
    """Socket accepted to its stream token redeemed (``STREAM_START_TIMEOUT_SECONDS``). Twilio
    sends ``connected`` and ``start`` at once; a socket that stays silent this long is not
    Twilio, and costs no agent session (it waits in the token-less pool meanwhile)."""
    keepalive_after: float = 5.0
    """Quiet time before a KeepAlive: the agent closes after 10 s without a message
    (CLIENT_MESSAGE_TIMEOUT), and ticks come every ``TICK_SECONDS``."""
    agent_ready_timeout: float = 10.0
    """Stream start to SettingsApplied. Meanwhile the caller's audio is pre-buffered."""
    max_prebuffer_seconds: float = 10.0
    """Caller audio kept while the agent is not ready; beyond it the oldest is dropped and
    counted. It is kept as Twilio sent it (mu-law, 8 KB a second, whatever the agent's format
    and converted when flushed), so the profile's maximum of 60 s costs 480 KB per call."""
    log_transcripts: bool = False
    outbound: OutboundSpec | None = None  # a call the bridge placed; None for a call it answered
    console_transcripts: bool = False
    """What was said reaches the live call API and console (LOG_TRANSCRIPTS or CONSOLE_TRANSCRIPTS)."""
    reconnect_attempts: int = 3
    reconnect_within: float = 10.0
    """The reconnect budget: a session lost mid-call is reopened at most ``reconnect_attempts``
    times within ``reconnect_within`` seconds of the loss (backoff 0, 0.5, 1, 2 s between
    attempts), with the conversation so far; past it the caller gets the fallback."""
    telephony: Telephony = Telephony()
    fallback_twiml: str = ""
    """TwiML the live call is redirected to when the agent cannot be reached ("": a short
    apology, then hang up); see ``webhook.fallback_twiml``."""
    recording: RecordingSpec | None = None  # None: the call is never recorded (the default)
    hold_audio: bytes = b""
    """What the caller hears (mu-law 8 kHz) once a lost agent session has been away for
    ``hold_after`` seconds: by default a short "One moment, please." (``config.py``); empty:
    silence. Played once per loss, on the stream that is still open."""
    hold_after: float = 2.0
    record_utterances: bool = True
    """Keep each utterance's heard/full length for the posted call record (``CALL_EVENTS_URL``);
    off, only the whole call's totals are kept (the ``call_ended`` line has those either way)."""
    record_transcript: bool = True
    """Keep the transcript for the posted call record (``CALL_EVENTS_URL`` with
    ``CALL_EVENTS_TRANSCRIPT``); off, a long call's words take no memory."""

    @property
    def prebuffer_bytes(self) -> int:
        """The pre-buffer's bound, in Twilio's mu-law bytes."""
        return TWILIO_FORMAT.bytes_for(self.max_prebuffer_seconds)

    @property
    def agent_frame_bytes(self) -> int:
        """One 20 ms frame in the agent's input format: the unit the pre-buffer is flushed in."""
        return self.agent_input.bytes_for(FRAME_MS / 1000)

    @property
    def agent_queue_limit(self) -> int:
        """Items the agent send queue must hold: the whole pre-buffer flushed at once when the
        agent becomes ready (in 20 ms frames, the last one partial, plus the frame that
        overflowed the bound), then the live backlog, plus a few control messages (Settings,
        KeepAlive, function responses). An item is one 20 ms frame in the agent's input
        format plus ~100 bytes of overhead: the 60 s + 30 s maximum is 4.5k items, 1.2 MB for
        mu-law 8 kHz and 9 MB for linear16 48 kHz, per call, only while the agent is stuck."""
        flush = -(-self.agent_input.bytes_for(self.max_prebuffer_seconds) // self.agent_frame_bytes) + 2
        return flush + int(AGENT_BACKLOG_SECONDS * FRAMES_PER_SECOND) + 16
