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
    AgentInvalid,
    AgentReadyDeadlinePassed,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentThinking,
    AgentUnknown,
    AgentUserStartedSpeaking,
    AgentWarning,
    AgentWelcome,
    BridgeFailed,
    BridgeShuttingDown,
    Event,
    KeepAliveDue,
    OutboxFull,
    StartDeadlinePassed,
    StreamTokenAccepted,
    StreamTokenRefused,
    Tick,
    TwilioBadStart,
    TwilioClosed,
    TwilioConnected,
    TwilioDtmf,
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
    CONNECTING_AGENT = "connecting_agent"  # a call now; the agent socket is being opened
    AWAITING_WELCOME = "awaiting_welcome"  # agent socket open; its Welcome not seen
    AWAITING_SETTINGS_APPLIED = "awaiting_settings_applied"  # Settings sent
    LIVE = "live"  # agent ready: audio flows both ways, barge-in, keep-alives
    ENDED = "ended"  # EndCall given; every later event is ignored


Target = CallState | Outcome | RejectReason
"""Where an event leads: a state, or the end of the call with this outcome or reason."""

S = CallState

# Parts of rows shared by several states, so each row below reads as what is special to it.
_BEFORE_CALL: dict[type[Event], Target] = {
    # a stream that ends before its token is redeemed was never a call: it is refused
    TwilioStop: RejectReason.NO_START,
    TwilioClosed: RejectReason.NO_START,
    StartDeadlinePassed: RejectReason.NO_START,
    BridgeFailed: RejectReason.INTERNAL_ERROR,
    OutboxFull: RejectReason.INTERNAL_ERROR,
    BridgeShuttingDown: RejectReason.SHUTTING_DOWN,
}
_IN_CALL: dict[type[Event], Target] = {
    TwilioStop: Outcome.CALLER_HANGUP,
    TwilioClosed: Outcome.CALLER_HANGUP,
    BridgeFailed: Outcome.BRIDGE_ERROR,
    OutboxFull: Outcome.BRIDGE_ERROR,  # a peer stopped reading
    BridgeShuttingDown: Outcome.BRIDGE_SHUTDOWN,
}
_AGENT_SESSION_ENDS: dict[type[Event], Target] = {
    AgentError: Outcome.AGENT_ERROR,
    AgentClosed: Outcome.AGENT_CLOSED,
}
_AGENT_NOT_READY_IN_TIME: dict[type[Event], Target] = {AgentReadyDeadlinePassed: Outcome.AGENT_ERROR}


def _stay(state: CallState, *events: type[Event]) -> dict[type[Event], Target]:
    """Events ``state`` handles in place."""
    return dict.fromkeys(events, state)


_AGENT_CHATTER = (AgentWarning, AgentInfo, AgentUnknown, AgentInvalid)  # never change the call
# Twilio's inputs during a call; until LIVE the media is pre-buffered and a mark is unknown
_TWILIO_IN_CALL = (TwilioConnected, TwilioMedia, TwilioMark, TwilioDtmf, TwilioInvalid, Tick)

TRANSITIONS: Mapping[CallState, Mapping[type[Event], Target]] = {
    S.AWAITING_START: {
        **_stay(S.AWAITING_START, TwilioConnected, TwilioMedia, TwilioInvalid, Tick),
        TwilioStart: S.CHECKING_TOKEN,
        TwilioBadStart: RejectReason.BAD_START,
        **_BEFORE_CALL,
    },
    S.CHECKING_TOKEN: {
        **_stay(S.CHECKING_TOKEN, TwilioConnected, TwilioMedia, TwilioInvalid, Tick),
        StreamTokenAccepted: S.CONNECTING_AGENT,
        StreamTokenRefused: RejectReason.BAD_TOKEN,
        **_BEFORE_CALL,
    },
    S.CONNECTING_AGENT: {
        **_stay(S.CONNECTING_AGENT, *_TWILIO_IN_CALL),
        AgentConnected: S.AWAITING_WELCOME,
        AgentConnectFailed: Outcome.AGENT_ERROR,
        **_AGENT_SESSION_ENDS,
        **_AGENT_NOT_READY_IN_TIME,
        **_IN_CALL,
    },
    S.AWAITING_WELCOME: {
        **_stay(S.AWAITING_WELCOME, *_TWILIO_IN_CALL, *_AGENT_CHATTER),
        AgentWelcome: S.AWAITING_SETTINGS_APPLIED,
        **_AGENT_SESSION_ENDS,
        **_AGENT_NOT_READY_IN_TIME,
        **_IN_CALL,
    },
    S.AWAITING_SETTINGS_APPLIED: {
        # a function request is answered whenever the session has its Settings
        **_stay(S.AWAITING_SETTINGS_APPLIED, *_TWILIO_IN_CALL, *_AGENT_CHATTER, AgentFunctionCallRequest),
        AgentSettingsApplied: S.LIVE,
        **_AGENT_SESSION_ENDS,
        **_AGENT_NOT_READY_IN_TIME,
        **_IN_CALL,
    },
    S.LIVE: {
        **_stay(
            S.LIVE,
            *_TWILIO_IN_CALL,  # media is relayed now, not buffered
            KeepAliveDue,
            AgentAudio,
            AgentAudioDone,
            AgentStartedSpeaking,
            AgentUserStartedSpeaking,  # barge-in
            AgentConversationText,
            AgentThinking,
            AgentFunctionCallRequest,
            *_AGENT_CHATTER,
        ),
        **_AGENT_SESSION_ENDS,
        **_IN_CALL,
    },
    S.ENDED: {},
}

DEADLINES: Mapping[CallState, type[StartDeadlinePassed | AgentReadyDeadlinePassed | KeepAliveDue]] = {
    S.AWAITING_START: StartDeadlinePassed,
    S.CHECKING_TOKEN: StartDeadlinePassed,
    S.CONNECTING_AGENT: AgentReadyDeadlinePassed,
    S.AWAITING_WELCOME: AgentReadyDeadlinePassed,
    S.AWAITING_SETTINGS_APPLIED: AgentReadyDeadlinePassed,
    S.LIVE: KeepAliveDue,
}
"""The one deadline a ``Tick`` checks in each state (none in ENDED)."""

ACCEPTED_STATES = frozenset({S.CONNECTING_AGENT, S.AWAITING_WELCOME, S.AWAITING_SETTINGS_APPLIED, S.LIVE})
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


P, In = PlaybackState, PlaybackInput
PLAYBACK_TRANSITIONS: Mapping[PlaybackState, Mapping[PlaybackInput, PlaybackState]] = {
    P.QUIET: {
        In.AGENT_SPEAKS: P.SPEAKING,
        In.AUDIO_DONE: P.PLAYING_OUT,  # AgentAudioDone with no audio still sends a mark
        In.LAST_MARK_PLAYED: P.QUIET,
        In.BARGE_IN: P.QUIET,
    },
    P.SPEAKING: {
        In.AGENT_SPEAKS: P.SPEAKING,
        In.AUDIO_DONE: P.PLAYING_OUT,
        In.LAST_MARK_PLAYED: P.SPEAKING,  # an earlier utterance finished while this one streams
        In.BARGE_IN: P.QUIET,
    },
    P.PLAYING_OUT: {
        In.AGENT_SPEAKS: P.SPEAKING,
        In.AUDIO_DONE: P.PLAYING_OUT,
        In.LAST_MARK_PLAYED: P.QUIET,
        In.BARGE_IN: P.QUIET,
    },
}
"""Total: every (state, input) pair is listed. A barge-in counts when the state was not QUIET."""
