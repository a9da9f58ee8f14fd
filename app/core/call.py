"""The call: a sans-I/O state machine between one Twilio stream and one agent session.

Feed it events (``Call.handle(event, now)``) and perform the actions it returns, in order.
It never touches a socket or reads a clock, so every behaviour is a plain unit test.

Where things are:
- which event each state takes and where it leads: ``states.py`` (``TRANSITIONS``);
- what happens on each event: the ``_on_*`` handlers below, one per event type (``_HANDLERS``);
- what happens on entering a state: ``Call._enter``; on the end: ``Call._end``;
- barge-in: ``Playback.barge_in`` (``playback.py``), reached from ``_on_user_started_speaking``;
- the pre-buffer of caller audio: ``caller_input.py``; Settings and keep-alive: ``agent_link.py``;
- transcript and what of it may be logged: ``conversation.py``; every limit: ``options.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, assert_never

from app.core.actions import (
    Action,
    BindLogContext,
    EndCall,
    HangUpCall,
    Log,
    Measure,
    Notify,
    RedeemStreamToken,
    RedirectCall,
)
from app.core.agent_link import AgentLink
from app.core.call_control import CallControl, SteerProblem
from app.core.caller_input import CallerInput
from app.core.conversation import Conversation
from app.core.dtmf import dtmf_ulaw
from app.core.endings import cannot_heal, close_code, end_reason, ended_by, fallback_reason
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
from app.core.options import (
    CALL_UPDATE_TIMEOUT_SECONDS,
    MAX_LOGGED_UNKNOWN_AGENT_TYPES,
    MAX_RECONNECT_WAITS_RECORDED,
    RECONNECT_BACKOFF_SECONDS,
    CallOptions,
)
from app.core.outbound import FAX, MACHINE, Outbound
from app.core.playback import Playback
from app.core.recording import Recording
from app.core.response_timer import ResponseTimer
from app.core.states import ACCEPTED_STATES, DEADLINES, TRANSITIONS, CallState, PlaybackState, Target
from app.core.stats import CallStats
from app.core.vocabulary import (
    LATENCY_REPORT_FIELDS,
    FallbackReason,
    HangupReason,
    InvalidKind,
    LiveEventType,
    LogLevel,
    MetricName,
    Outcome,
    RejectReason,
    RestResult,
)
from app.twilio.twiml import PROFILE_PARAMETER, TOKEN_PARAMETER, fallback_twiml

_RECONNECTING = frozenset(
    {CallState.AGENT_DOWN, CallState.CONNECTING_AGENT, CallState.AWAITING_WELCOME, CallState.AWAITING_SETTINGS_APPLIED}
)
"""States of a lost session being replaced (with ``down_since`` set): the caller is waiting."""

_CONTROLLED = frozenset(
    {CallState.AWAITING_SETTINGS_APPLIED, CallState.LIVE, CallState.HANGING_UP, CallState.TRANSFERRING}
)  # where functions may be running, so call control keeps their deadlines

_WATCHES_MEDIA = frozenset(state for state, row in TRANSITIONS.items() if MediaDeadlinePassed in row)
"""States of a call whose stream must keep sending media (the dead-stream watchdog)."""

_CARRIES_STREAM_SID: frozenset[type[Event]] = frozenset({TwilioMedia, TwilioMark, TwilioDtmf, TwilioStop})


class Call:
    def __init__(self, options: CallOptions, now: float) -> None:
        self.options = options
        self.started_at = now
        self.stats = stats = CallStats()
        self.state = CallState.AWAITING_START
        self._dispatch = _DISPATCH[self.state]
        self.outcome: Outcome | RejectReason | None = None
        self.end_reason = ""
        self.stream_sid = ""
        self.call_sid = ""
        self.custom_parameters: dict[str, str] = {}
        self.caller = CallerInput(options, stats)
        self.playback = Playback(options, stats)
        self.agent = AgentLink(options, stats, now)
        self.conversation = Conversation(options.log_transcripts, stats, now, keep=options.record_transcript)
        self.control = CallControl(options, stats, now)
        self.recording = Recording(options.recording)
        self.responses = ResponseTimer()
        self.outbound: Outbound | None = None  # a call the bridge placed (options.outbound), once accepted
        self.handoff_started_at = 0.0
        self.hangup_reason: HangupReason | None = None  # set when the bridge hangs up on purpose
        self.transferred_to = ""  # the destination's name, when it transfers
        self.fallback_reason: FallbackReason | None = None  # why the agent could not take the call
        self.was_live = False  # the agent session was ready once: a loss now is a reconnect
        self.failure: Event | None = None  # what took the agent session down last
        self.down_since: float | None = None  # when the session was lost (until it is back)
        self.failed_at = 0.0  # the latest failure, which the backoff counts from
        self.attempts: list[float] = []  # when each reconnect attempt was made (the budget's window)
        self.gap_attempts = 0  # attempts since this loss (the backoff's step)
        self.reconnects = 0  # sessions restored after a loss
        self.reconnect_waits: deque[float] = deque(maxlen=MAX_RECONNECT_WAITS_RECORDED)  # seconds the caller waited
        self.held = False  # the "one moment" was played for this loss
        self.last_media_at = now  # the latest Twilio media frame (the dead-stream watchdog)
        self._out_of_order_logged: set[tuple[CallState, type[Event]]] = set()
        self._unknown_types: set[str] = set()

    # --- entry point ---------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        """Take one event; the actions to perform, in order.

        The state's row of ``TRANSITIONS`` decides whether the event is taken and where it
        leads; the event's handler then runs, then the entry into the new state (or the end).
        Only ``Tick`` re-enters ``handle`` (with the deadline event it finds passed), which is
        why a transition made inside a handler wins over the row's "stay". The pump may feed
        the answer to an action (``StreamTokenAccepted`` for ``RedeemStreamToken``) while
        performing the list: such actions always come last in it.
        """
        state = self.state
        if state is CallState.ENDED:
            self.stats.ignored_after_end += 1
            return []
        kind = type(event)
        if kind in _CARRIES_STREAM_SID:  # another stream's frame is dropped (empty ids never mismatch)
            sid = event.stream_sid  # type: ignore[union-attr]
            if sid != self.stream_sid and sid and self.stream_sid:
                return self._foreign_stream(kind.__name__, sid)
        taken = self._dispatch.get(kind)
        if taken is None:
            return self._out_of_order(event)
        handler, target = taken
        actions = handler(self, event, now)
        if target is state or self.state is not state:  # handled in place, or a timer already moved it
            return actions
        if isinstance(target, CallState):
            if target is CallState.AGENT_DOWN:
                self.failure = event
            if target is CallState.FALLING_BACK:
                self.fallback_reason = self._why_fallback(event)
            return actions + self._enter(target, now)
        if target is Outcome.AGENT_ERROR and self.fallback_reason is FallbackReason.TWILIO_NOT_READING:
            target = Outcome.BRIDGE_ERROR  # the fallback failed, but the agent was never the fault
        return actions + self._end(target, self._handoff_end_reason(event) or end_reason(event))

    @property
    def ended(self) -> bool:
        return self.state is CallState.ENDED

    @property
    def accepted(self) -> bool:
        """The stream's token was redeemed: this is a call (active, with a record)."""
        return self.state in ACCEPTED_STATES or isinstance(self.outcome, Outcome)

    @property
    def transcript(self) -> list[tuple[float, str, str]]:
        return list(self.conversation.transcript)

    # --- transitions -----------------------------------------------------------------------

    def _enter(self, state: CallState, now: float) -> list[Action]:
        """Into ``state``: the console hears of it first, then the state's own entry actions."""
        return [Notify(LiveEventType.STATE, {"state": state.value}), *self._entered(state, now)]

    def _entered(self, state: CallState, now: float) -> list[Action]:
        self.state = state
        self._dispatch = _DISPATCH[state]
        match state:
            case CallState.CONNECTING_AGENT:
                return self.agent.connect(now)
            case CallState.LIVE:
                actions = [*self.agent.ready(now, self.caller.buffered_bytes), *self._first_words(now)]
                if self.down_since is not None:  # back after a loss: how long the caller waited
                    waited = round(now - self.down_since, 3)
                    self.reconnects += 1
                    self.reconnect_waits.append(waited)
                    # the attempts stay: a session that comes back and drops again at once
                    # spends the same budget, so a flapping agent still ends in the fallback
                    self.down_since, self.gap_attempts, self.held = None, 0, False
                    actions.append(Log(LogLevel.INFO, "agent_reconnected", {"waited_s": waited}))
                self.was_live = True
                return actions
            case CallState.AGENT_DOWN:
                self.caller.session_lost()
                self.playback.session_lost()
                self.failed_at = now
                if self.down_since is None:
                    self.down_since = now
                return [Log(LogLevel.WARNING, "agent_lost", {"was_live": self.was_live, "attempts": self.gap_attempts})]
            case CallState.AWAITING_ANSWER:
                return [
                    Log(LogLevel.INFO, "awaiting_answer", {"amd": self.outbound is not None and self.outbound.spec.amd})
                ]
            case CallState.HANGING_UP | CallState.TRANSFERRING | CallState.ENDING_DEAD_STREAM:
                self.handoff_started_at = now  # the REST request went with the handler's actions
                return []
            case CallState.FALLING_BACK:
                self.handoff_started_at = now
                reason = self.fallback_reason
                twiml = self.options.fallback_twiml or fallback_twiml()
                return [
                    Log(LogLevel.WARNING, "falling_back", {"reason": reason.value if reason else ""}),
                    Measure(MetricName.FALLBACKS, 1, reason.value if reason else ""),
                    RedirectCall(self.call_sid, twiml),
                ]
            case (
                CallState.AWAITING_START
                | CallState.CHECKING_TOKEN
                | CallState.AWAITING_WELCOME
                | CallState.AWAITING_SETTINGS_APPLIED
                | CallState.ENDED
            ):
                return []
            case _:
                assert_never(state)

    def _end(self, target: Outcome | RejectReason, reason: str) -> list[Action]:
        self.state = CallState.ENDED
        self._dispatch = _DISPATCH[CallState.ENDED]
        self.outcome = target
        self.end_reason = reason
        match target:
            case Outcome():
                # by construction of TRANSITIONS, an Outcome only ends an accepted call
                return [
                    Measure(MetricName.ACTIVE_CALLS, -1),
                    Measure(MetricName.CALLS, 1, target.value),
                    Notify(LiveEventType.ENDED, {"outcome": target.value}),
                    EndCall(target, reason, close_code(target)),
                ]
            case RejectReason():
                return [
                    Log(LogLevel.WARNING, "stream_rejected", {"reason": target.value, "detail": reason}),
                    Measure(MetricName.STREAMS_REJECTED, 1, target.value),
                    EndCall(target, reason, close_code(target)),
                ]
            case _:
                assert_never(target)

    def _why_fallback(self, event: Event) -> FallbackReason:
        if isinstance(event, OutboxFull):
            return FallbackReason.TWILIO_NOT_READING
        failure = self.failure if isinstance(event, AgentUnavailable) and self.failure is not None else event
        if self.was_live:
            return FallbackReason.CANNOT_HEAL if cannot_heal(failure) else FallbackReason.RECONNECT_FAILED
        return fallback_reason(failure)

    def _handoff_end_reason(self, event: Event) -> str:
        """How a hang-up, transfer or fallback the bridge asked for ended, in words ("" otherwise)."""
        if self.state is CallState.ENDING_DEAD_STREAM:
            match event:
                case CallUpdated():
                    answer = "done"
                case CallGone(detail=detail):
                    answer = f"it was already over ({detail})"
                case CallUpdateFailed(detail=detail):
                    answer = f"Twilio refused: {detail}"
                case CallUpdateDeadlinePassed():
                    answer = "Twilio did not answer in time"
                case _:
                    answer = f"meanwhile {end_reason(event)}"
            return f"{end_reason(MediaDeadlinePassed())}; completed through the REST API: {answer}"
        if self.state not in (CallState.HANGING_UP, CallState.TRANSFERRING, CallState.FALLING_BACK):
            return ""
        match event:
            case CallUpdateFailed(detail=detail):
                problem = f"; Twilio refused: {detail}"
            case CallUpdateDeadlinePassed():
                problem = "; Twilio did not answer in time"
            case CallUpdated() | TwilioStop() | TwilioClosed() | TwilioFrameTooLarge():
                problem = ""
            case CallGone(detail=detail) if self.state is CallState.HANGING_UP:
                problem = f"; the call was already over ({detail})"
            case CallGone(detail=detail):
                what = "transfer" if self.state is CallState.TRANSFERRING else "fallback"
                return f"the caller hung up before the {what} ({detail})"
            case _:
                return ""
        if self.state is CallState.HANGING_UP:
            why = f" ({self.hangup_reason.value})" if self.hangup_reason is not None else ""
            return f"hung up by the bridge after the goodbye{why}{problem}"
        if self.state is CallState.FALLING_BACK:
            why = self.fallback_reason.value if self.fallback_reason is not None else "agent unavailable"
            what = (
                "twilio stopped reading the stream"
                if self.fallback_reason is FallbackReason.TWILIO_NOT_READING
                else f"agent could not take the call ({why})"
            )
            return f"{what}: " + (f"no fallback{problem}" if problem else "fallback played")
        return f"transfer to {self.transferred_to}" + (f" failed{problem}" if problem else " done")

    def _out_of_order(self, event: Event) -> list[Action]:
        """An event this state does not take: ignored, counted, logged once per (state, event)."""
        self.stats.count_invalid(InvalidKind.OUT_OF_ORDER)
        key = (self.state, type(event))
        if key in self._out_of_order_logged:
            return []
        self._out_of_order_logged.add(key)
        return [Log(LogLevel.WARNING, "event_out_of_order", {"input": type(event).__name__, "state": self.state.value})]

    def _foreign_stream(self, what: str, got: str) -> list[Action]:
        if self.stats.count_invalid(InvalidKind.WRONG_STREAM_SID):
            return [Log(LogLevel.WARNING, "twilio_wrong_stream_sid", {"message": what, "got": got[:64]})]
        return []

    # --- Twilio events -------------------------------------------------------------------

    def _on_media(self, event: TwilioMedia, now: float) -> list[Action]:
        self.last_media_at = now
        self.responses.caller_frame(event.payload, now)
        outbound = self.outbound
        if outbound is not None:  # a call we placed: who answered decides where the audio goes
            if outbound.voicemail:  # a machine records the message: nothing for the agent to hear
                self.caller.discard(event.payload)
                return []
            if self.state is CallState.AWAITING_ANSWER:
                outbound.callee_frame(event.payload)
            elif self.state is CallState.LIVE and outbound.holding(now):
                return self.caller.push(event.payload, relay=False)
        if self.state is CallState.LIVE:
            self.agent.last_sent = now
            return self.caller.push(event.payload, relay=True)
        return self.caller.push(event.payload, relay=False)

    def _on_start(self, event: TwilioStart, now: float) -> list[Action]:
        self.stream_sid = self.playback.stream_sid = event.stream_sid
        self.playback.stream_started_at = now
        self.call_sid = event.call_sid
        self.custom_parameters = dict(event.custom_parameters)
        return [
            BindLogContext({"call_sid": event.call_sid, "stream_sid": event.stream_sid}),
            Log(LogLevel.INFO, "stream_started", {"caller_audio_buffered": self.caller.buffered_bytes}),
            RedeemStreamToken(
                self.custom_parameters.get(TOKEN_PARAMETER, ""),
                event.call_sid,
                self.custom_parameters.get(PROFILE_PARAMETER, ""),
            ),
        ]

    def _on_bad_start(self, event: TwilioBadStart, now: float) -> list[Action]:
        return [Log(LogLevel.WARNING, "twilio_start_rejected", {"detail": event.detail})]

    def _on_mark(self, event: TwilioMark, now: float) -> list[Action]:
        actions = self.playback.mark_returned(event.name, now)
        return actions + self._announcement_played(now) if self.recording.waiting else actions

    def _on_dtmf(self, event: TwilioDtmf, now: float) -> list[Action]:
        consent, consumed = self.recording.key(event.digit, now, self.started_at)
        if consumed:  # the consent key answers the bridge's question, not the agent's
            return [*self.conversation.keypad(event), *consent]
        live = self.state is CallState.LIVE
        return [*self.conversation.keypad(event), *self.control.keypad(event.digit, now, live)]

    def _announcement_played(self, now: float) -> list[Action]:
        """The first utterance is the greeting, which carries the recording announcement."""
        first = self.playback.heard.first
        if first is None or first.heard_ms is None:
            return []
        return self.recording.announced(first.interrupted, now, self.started_at)

    def _on_recording_started(self, event: RecordingStarted, now: float) -> list[Action]:
        return self.recording.started(event.sid)

    def _on_recording_failed(self, event: RecordingFailed, now: float) -> list[Action]:
        return self.recording.failed(event.detail)

    def _on_frame_too_large(self, event: TwilioFrameTooLarge, now: float) -> list[Action]:
        return self._on_twilio_invalid(TwilioInvalid(InvalidKind.OVERSIZE, "frame over the WebSocket size limit"), now)

    def _on_media_deadline(self, event: MediaDeadlinePassed, now: float) -> list[Action]:
        """A dead stream: Twilio is asked to complete the call (it would otherwise bill until
        ``max_call_seconds``); its answer ends the call (``ENDING_DEAD_STREAM``). Without REST
        credentials closing the stream is all the bridge can do: the call ends here."""
        timeout = self.options.telephony.media_timeout
        fields = {"silent_s": round(now - self.last_media_at, 3), "media_timeout_s": timeout}
        lost = Log(LogLevel.WARNING, "twilio_stream_lost", fields)
        if self.options.telephony.rest_available and self.call_sid:
            return [lost, HangUpCall(self.call_sid)]
        return [lost, *self._end(Outcome.STREAM_LOST, end_reason(event))]

    def _on_call_gone(self, event: CallGone, now: float) -> list[Action]:
        return [Log(LogLevel.INFO, "call_already_over", {"detail": event.detail, "state": self.state.value})]

    def _on_twilio_invalid(self, event: TwilioInvalid, now: float) -> list[Action]:
        if self.stats.count_invalid(event.kind):
            return [Log(LogLevel.WARNING, "twilio_frame_rejected", {"kind": event.kind.value, "detail": event.detail})]
        return []

    def _on_token_accepted(self, event: StreamTokenAccepted, now: float) -> list[Action]:
        """This is the call its token names: from now on with its own profile's options."""
        if event.options is not None and event.options != self.options:
            options = self.options = event.options
            self.caller.configure(options)
            self.playback.configure(options)
            self.conversation.keep = options.record_transcript
            self.agent.configure(options)
            self.control = CallControl(options, self.stats, now)
            self.recording = Recording(options.recording)
        self.recording.bind(self.call_sid)
        self.last_media_at = now  # the watchdog counts from the start of the call
        if self.options.outbound is not None:  # a call we placed: who answered, before any agent
            self.outbound = Outbound(self.options.outbound, now)
            return [Measure(MetricName.ACTIVE_CALLS, 1), *self._enter(CallState.AWAITING_ANSWER, now)]
        return [Measure(MetricName.ACTIVE_CALLS, 1)]

    def _on_token_refused(self, event: StreamTokenRefused, now: float) -> list[Action]:
        return [Log(LogLevel.WARNING, "stream_token_rejected", {"problem": event.reason})]

    # --- agent events --------------------------------------------------------------------

    def _on_agent_connected(self, event: AgentConnected, now: float) -> list[Action]:
        return self.agent.connected(now)

    def _on_agent_connect_failed(self, event: AgentConnectFailed, now: float) -> list[Action]:
        return [Log(LogLevel.ERROR, "agent_connect_failed", {"reason": event.reason})]

    def _on_welcome(self, event: AgentWelcome, now: float) -> list[Action]:
        """The one Settings of this session; after a loss mid-call it carries the conversation
        so far, and no greeting (the caller has been greeted)."""
        history = list(self.conversation.context) if self.was_live else None
        if history is None and self.outbound is not None and self.outbound.voicemail:
            history = []  # a machine: no greeting (the message is given at LIVE)
        return self.agent.send_settings(event.request_id, now, history)

    def _on_agent_retry_due(self, event: AgentRetryDue, now: float) -> list[Action]:
        self.attempts.append(now)
        self.gap_attempts += 1
        return [Log(LogLevel.INFO, "agent_reconnecting", {"attempt": self.gap_attempts})]

    def _hold_if_long(self, now: float) -> list[Action]:
        """A reconnect taking longer than ``hold_after``: the caller hears "one moment" once,
        rather than a silence that grows."""
        options = self.options
        if self.held or not self.was_live or not options.hold_audio or self.down_since is None:
            return []
        if now - self.down_since < options.hold_after:
            return []
        self.held = True
        played = Log(LogLevel.INFO, "hold_message_played", {"after_s": round(now - self.down_since, 3)})
        return [played, *self.playback.hold(options.hold_audio, now)]

    def _agent_down_next(self, now: float) -> AgentRetryDue | AgentUnavailable | None:
        """In AGENT_DOWN: another attempt (after its backoff), or the fallback. A call that
        never got its agent, or lost it for a reason a new session would repeat, gets the
        fallback at once; a call that was live gets the reconnect budget: at most
        ``reconnect_attempts`` attempts within any ``reconnect_within`` seconds, and no gap
        longer than that."""
        failure = self.failure
        if not self.was_live or (failure is not None and cannot_heal(failure)):
            return AgentUnavailable()
        options = self.options
        down_since = self.down_since if self.down_since is not None else now
        window = options.reconnect_within
        self.attempts = [t for t in self.attempts if now - t <= window]
        if len(self.attempts) >= options.reconnect_attempts or now - down_since > window:
            return AgentUnavailable()
        backoff = RECONNECT_BACKOFF_SECONDS[min(self.gap_attempts, len(RECONNECT_BACKOFF_SECONDS) - 1)]
        return AgentRetryDue() if now - self.failed_at >= backoff else None

    def _on_agent_audio(self, event: AgentAudio, now: float) -> list[Action]:
        if self.outbound is not None and self.outbound.muted:
            return []  # the rest of a reply to an answering machine: never sent
        actions = self.playback.audio(event.data, now)
        response_ms = self.responses.agent_audio(now)
        if response_ms is None:
            return actions
        return [
            *actions,
            Measure(MetricName.RESPONSE_LATENCY, response_ms / 1000),
            Notify(LiveEventType.LATENCY, {"response_ms": response_ms}),
        ]

    def _on_user_started_speaking(self, event: AgentUserStartedSpeaking, now: float) -> list[Action]:
        self.control.activity(now, caller=True)
        barge_ins = self.stats.barge_ins
        actions, cut = self.playback.barge_in(now)
        self.responses.cut_short()
        if cut is not None:
            self.conversation.interrupted(cut)
        if self.stats.barge_ins > barge_ins:
            actions.append(Notify(LiveEventType.BARGE_IN))
        return actions + self._announcement_played(now) if self.recording.waiting else actions

    def _on_agent_started_speaking(self, event: AgentStartedSpeaking, now: float) -> list[Action]:
        outbound = self.outbound
        if outbound is not None and outbound.muted and outbound.message_sent:
            outbound.muted = False  # the voicemail message starts: it goes to the machine
        self.responses.reply_started()
        self.playback.agent_started_speaking()
        self.control.agent_speaks()
        return [Notify(LiveEventType.AGENT_SPEAKING), *self.conversation.agent_turn(event)]

    def _on_agent_audio_done(self, event: AgentAudioDone, now: float) -> list[Action]:
        self.control.activity(now, caller=False)
        actions: list[Action] = [Notify(LiveEventType.AGENT_DONE), *self.playback.audio_done(now)]
        outbound = self.outbound
        if outbound is not None and outbound.holding(now):  # the greeting is sent: the callee's words go now
            outbound.greeting_hold_until = None
            actions += self.caller.flush()
        return actions

    def _on_conversation_text(self, event: AgentConversationText, now: float) -> list[Action]:
        caller = event.role == "user"
        self.control.activity(now, caller=caller)
        actions = self.conversation.text(event, now)
        if caller and self.recording.waiting:
            actions += self.recording.said(event.content, now, self.started_at)
        if self.options.console_transcripts and event.role in ("user", "assistant"):
            actions.append(Notify(LiveEventType.TRANSCRIPT, {"role": event.role, "text": event.content}))
        return actions

    def _on_injection_refused(self, event: AgentInjectionRefused, now: float) -> list[Action]:
        refused = self.control.injection_refused()
        return [Log(LogLevel.INFO, "agent_injection_refused", {"message": event.message}), *refused]

    # --- a call we placed ----------------------------------------------------------------

    def _first_words(self, now: float) -> list[Action]:
        """The session is ready: the caller's held audio goes to the agent, except on a call we
        placed, where a machine gets the message and a person's first words wait for the greeting."""
        outbound = self.outbound
        if outbound is None or self.was_live:
            return self.caller.flush()
        if outbound.voicemail:
            return self._leave_message(now)
        if isinstance(self.options.agent, dict) and self.options.agent.get("greeting"):
            outbound.hold_greeting(now)
            return []
        return self.caller.flush()

    def _leave_message(self, now: float) -> list[Action]:
        """A machine: the agent says the message; the call is completed once it played."""
        outbound = self.outbound
        assert outbound is not None
        text = outbound.spec.voicemail
        outbound.message_sent = True
        return [
            Log(LogLevel.INFO, "voicemail_message", {"chars": len(text)}),
            *self.control.leave_message(text, now),
        ]

    def _on_amd_verdict(self, event: AmdVerdict, now: float) -> list[Action]:
        outbound = self.outbound
        if outbound is None or not outbound.verdict(event.answered_by, event.amd_ms):
            return []  # not a call we placed, or a verdict came already
        verdict = outbound.answered_by
        actions: list[Action] = [
            Log(
                LogLevel.INFO,
                "answered_by",
                {"answered_by": verdict, "amd_ms": event.amd_ms, "state": self.state.value},
            )
        ]
        if self.state in (CallState.HANGING_UP, CallState.TRANSFERRING, CallState.FALLING_BACK):
            return actions  # ending anyway
        if verdict == FAX:
            return actions + self.handle(HangUpDue(HangupReason.FAX), now)
        if verdict not in MACHINE:
            if self.state is CallState.AWAITING_ANSWER:
                return actions + self.handle(CalleeAnswered(f"answering-machine detection: {verdict}"), now)
            return actions  # a person, as assumed
        outbound.voicemail = True
        if not outbound.spec.voicemail:  # nothing to leave: done
            return actions + self.handle(HangUpDue(HangupReason.VOICEMAIL), now)
        if self.state is CallState.AWAITING_ANSWER:
            self.caller.drop_held()  # the machine's greeting is not for the agent
            return actions + self.handle(CalleeAnswered("a machine: the message follows"), now)
        outbound.greeting_hold_until = None
        self.caller.drop_held()
        if self.state is not CallState.LIVE:  # the session is being (re)opened: the message at LIVE
            return actions
        # late: the agent already talks to the machine; that stops now, then the message
        outbound.muted = True
        clear, _ = self.playback.clear(now)  # not a barge-in: nobody talked over the agent
        return actions + clear + self._leave_message(now)

    def _on_callee_answered(self, event: CalleeAnswered, now: float) -> list[Action]:
        return [Log(LogLevel.INFO, "callee_answered", {"why": event.why})]

    # --- the operator --------------------------------------------------------------------

    def steer_refusal(self, command: OperatorCommand) -> tuple[SteerProblem, str] | None:
        """Can the call take this operator command now? (the live API answers 400 or 409 if not)."""
        if self.state is not CallState.LIVE:
            return SteerProblem.NOT_NOW, f"the call is not live (it is {self.state.value})"
        return self.control.steer_refusal(command)

    def _on_operator_command(self, event: OperatorCommand, now: float) -> list[Action]:
        return self.control.steer(event, now - self.playback.stream_started_at, now)

    def _on_function_done(self, event: FunctionDone, now: float) -> list[Action]:
        self.agent.last_sent = now
        return self.control.function_done(event, now)

    def _on_call_updated(self, event: CallUpdated, now: float) -> list[Action]:
        return [Log(LogLevel.INFO, "call_updated", {"result": event.result.value, "detail": event.detail})]

    def _on_call_update_failed(self, event: CallUpdateFailed, now: float) -> list[Action]:
        return [Log(LogLevel.ERROR, "call_update_failed", {"detail": event.detail, "state": self.state.value})]

    def _on_call_update_deadline(self, event: CallUpdateDeadlinePassed, now: float) -> list[Action]:
        return [
            Log(
                LogLevel.ERROR,
                "call_update_failed",
                {"detail": "no answer from Twilio in time", "state": self.state.value},
            ),
            Measure(MetricName.CALL_UPDATES, 1, RestResult.FAILED.value),
        ]

    def _on_hang_up_due(self, event: HangUpDue, now: float) -> list[Action]:
        self.hangup_reason = event.reason
        outbound, handoff = self.outbound, self.control.handoff
        if event.reason is HangupReason.VOICEMAIL and outbound is not None and handoff is not None:
            outbound.voicemail_left = outbound.message_sent and handoff.played
        return [Log(LogLevel.INFO, "hanging_up", {"reason": event.reason.value}), HangUpCall(self.call_sid)]

    def _on_transfer_due(self, event: TransferDue, now: float) -> list[Action]:
        self.transferred_to = event.destination
        transfer = RedirectCall(self.call_sid, event.twiml)
        return [Log(LogLevel.INFO, "transferring", {"destination": event.destination}), transfer]

    def _on_thinking(self, event: AgentThinking, now: float) -> list[Action]:
        return self.conversation.thinking(event)

    def _on_function_call_request(self, event: AgentFunctionCallRequest, now: float) -> list[Action]:
        self.agent.last_sent = now
        parties = {
            "call_sid": self.call_sid,
            "from": self.custom_parameters.get("from", ""),
            "to": self.custom_parameters.get("to", ""),
        }
        actions = self.control.functions(event, now, parties)
        digits, self.control.tones_due = self.control.tones_due, ""
        if digits:  # send_dtmf: the keys go out as media, the agent's next words after them
            actions += self.playback.tones(dtmf_ulaw(digits), now)
        return actions

    def _on_warning(self, event: AgentWarning, now: float) -> list[Action]:
        return [
            Log(LogLevel.WARNING, "agent_warning", {"code": event.code, "description": event.description}),
            Measure(MetricName.AGENT_WARNINGS, 1, event.code),
        ]

    def _on_error(self, event: AgentError, now: float) -> list[Action]:
        return [
            Log(LogLevel.ERROR, "agent_error", {"code": event.code, "description": event.description}),
            Measure(MetricName.AGENT_ERRORS, 1, event.code),
        ]

    def _on_info(self, event: AgentInfo, now: float) -> list[Action]:
        actions: list[Action] = [Log(LogLevel.DEBUG, "agent_message", {"type": event.type})]
        if event.type == "History":
            self.conversation.history(event.body)
        elif event.type == "LatencyReport":  # the agent's own figures, each optional
            for name, value in event.body.items():
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if name in LATENCY_REPORT_FIELDS and number and 0 <= value < 3600:
                    actions.append(Measure(MetricName.AGENT_REPORTED_LATENCY, float(value), name))
        else:
            actions += self.control.agent_confirmed(event.type)
        return actions

    def _on_unknown(self, event: AgentUnknown, now: float) -> list[Action]:
        if event.type in self._unknown_types or len(self._unknown_types) >= MAX_LOGGED_UNKNOWN_AGENT_TYPES:
            return []
        self._unknown_types.add(event.type)
        return [Log(LogLevel.INFO, "agent_message_unknown_ignored", {"type": event.type})]

    def _on_agent_invalid(self, event: AgentInvalid, now: float) -> list[Action]:
        if self.stats.count_invalid(InvalidKind.AGENT_INVALID):
            return [Log(LogLevel.WARNING, "agent_message_rejected", {"detail": event.detail})]
        return []

    def _on_agent_closed(self, event: AgentClosed, now: float) -> list[Action]:
        return [Log(LogLevel.WARNING, "agent_closed", {"code": event.code, "reason": event.reason})]

    # --- the bridge ----------------------------------------------------------------------

    def _on_bridge_failed(self, event: BridgeFailed, now: float) -> list[Action]:
        return [Log(LogLevel.ERROR, "bridge_stopping_call", {"reason": event.reason})]

    def _on_outbox_full(self, event: OutboxFull, now: float) -> list[Action]:
        self.stats.count_overflow(event.which)
        return [Log(LogLevel.ERROR, "send_queue_overflow", {"queue": event.which.value})]

    def _on_bridge_shutting_down(self, event: BridgeShuttingDown, now: float) -> list[Action]:
        return [Log(LogLevel.INFO, "bridge_stopping_call", {"reason": "bridge shutting down"})]

    # --- clock ---------------------------------------------------------------------------

    def _on_tick(self, event: Tick, now: float) -> list[Action]:
        """Turn the deadline this state watches (``DEADLINES``) into its event when passed, and
        let call control act on time (functions' deadlines, keypad, check-in, goodbye played)."""
        state = self.state
        timeout = self.options.telephony.media_timeout
        if timeout and state in _WATCHES_MEDIA and now - self.last_media_at >= timeout:
            return self.handle(MediaDeadlinePassed(), now)
        actions: list[Action] = []
        if state in _CONTROLLED:
            live = state is CallState.LIVE
            quiet = self.playback.state is PlaybackState.QUIET
            actions, handoff = self.control.tick(now, self.playback.stream_started_at, live, quiet)
            if handoff is not None:
                return actions + self.handle(handoff, now)
        if self.recording.waiting:
            actions = actions + self.recording.tick(now)
        if self.down_since is not None and state in _RECONNECTING:
            actions = actions + self._hold_if_long(now)
        if state is CallState.AGENT_DOWN:
            decided = self._agent_down_next(now)
            return actions + self.handle(decided, now) if decided is not None else actions
        if state is CallState.AWAITING_ANSWER:  # its deadline is the callee's: Outbound.due
            why = self.outbound.due(now) if self.outbound is not None else "not a call we placed"
            return actions + self.handle(CalleeAnswered(why), now) if why else actions
        timer = DEADLINES[state]  # every other state that takes Tick watches one
        if timer is KeepAliveDue:
            due = self.agent.keepalive_at()
        elif timer is AgentReadyDeadlinePassed:
            due = self.agent.ready_deadline()
        elif timer is CallUpdateDeadlinePassed:
            due = self.handoff_started_at + CALL_UPDATE_TIMEOUT_SECONDS
        else:
            due = self.started_at + self.options.start_timeout
        return actions + self.handle(timer(), now) if now >= due else actions

    def _on_keepalive_due(self, event: KeepAliveDue, now: float) -> list[Action]:
        return self.agent.keepalive(now)

    def _on_agent_ready_deadline(self, event: AgentReadyDeadlinePassed, now: float) -> list[Action]:
        return self.agent.not_ready(self.state.value)

    def _on_start_deadline(self, event: StartDeadlinePassed, now: float) -> list[Action]:
        return [Log(LogLevel.WARNING, "twilio_stream_without_start", {"timeout_s": self.options.start_timeout})]

    def _nothing(self, event: Event, now: float) -> list[Action]:
        return []

    # --- record --------------------------------------------------------------------------

    @property
    def buffered_caller_bytes(self) -> int:
        return self.caller.buffered_bytes

    def summary(self, now: float) -> dict[str, Any]:
        s = self.stats
        outcome = self.outcome
        record: dict[str, Any] = {
            "outcome": outcome.value if outcome is not None else "in_progress",
            "ended_by": (
                ended_by(
                    outcome, self.hangup_reason, self.control.handoff is not None and self.control.handoff.by_operator
                )
                if isinstance(outcome, Outcome)
                else None
            ),
            "end_reason": self.end_reason,
            "duration_s": round(now - self.started_at, 3),
            "turns": s.turns,
            "barge_ins": s.barge_ins,
            "caller_frames": s.caller_frames,
            "caller_bytes": s.caller_bytes,
            "agent_frames": s.agent_frames,
            "agent_bytes": s.agent_bytes,
            "caller_bytes_dropped": s.caller_bytes_dropped,
            "keepalives": s.keepalives,
            "marks_played": s.marks_played,
            "marks_cleared": s.marks_cleared,
            "agent_latency_avg_s": (
                round(s.agent_latency_sum / s.agent_latency_count, 3) if s.agent_latency_count else None
            ),
            "invalid_inputs": {kind.value: n for kind, n in s.invalid.items()},
            "overflows": {kind.value: n for kind, n in s.overflows.items()},
            "events_after_end": s.ignored_after_end,
            "functions_called": s.functions_called,
        }
        if self.hangup_reason is not None:
            record["hangup_reason"] = self.hangup_reason.value
        if self.transferred_to:
            record["transferred_to"] = self.transferred_to
        if self.fallback_reason is not None:
            record["fallback_reason"] = self.fallback_reason.value
        recording = self.recording.record()
        if recording is not None:
            record["recording"] = recording
        if self.reconnects:
            record["reconnects"] = self.reconnects
            record["reconnect_waits_s"] = list(self.reconnect_waits)  # the latest ones
        agent = self.agent
        if agent.ready_at is not None:
            record["agent_ready_s"] = round(agent.ready_at - agent.connect_started, 3)
        heard = self.playback.heard.summary(now)
        if heard["utterances"]:
            record["agent_audio"] = heard
        record.update(self.outbound.record() if self.outbound is not None else {"direction": "inbound"})
        if self.responses.responses_ms:
            record["response_ms"] = list(self.responses.responses_ms)  # per caller turn answered
        if self.control.steered:  # None or empty: no operator acted
            record["operator_actions"] = [steered.as_record() for steered in self.control.steered]
        first = self.playback.first_audio_at
        if first is not None:
            record["first_agent_audio_s"] = round(first - self.playback.stream_started_at, 3)
        return record


_Handler = Callable[[Call, Any, float], list[Action]]
_HANDLERS: dict[type[Event], _Handler] = {
    TwilioConnected: Call._nothing,
    TwilioStart: Call._on_start,
    TwilioBadStart: Call._on_bad_start,
    TwilioMedia: Call._on_media,
    TwilioMark: Call._on_mark,
    TwilioDtmf: Call._on_dtmf,
    TwilioStop: Call._nothing,
    TwilioClosed: Call._nothing,
    TwilioFrameTooLarge: Call._on_frame_too_large,
    StreamOverCapacity: Call._nothing,
    StreamEvicted: Call._nothing,
    CallGone: Call._on_call_gone,
    MediaDeadlinePassed: Call._on_media_deadline,
    FunctionDone: Call._on_function_done,
    CallUpdated: Call._on_call_updated,
    CallUpdateFailed: Call._on_call_update_failed,
    RecordingStarted: Call._on_recording_started,
    RecordingFailed: Call._on_recording_failed,
    CallUpdateDeadlinePassed: Call._on_call_update_deadline,
    AgentRetryDue: Call._on_agent_retry_due,
    AgentUnavailable: Call._nothing,
    HangUpDue: Call._on_hang_up_due,
    TransferDue: Call._on_transfer_due,
    AgentInjectionRefused: Call._on_injection_refused,
    TwilioInvalid: Call._on_twilio_invalid,
    StreamTokenAccepted: Call._on_token_accepted,
    StreamTokenRefused: Call._on_token_refused,
    AgentConnected: Call._on_agent_connected,
    AgentConnectFailed: Call._on_agent_connect_failed,
    AgentWelcome: Call._on_welcome,
    AgentSettingsApplied: Call._nothing,
    AgentAudio: Call._on_agent_audio,
    AgentUserStartedSpeaking: Call._on_user_started_speaking,
    AgentStartedSpeaking: Call._on_agent_started_speaking,
    AgentAudioDone: Call._on_agent_audio_done,
    AgentConversationText: Call._on_conversation_text,
    AgentThinking: Call._on_thinking,
    AgentFunctionCallRequest: Call._on_function_call_request,
    AgentWarning: Call._on_warning,
    AgentError: Call._on_error,
    AgentInfo: Call._on_info,
    AgentUnknown: Call._on_unknown,
    AgentInvalid: Call._on_agent_invalid,
    AgentClosed: Call._on_agent_closed,
    BridgeFailed: Call._on_bridge_failed,
    OutboxFull: Call._on_outbox_full,
    BridgeShuttingDown: Call._on_bridge_shutting_down,
    OperatorCommand: Call._on_operator_command,
    AmdVerdict: Call._on_amd_verdict,
    CalleeAnswered: Call._on_callee_answered,
    Tick: Call._on_tick,
    StartDeadlinePassed: Call._on_start_deadline,
    AgentReadyDeadlinePassed: Call._on_agent_ready_deadline,
    KeepAliveDue: Call._on_keepalive_due,
}
"""What each event does, whatever the state (the state decides whether it is taken at all)."""

_DISPATCH: dict[CallState, dict[type[Event], tuple[_Handler, Target]]] = {
    state: {kind: (_HANDLERS[kind], target) for kind, target in row.items()} for state, row in TRANSITIONS.items()
}
"""``TRANSITIONS`` joined with ``_HANDLERS`` once, so each frame costs one lookup."""
