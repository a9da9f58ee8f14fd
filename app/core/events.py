"""Inputs to the call state machine: parsed events from Twilio, the agent, the bridge and
the clock. Which event each state takes, and where it leads, is in ``states.py``.

Plain slotted dataclasses: one is built per audio frame, so they must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.core.options import CallOptions
from app.core.vocabulary import HangupReason, InvalidKind, OperatorAction, Overflow, RestResult

# --- Twilio side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TwilioConnected:
    pass


@dataclass(frozen=True, slots=True)
class TwilioStart:
    stream_sid: str
    call_sid: str
    account_sid: str = ""
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)  # per frame: not frozen, frozen init costs twice as much (measured)
class TwilioMedia:
    payload: bytes
    stream_sid: str = ""


@dataclass(frozen=True, slots=True)
class TwilioMark:
    name: str
    stream_sid: str = ""


@dataclass(frozen=True, slots=True)
class TwilioDtmf:
    digit: str
    stream_sid: str = ""


@dataclass(frozen=True, slots=True)
class TwilioStop:
    stream_sid: str = ""


@dataclass(frozen=True, slots=True)
class TwilioClosed:
    """The Twilio socket went away (with or without a ``stop`` first)."""

    code: int | None = None


@dataclass(frozen=True, slots=True)
class TwilioFrameTooLarge:
    """The server closed Twilio's socket (1009) for a frame over its size limit
    (``serving.WS_MAX_SIZE``): not the caller hanging up, and not something to wait out."""


@dataclass(frozen=True, slots=True)
class TwilioBadStart:
    """A ``start`` message that cannot begin a call (malformed ids, unsupported format)."""

    detail: str


@dataclass(frozen=True, slots=True)
class TwilioInvalid:
    """A frame from Twilio that could not be used; ``kind`` names why."""

    kind: InvalidKind
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StreamTokenAccepted:
    """The pump redeemed the stream token of ``start``: this stream is the call it names.
    ``options`` are the call's, from the profile of the number dialled (None: as created)."""

    options: CallOptions | None = None


@dataclass(frozen=True, slots=True)
class StreamTokenRefused:
    """The stream token of ``start`` was missing, forged, expired, reused or for another call."""

    reason: str


@dataclass(frozen=True, slots=True)
class StreamOverCapacity:
    """The token is good, but the call was not admitted by this instance's webhook and the
    instance is at ``MAX_CALLS``: the stream is refused (Twilio then runs what follows
    ``<Connect>``)."""


@dataclass(frozen=True, slots=True)
class StreamEvicted:
    """The socket had not redeemed a stream token and the pool of such sockets was full: the
    oldest makes room for a newer one (``app/stream_admission.py``)."""


# --- Agent side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentConnected:
    pass


@dataclass(frozen=True, slots=True)
class AgentConnectFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class AgentWelcome:
    request_id: str


@dataclass(frozen=True, slots=True)
class AgentSettingsApplied:
    pass


@dataclass(slots=True)  # per frame: not frozen, frozen init costs twice as much (measured)
class AgentAudio:
    data: bytes


@dataclass(frozen=True, slots=True)
class AgentUserStartedSpeaking:
    pass


@dataclass(frozen=True, slots=True)
class AgentStartedSpeaking:
    total_latency: float | None = None
    tts_latency: float | None = None
    ttt_latency: float | None = None


@dataclass(frozen=True, slots=True)
class AgentAudioDone:
    pass


@dataclass(frozen=True, slots=True)
class AgentConversationText:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class AgentThinking:
    content: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    id: str
    name: str
    arguments: str
    client_side: bool


@dataclass(frozen=True, slots=True)
class AgentFunctionCallRequest:
    functions: tuple[FunctionCall, ...]


@dataclass(frozen=True, slots=True)
class AgentWarning:
    code: str
    description: str


@dataclass(frozen=True, slots=True)
class AgentError:
    code: str
    description: str


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """A known, informational agent message (PromptUpdated, History, ...)."""

    type: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AgentInjectionRefused:
    """The agent would not say (or hear) an injected message now: someone was speaking."""

    message: str = ""


@dataclass(frozen=True, slots=True)
class AgentUnknown:
    type: str


@dataclass(frozen=True, slots=True)
class AgentInvalid:
    detail: str


@dataclass(frozen=True, slots=True)
class AgentClosed:
    code: int | None = None
    reason: str = ""


# --- The bridge itself: answers to the core's requests, and its own faults ----------------


@dataclass(frozen=True, slots=True)
class BridgeFailed:
    """The bridge must end the call for a fault of its own (a stuck peer, a crashed task)."""

    reason: str


@dataclass(frozen=True, slots=True)
class FunctionDone:
    """An operator tool the core asked for (``RunFunction``) has its answer, in plain words."""

    id: str
    name: str
    content: str
    failed: bool = False


@dataclass(frozen=True, slots=True)
class CallUpdated:
    """Twilio did what ``HangUpCall`` / ``RedirectCall`` asked (``OK``), or there are no REST
    credentials and closing the stream ends the call (``NO_CREDENTIALS``). A call already over
    is ``CallGone``."""

    result: RestResult
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RecordingStarted:
    """Twilio is recording the call (``StartRecording``), as ``sid``."""

    sid: str


@dataclass(frozen=True, slots=True)
class RecordingFailed:
    """Twilio would not (or could not be asked to) record the call."""

    detail: str


@dataclass(frozen=True, slots=True)
class CallGone:
    """Twilio answered a hang-up or redirect with "the call is over" (20404 not found, 21220
    not in progress): the caller hung up before the update."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class CallUpdateFailed:
    """Twilio refused or never answered the update; ``detail`` carries its error code."""

    detail: str


@dataclass(frozen=True, slots=True)
class OutboxFull:
    """A send queue reached its bound (``options.py``): that peer is not reading."""

    which: Overflow


@dataclass(frozen=True, slots=True)
class BridgeShuttingDown:
    """This process is stopping and the call cannot continue here."""


@dataclass(frozen=True, slots=True)
class AmdVerdict:
    """Twilio's answering-machine detection said who answered a call the bridge placed
    (``AnsweredBy``: human, unknown, machine_end_beep, machine_end_silence, machine_end_other,
    machine_start, fax), after ``amd_ms`` (``MachineDetectionDuration``)."""

    answered_by: str
    amd_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CalleeAnswered:
    """Outbound: time to greet: the callee's first words are over, or AMD said a person (or
    said nothing in time). ``why`` in words, for the log."""

    why: str


@dataclass(frozen=True, slots=True)
class OperatorCommand:
    """An operator steers the live call (console or ``POST /api/calls/{sid}/actions``). The API
    has checked the fields' presence and types; ``Call.steer_refusal`` says first whether the
    call can take it now (the API's 409), so a command that reaches ``handle`` is carried out.
    ``text`` for say, instruct and as_caller; ``speak`` for voice; ``destination`` for transfer."""

    action: OperatorAction
    action_id: str
    text: str = ""
    speak: dict[str, Any] | None = None
    destination: str = ""


# --- Clock -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. The pump feeds one every ``options.TICK_SECONDS``; the call turns the
    deadlines it finds passed into the timer events below, so the table can name them."""


@dataclass(frozen=True, slots=True)
class StartDeadlinePassed:
    """No usable ``start`` from Twilio within ``CallOptions.start_timeout`` of the socket."""


@dataclass(frozen=True, slots=True)
class MediaDeadlinePassed:
    """No ``media`` from Twilio for ``Telephony.media_timeout`` in a call: Twilio sends a frame
    every 20 ms for the whole call, silence included, so the stream is dead (a half-open path,
    a stuck proxy) even though its socket has not closed."""


@dataclass(frozen=True, slots=True)
class AgentReadyDeadlinePassed:
    """The agent session was not ready within ``CallOptions.agent_ready_timeout``."""


@dataclass(frozen=True, slots=True)
class KeepAliveDue:
    """Nothing was sent to the agent for ``CallOptions.keepalive_after`` seconds."""


@dataclass(frozen=True, slots=True)
class AgentRetryDue:
    """The agent session was lost mid-call; its backoff is over and the budget allows another
    attempt: open a new session."""


@dataclass(frozen=True, slots=True)
class AgentUnavailable:
    """The agent session cannot be had: it never became ready, the failure cannot heal, or the
    reconnect budget is spent. The caller gets the fallback."""


@dataclass(frozen=True, slots=True)
class HangUpDue:
    """The goodbye has played (or its wait is over): hang up now."""

    reason: HangupReason


@dataclass(frozen=True, slots=True)
class TransferDue:
    """The transfer announcement has played (or its wait is over): dial ``destination`` now."""

    destination: str  # the name in the profile
    twiml: str


@dataclass(frozen=True, slots=True)
class CallUpdateDeadlinePassed:
    """Twilio did not answer the hang-up or transfer in time: end the stream regardless."""


TwilioEvent = (
    TwilioConnected
    | TwilioStart
    | TwilioBadStart
    | TwilioMedia
    | TwilioMark
    | TwilioDtmf
    | TwilioStop
    | TwilioClosed
    | TwilioFrameTooLarge
    | TwilioInvalid
)
AgentEvent = (
    AgentConnected
    | AgentConnectFailed
    | AgentWelcome
    | AgentSettingsApplied
    | AgentAudio
    | AgentUserStartedSpeaking
    | AgentStartedSpeaking
    | AgentAudioDone
    | AgentConversationText
    | AgentThinking
    | AgentFunctionCallRequest
    | AgentWarning
    | AgentError
    | AgentInfo
    | AgentInjectionRefused
    | AgentUnknown
    | AgentInvalid
    | AgentClosed
)
BridgeEvent = (
    StreamTokenAccepted
    | StreamTokenRefused
    | StreamOverCapacity
    | StreamEvicted
    | FunctionDone
    | CallUpdated
    | CallGone
    | CallUpdateFailed
    | RecordingStarted
    | RecordingFailed
    | BridgeFailed
    | OutboxFull
    | BridgeShuttingDown
    | OperatorCommand
    | AmdVerdict
)
TimerEvent = (
    Tick
    | StartDeadlinePassed
    | MediaDeadlinePassed
    | AgentReadyDeadlinePassed
    | KeepAliveDue
    | AgentRetryDue
    | AgentUnavailable
    | HangUpDue
    | TransferDue
    | CallUpdateDeadlinePassed
    | CalleeAnswered
)
Event = TwilioEvent | AgentEvent | BridgeEvent | TimerEvent
