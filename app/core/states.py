"""Every state of a call and every transition, in one place.

Read this file to know what a call does with any input at any moment. It holds two machines:

- ``CallState``, the call as a whole, driven by events (``events.py``). ``TRANSITIONS`` says,
  for each state, which events it takes and where each leads: to a state (the same one when
  the event is handled in place), or to the end of the call with an ``Outcome`` (an accepted
  call ended) or a ``RejectReason`` (a stream refused before it became a call). An event a
  state does not list is not an error: it is ignored, counted as ``out_of_order`` and logged
  once per call. In ``ENDED`` every event is ignored. So every (state, event) pair has a
  defined result, and ``test_call_states.py`` checks them all.
- ``PlaybackState``, what the caller is hearing, driven by ``PlaybackInput``: it decides
  whether a ``UserStartedSpeaking`` interrupted the agent (a barge-in) or not.

What the call *does* on each event (the handlers) and on entering each state lives in
``call.py``; which deadline a ``Tick`` checks in each state is ``DEADLINES`` below.
As in h11's ``_state.py``, nothing else may change these states.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentClosed,
    AgentConnected,
    AgentConnectFailed,
    AgentConversationText,
    AgentError,
    AgentFunctionCallRequest,
    AgentInfo,
    AgentInjectionRefused,
    AgentInvalid,
    AgentReadyDeadlinePassed,
    AgentRetryDue,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentThinking,
    AgentUnavailable,
    AgentUnknown,
    AgentUserStartedSpeaking,
    AgentWarning,
    AgentWelcome,
    AmdVerdict,
    BridgeFailed,
    BridgeShuttingDown,
    CalleeAnswered,
    CallGone,
    CallUpdated,
    CallUpdateDeadlinePassed,
    CallUpdateFailed,
    Event,
    FunctionDone,
    HangUpDue,
    KeepAliveDue,
    MediaDeadlinePassed,
    OperatorCommand,
    OutboxFull,
    RecordingFailed,
    RecordingStarted,
    StartDeadlinePassed,
    StreamEvicted,
    StreamOverCapacity,
    StreamTokenAccepted,
    StreamTokenRefused,
    Tick,
    TransferDue,
    TwilioBadStart,
    TwilioClosed,
    TwilioConnected,
    TwilioDtmf,
    TwilioFrameTooLarge,
    TwilioInvalid,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
)
from app.core.vocabulary import Outcome, RejectReason


class CallState(Enum):
    """The call, in the order a healthy call passes through it."""

    AWAITING_START = "awaiting_start"  # socket accepted; Twilio's start not seen (start deadline)
    CHECKING_TOKEN = "checking_token"  # start seen; the one-time stream token is being redeemed
    AWAITING_ANSWER = "awaiting_answer"  # a call we placed: who answered? (the callee's words, AMD; outbound.py)
    CONNECTING_AGENT = "connecting_agent"  # a call now; the agent socket is being opened
    AWAITING_WELCOME = "awaiting_welcome"  # agent socket open; its Welcome not seen
    AWAITING_SETTINGS_APPLIED = "awaiting_settings_applied"  # Settings sent
    LIVE = "live"  # agent ready: audio flows both ways, barge-in, keep-alives, functions
    AGENT_DOWN = "agent_down"  # the agent session failed: reconnect (mid-call) or fall back
    HANGING_UP = "hanging_up"  # goodbye played; Twilio asked to end the call (REST)
    TRANSFERRING = "transferring"  # announcement played; Twilio asked to dial the destination
    FALLING_BACK = "falling_back"  # the agent could not be reached: Twilio asked to play the fallback
    ENDING_DEAD_STREAM = "ending_dead_stream"  # no media for media_timeout: Twilio asked to complete the call
    ENDED = "ended"  # EndCall given; every later event is ignored


Target = CallState | Outcome | RejectReason
"""Where an event leads: a state, or the end of the call with this outcome or reason."""

Row = Mapping[type[Event], Target]

# Parts of rows shared by several states, so each row below reads as what is special to it.
_BEFORE_CALL: Row = {
    # a stream that ends before its token is redeemed was never a call: it is refused
    TwilioStop: RejectReason.NO_START,
    TwilioClosed: RejectReason.NO_START,
    TwilioFrameTooLarge: RejectReason.NO_START,
    StartDeadlinePassed: RejectReason.NO_START,
    # the pool of token-less sockets was full: the oldest goes (app/stream_admission.py)
    StreamEvicted: RejectReason.EVICTED,
    BridgeFailed: RejectReason.INTERNAL_ERROR,
    OutboxFull: RejectReason.INTERNAL_ERROR,
    BridgeShuttingDown: RejectReason.SHUTTING_DOWN,
}
_IN_CALL: Row = {
    TwilioStop: Outcome.CALLER_HANGUP,
    TwilioClosed: Outcome.CALLER_HANGUP,
    TwilioFrameTooLarge: Outcome.OVERSIZE_FRAME,
    # no media for media_timeout: the stream is dead though its socket is open; the call is
    # completed through the REST API (so Twilio stops billing), then both sockets are closed
    # (without REST credentials the handler ends it at once: closing is all there is)
    MediaDeadlinePassed: CallState.ENDING_DEAD_STREAM,
    BridgeFailed: Outcome.BRIDGE_ERROR,
    # Twilio's socket stopped reading (the agent's is handled by the pump as a lost session):
    # what is sent on it is never heard, so the caller gets the fallback through the REST API
    OutboxFull: CallState.FALLING_BACK,
    BridgeShuttingDown: Outcome.BRIDGE_SHUTDOWN,
}
# the agent session fails (before it is ready, or mid-call): AGENT_DOWN decides, on the next
# Tick, between another attempt (a call that was live, budget left) and the fallback
_AGENT_FAILS: Row = {
    AgentError: CallState.AGENT_DOWN,
    AgentClosed: CallState.AGENT_DOWN,
}
_AGENT_NEVER_READY: Row = {**_AGENT_FAILS, AgentReadyDeadlinePassed: CallState.AGENT_DOWN}

_AGENT_CHATTER = (AgentWarning, AgentInfo, AgentUnknown, AgentInvalid, AgentInjectionRefused)  # never change the call
# what the agent does in a session that has its Settings; a function request is answered
# (its tool run) whenever the session could take the answer
_AGENT_TALKING = (
    AgentAudio,
    AgentAudioDone,
    AgentStartedSpeaking,
    AgentUserStartedSpeaking,  # barge-in
    AgentConversationText,
    AgentThinking,
    AgentFunctionCallRequest,
    FunctionDone,
    *_AGENT_CHATTER,
)


# ending a call on purpose (states after LIVE): Twilio ends the stream itself once the call is
# updated, so its stop is the expected end, not the caller hanging up
def _handing_off(state: CallState) -> Row:
    """How a hand-off state (the REST update sent) ends for the bridge's reasons. A stuck
    Twilio socket changes nothing there: closing the stream before Twilio has the new TwiML
    would cut the call, and the update's deadline bounds the wait."""
    return {BridgeFailed: Outcome.BRIDGE_ERROR, OutboxFull: state, BridgeShuttingDown: Outcome.BRIDGE_SHUTDOWN}


# Twilio's inputs (the stream's, and the REST API's answers about a recording), and the clock,
# during a call; until LIVE the media is pre-buffered and a returned mark is unknown
_TWILIO_AND_CLOCK = (
    TwilioConnected,
    TwilioMedia,
    TwilioMark,
    TwilioDtmf,
    TwilioInvalid,
    RecordingStarted,
    RecordingFailed,
    AmdVerdict,  # a call we placed: late verdicts are taken whenever they come (outbound.py)
    Tick,
)


def _stay(state: CallState, *events: type[Event]) -> Row:
    """Events ``state`` handles in place."""
    return dict.fromkeys(events, state)


def _row(*parts: Row) -> Row:
    """One state's row from its parts; an event listed twice is a mistake, not an override."""
    row: dict[type[Event], Target] = {}
    for part in parts:
        for event, target in part.items():
            if event in row:
                raise ValueError(f"{event.__name__} listed twice in one row")
            row[event] = target
    return MappingProxyType(row)


_AWAITING_START, _CHECKING_TOKEN = CallState.AWAITING_START, CallState.CHECKING_TOKEN
_CONNECTING, _AWAITING_WELCOME = CallState.CONNECTING_AGENT, CallState.AWAITING_WELCOME
_AWAITING_SETTINGS, _LIVE = CallState.AWAITING_SETTINGS_APPLIED, CallState.LIVE
_HANGING_UP, _TRANSFERRING = CallState.HANGING_UP, CallState.TRANSFERRING
_FALLING_BACK, _AGENT_DOWN = CallState.FALLING_BACK, CallState.AGENT_DOWN
_ENDING_DEAD_STREAM = CallState.ENDING_DEAD_STREAM
_AWAITING_ANSWER = CallState.AWAITING_ANSWER

TRANSITIONS: Mapping[CallState, Row] = MappingProxyType(
    {
        _AWAITING_START: _row(
            _stay(_AWAITING_START, TwilioConnected, TwilioMedia, TwilioInvalid, Tick),
            {TwilioStart: _CHECKING_TOKEN, TwilioBadStart: RejectReason.BAD_START},
            _BEFORE_CALL,
        ),
        _CHECKING_TOKEN: _row(
            _stay(_CHECKING_TOKEN, TwilioConnected, TwilioMedia, TwilioInvalid, Tick),
            {
                StreamTokenAccepted: _CONNECTING,
                StreamTokenRefused: RejectReason.BAD_TOKEN,
                StreamOverCapacity: RejectReason.OVER_CAPACITY,
            },
            _BEFORE_CALL,
        ),
        # outbound only (the token's handler moves there instead of CONNECTING_AGENT): the
        # callee's audio is held until it is time to greet, or a machine or a fax is known
        _AWAITING_ANSWER: _row(
            _stay(_AWAITING_ANSWER, *_TWILIO_AND_CLOCK),
            {CalleeAnswered: _CONNECTING, HangUpDue: _HANGING_UP},  # a fax, or a machine with no message to leave
            _IN_CALL,
        ),
        _CONNECTING: _row(
            _stay(_CONNECTING, *_TWILIO_AND_CLOCK),
            {AgentConnected: _AWAITING_WELCOME, AgentConnectFailed: _AGENT_DOWN},
            _AGENT_NEVER_READY,
            _IN_CALL,
        ),
        _AWAITING_WELCOME: _row(
            _stay(_AWAITING_WELCOME, *_TWILIO_AND_CLOCK, *_AGENT_CHATTER),
            {AgentWelcome: _AWAITING_SETTINGS},
            _AGENT_NEVER_READY,
            _IN_CALL,
        ),
        _AWAITING_SETTINGS: _row(
            _stay(_AWAITING_SETTINGS, *_TWILIO_AND_CLOCK, *_AGENT_CHATTER, AgentFunctionCallRequest, FunctionDone),
            {AgentSettingsApplied: _LIVE},
            _AGENT_NEVER_READY,
            _IN_CALL,
        ),
        _LIVE: _row(
            # media relayed now, not buffered; an operator steers only a live call (the API says 409 elsewhere)
            _stay(_LIVE, *_TWILIO_AND_CLOCK, KeepAliveDue, *_AGENT_TALKING, OperatorCommand),
            {HangUpDue: _HANGING_UP, TransferDue: _TRANSFERRING},  # after the goodbye or announcement
            _AGENT_FAILS,  # reconnect with the conversation kept, or the fallback
            _IN_CALL,
        ),
        _AGENT_DOWN: _row(
            # the caller's audio is pre-buffered meanwhile; the lost session's last words change nothing
            _stay(_AGENT_DOWN, *_TWILIO_AND_CLOCK, *_AGENT_CHATTER, AgentError, AgentClosed),
            {AgentRetryDue: _CONNECTING, AgentUnavailable: _FALLING_BACK},
            _IN_CALL,
        ),
        _HANGING_UP: _row(
            # the agent's session may end or fail now: the call is ending anyway
            _stay(_HANGING_UP, *_TWILIO_AND_CLOCK, *_AGENT_TALKING, AgentError, AgentClosed),
            {
                CallUpdated: Outcome.COMPLETED,
                CallUpdateFailed: Outcome.COMPLETED,  # closing the stream ends the call all the same
                CallUpdateDeadlinePassed: Outcome.COMPLETED,
                CallGone: Outcome.COMPLETED,  # over already, which is what a hang-up wants
                TwilioStop: Outcome.COMPLETED,
                TwilioClosed: Outcome.COMPLETED,
                TwilioFrameTooLarge: Outcome.COMPLETED,
            },
            _handing_off(_HANGING_UP),
        ),
        _TRANSFERRING: _row(
            _stay(_TRANSFERRING, *_TWILIO_AND_CLOCK, *_AGENT_TALKING, AgentError, AgentClosed),
            {
                CallUpdated: Outcome.TRANSFERRED,
                CallUpdateFailed: Outcome.BRIDGE_ERROR,  # not dialled: the line closes, logged with Twilio's code
                CallUpdateDeadlinePassed: Outcome.BRIDGE_ERROR,
                CallGone: Outcome.CALLER_HANGUP,  # the caller left before the transfer took
                TwilioStop: Outcome.TRANSFERRED,  # Twilio leaves the stream for the new TwiML
                TwilioClosed: Outcome.TRANSFERRED,
                TwilioFrameTooLarge: Outcome.TRANSFERRED,
            },
            _handing_off(_TRANSFERRING),
        ),
        _FALLING_BACK: _row(
            # the agent's late messages change nothing now; its lifecycle events are out of order
            _stay(_FALLING_BACK, *_TWILIO_AND_CLOCK, *_AGENT_CHATTER, AgentError, AgentClosed),
            {
                CallUpdated: Outcome.FALLBACK,
                CallUpdateFailed: Outcome.AGENT_ERROR,  # no fallback possible: the line closes
                CallUpdateDeadlinePassed: Outcome.AGENT_ERROR,
                CallGone: Outcome.CALLER_HANGUP,  # the caller left before the fallback took
                TwilioStop: Outcome.FALLBACK,  # Twilio leaves the stream for the fallback TwiML
                TwilioClosed: Outcome.FALLBACK,
                TwilioFrameTooLarge: Outcome.FALLBACK,
            },
            _handing_off(_FALLING_BACK),
        ),
        _ENDING_DEAD_STREAM: _row(
            # whatever still arrives changes nothing: the call ends with Twilio's answer (or
            # its deadline), and the stream is closed only then, so Twilio never falls through
            # to the TwiML after <Connect> on a call it is completing
            _stay(_ENDING_DEAD_STREAM, *_TWILIO_AND_CLOCK, *_AGENT_CHATTER, AgentError, AgentClosed),
            {
                CallUpdated: Outcome.STREAM_LOST,
                CallGone: Outcome.STREAM_LOST,
                CallUpdateFailed: Outcome.STREAM_LOST,  # logged with Twilio's code; the close is all that is left
                CallUpdateDeadlinePassed: Outcome.STREAM_LOST,
                TwilioStop: Outcome.STREAM_LOST,
                TwilioClosed: Outcome.STREAM_LOST,
                TwilioFrameTooLarge: Outcome.STREAM_LOST,
            },
            _handing_off(_ENDING_DEAD_STREAM),
        ),
        CallState.ENDED: _row(),
    }
)

HANDLER_MOVES: Mapping[tuple[CallState, type[Event]], CallState] = MappingProxyType(
    {(_CHECKING_TOKEN, StreamTokenAccepted): _AWAITING_ANSWER}
)
"""Where a handler leads instead of its row's target, and when: the token of a call the bridge
placed (``CallOptions.outbound``) leads to AWAITING_ANSWER, not straight to the agent."""

Deadline = StartDeadlinePassed | AgentReadyDeadlinePassed | KeepAliveDue | CallUpdateDeadlinePassed | AgentRetryDue
DEADLINES: Mapping[CallState, type[Deadline]] = MappingProxyType(
    {
        _AWAITING_START: StartDeadlinePassed,
        _CHECKING_TOKEN: StartDeadlinePassed,  # the token check is synchronous today; later a store
        _CONNECTING: AgentReadyDeadlinePassed,
        _AWAITING_WELCOME: AgentReadyDeadlinePassed,
        _AWAITING_SETTINGS: AgentReadyDeadlinePassed,
        _LIVE: KeepAliveDue,
        _AGENT_DOWN: AgentRetryDue,  # or AgentUnavailable, when nothing is left to try
        _HANGING_UP: CallUpdateDeadlinePassed,
        _TRANSFERRING: CallUpdateDeadlinePassed,
        _FALLING_BACK: CallUpdateDeadlinePassed,
        _ENDING_DEAD_STREAM: CallUpdateDeadlinePassed,
    }
)
"""The one deadline a ``Tick`` checks in each state (none in ENDED, where nothing is taken; in
AWAITING_ANSWER the time to greet is ``Outbound.due``'s, and leads to ``CalleeAnswered``).
Besides it, every state with ``MediaDeadlinePassed`` in its row (the call before any hand-off)
watches the stream: no media for ``Telephony.media_timeout`` seconds (0: never)."""

ACCEPTED_STATES = frozenset(
    {
        _AWAITING_ANSWER,
        _CONNECTING,
        _AWAITING_WELCOME,
        _AWAITING_SETTINGS,
        _LIVE,
        _AGENT_DOWN,
        _HANGING_UP,
        _TRANSFERRING,
        _FALLING_BACK,
        _ENDING_DEAD_STREAM,
    }
)
"""States of a call whose stream token was redeemed: it counts as active and gets a record."""


class PlaybackState(Enum):
    """What Twilio is doing with the agent's speech."""

    QUIET = "quiet"  # nothing sent that Twilio has not played
    SPEAKING = "speaking"  # the agent is sending an utterance (AgentAudioDone not yet)
    PLAYING_OUT = "playing_out"  # utterance sent; Twilio has not returned every mark yet


class PlaybackInput(Enum):
    AGENT_SPEAKS = "agent_speaks"  # AgentStartedSpeaking or agent audio
    AUDIO_DONE = "audio_done"  # AgentAudioDone: a mark follows the utterance
    LAST_MARK_PLAYED = "last_mark_played"  # Twilio returned the last outstanding mark
    BARGE_IN = "barge_in"  # UserStartedSpeaking: clear sent, every mark forgotten


_P, _In = PlaybackState, PlaybackInput
PLAYBACK_TRANSITIONS: Mapping[PlaybackState, Mapping[PlaybackInput, PlaybackState]] = {
    _P.QUIET: {
        _In.AGENT_SPEAKS: _P.SPEAKING,
        _In.AUDIO_DONE: _P.PLAYING_OUT,  # AgentAudioDone with no audio still sends a mark
        _In.LAST_MARK_PLAYED: _P.QUIET,
        _In.BARGE_IN: _P.QUIET,
    },
    _P.SPEAKING: {
        _In.AGENT_SPEAKS: _P.SPEAKING,
        _In.AUDIO_DONE: _P.PLAYING_OUT,
        _In.LAST_MARK_PLAYED: _P.SPEAKING,  # an earlier utterance finished while this one streams
        _In.BARGE_IN: _P.QUIET,
    },
    _P.PLAYING_OUT: {
        _In.AGENT_SPEAKS: _P.SPEAKING,
        _In.AUDIO_DONE: _P.PLAYING_OUT,
        _In.LAST_MARK_PLAYED: _P.QUIET,
        _In.BARGE_IN: _P.QUIET,
    },
}
"""Total: every (state, input) pair is listed. A barge-in counts when the state was not QUIET."""
