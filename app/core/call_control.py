"""What the agent may do to the call, and what the call does on its own: the functions the
agent calls (``end_call``, ``transfer_call``, the operator's tools), the keypad, the silence
check-in and the time limit.

Pure like the rest of the core: a tool's HTTP request and Twilio's REST updates are asked for
with actions (``RunFunction``, ``HangUpCall``, ``RedirectCall``) and answered with events. Every
client-side function request gets a ``FunctionCallResponse``: the tool's answer, or in plain
words why there is none (unknown name, bad arguments, failure, timeout), so the agent is never
left waiting. The states this part leads to (hanging up, transferring) are in ``states.py``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, assert_never

from app.agent import messages as agent_msg
from app.core.actions import Action, Log, Measure, Notify, RunFunction, SendToAgent
from app.core.dtmf import MAX_DIGITS, check_digits
from app.core.events import (
    AgentFunctionCallRequest,
    FunctionCall,
    FunctionDone,
    HangUpDue,
    OperatorCommand,
    TransferDue,
)
from app.core.options import (
    GOODBYE_GRACE_SECONDS,
    GOODBYE_TIMEOUT_SECONDS,
    HOLD_AFTER_SECONDS,
    KEYPAD_PAUSE_SECONDS,
    MAX_FUNCTION_CONTENT,
    MAX_KEYPAD_DIGITS,
    MAX_OPERATOR_ACTIONS_RECORDED,
    MAX_PENDING_FUNCTIONS,
    OPERATOR_GOODBYE,
    OPERATOR_TRANSFER_ANNOUNCEMENT,
    VOICEMAIL_TIMEOUT_SECONDS,
    CallOptions,
    Telephony,
)
from app.core.stats import CallStats
from app.core.vocabulary import FunctionResult, HangupReason, LiveEventType, LogLevel, MetricName, OperatorAction
from app.twilio.twiml import transfer_twiml

END_CALL = "end_call"
TRANSFER_CALL = "transfer_call"
SEND_DTMF = "send_dtmf"


def builtin_functions(telephony: Telephony) -> list[dict[str, Any]]:
    """The JSON schemas of the telephony functions this profile offers the agent."""
    functions: list[dict[str, Any]] = []
    if telephony.end_call:
        functions.append(
            {
                "name": END_CALL,
                "description": (
                    "End the phone call. Use it when the caller says goodbye or asks to hang up, or the "
                    "conversation is clearly over. After calling it, say one short goodbye sentence: "
                    "the line is closed once it has played."
                ),
                "parameters": {
                    "type": "object",
                    "properties": {"reason": {"type": "string", "description": "Why the call ends, in a few words."}},
                    "required": [],
                },
            }
        )
    if telephony.transfer and telephony.rest_available:
        names = [name for name, _ in telephony.transfer]
        functions.append(
            {
                "name": TRANSFER_CALL,
                "description": (
                    "Transfer the caller to a person. Use it when the caller asks for a person or you "
                    "cannot help. After calling it, tell the caller in one sentence that you are "
                    f"transferring them. Destinations: {', '.join(names)}."
                ),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "destination": {"type": "string", "enum": names, "description": "Who to transfer to."}
                    },
                    "required": ["destination"],
                },
            }
        )
    if telephony.dtmf_out:
        functions.append(
            {
                "name": SEND_DTMF,
                "description": (
                    "Press keys on the phone keypad, as a person would, to get through a phone menu "
                    '("press 1 for sales") or enter a number it asks for. Keys: 0-9, *, #, A-D; at most '
                    f"{MAX_DIGITS} at once. Say nothing while they are pressed."
                ),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "digits": {"type": "string", "description": "The keys to press, in order, e.g. 1 or 0042#."}
                    },
                    "required": ["digits"],
                },
            }
        )
    return functions


def with_functions(agent: dict[str, Any] | str, telephony: Telephony) -> dict[str, Any] | str:
    """The profile's ``agent`` with the telephony functions appended to ``think.functions``
    (to each think provider when there are fallbacks). A stored agent id cannot be changed."""
    extra = builtin_functions(telephony)
    if not extra or isinstance(agent, str):
        return agent
    think = agent.get("think")
    if not isinstance(think, dict | list):
        return agent  # nothing to add functions to (the config requires think: this is a test)
    thinks = think if isinstance(think, list) else [think]
    new_thinks = [{**t, "functions": [*t.get("functions", []), *extra]} if isinstance(t, dict) else t for t in thinks]
    return {**agent, "think": new_thinks if isinstance(think, list) else new_thinks[0]}


@dataclass
class HandOff:
    """The call is to end (hang up, or transfer): after the goodbye or announcement plays."""

    reason: HangupReason | None  # None for a transfer
    destination: str  # the transfer's name in the profile; "" for a hang-up
    requested_at: float
    goodbye_started: bool = False
    by_operator: bool = False  # an operator's hang_up or transfer, not the agent's or the bridge's
    timeout: float = GOODBYE_TIMEOUT_SECONDS  # past this, the hand-off goes ahead, played or not
    played: bool = False  # it went ahead because the goodbye (or message) played through

    @property
    def is_transfer(self) -> bool:
        return self.reason is None


class SteerProblem(StrEnum):
    """Why an operator's command is refused (the API's 400 and 409)."""

    INVALID = "invalid"  # the command itself is wrong (an unlisted transfer destination)
    NOT_NOW = "not_now"  # the call cannot take it now (not live, ending already, no REST credentials)


CONFIRMED_BY = {"PromptUpdated": OperatorAction.INSTRUCT, "SpeakUpdated": OperatorAction.VOICE}
"""The agent's answer that confirms an operator action (the others have no answer of their own)."""


@dataclass
class Steered:
    """One operator action, for the call record (``operator_actions``) and the console."""

    action: OperatorAction
    action_id: str
    at: float  # seconds since the stream started
    result: str  # sent, confirmed, refused_retrying
    text: str = ""  # only where transcripts may be recorded

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"action": self.action.value, "action_id": self.action_id, "at": self.at}
        record["result"] = self.result
        if self.text:
            record["text"] = self.text
        return record


@dataclass
class PendingFunction:
    name: str
    started_at: float
    deadline: float
    announced: bool = False


class CallControl:
    __slots__ = (
        "_digits",
        "_last_digit_at",
        "_options",
        "_stats",
        "_telephony",
        "_unsent_injection",
        "awaiting_confirmation",
        "checked_in",
        "handoff",
        "last_activity",
        "last_injection",
        "last_say",
        "pending",
        "steered",
        "tones_due",
    )

    def __init__(self, options: CallOptions, stats: CallStats, now: float) -> None:
        self._options = options
        self._telephony = options.telephony
        self._stats = stats
        self.pending: dict[str, PendingFunction] = {}
        self.handoff: HandOff | None = None
        self.last_activity = now
        self.checked_in = False
        self.last_injection = ""
        self._unsent_injection: str | None = None
        self._digits: list[str] = []
        self._last_digit_at = 0.0
        # operator actions, the latest MAX_OPERATOR_ACTIONS_RECORDED, and those awaiting the agent's
        # answer; made at the first action (most calls have none, and an empty deque is ~600 bytes)
        self.steered: deque[Steered] | None = None
        self.awaiting_confirmation: deque[Steered] | None = None
        self.last_say: Steered | None = None  # the operator's "say", while it is the injection to retry
        self.tones_due = ""  # keys send_dtmf asked for, for the call to play (then cleared)

    # --- functions -----------------------------------------------------------------------

    def functions(self, event: AgentFunctionCallRequest, now: float, call: dict[str, str]) -> list[Action]:
        """Answer or start every function of one request; ``call`` is call_sid, from and to."""
        actions: list[Action] = []
        for fn in event.functions:
            if not fn.client_side:  # declared with an endpoint: Deepgram runs it
                actions.append(Log(LogLevel.INFO, "agent_server_function_called", {"name": fn.name}))
                continue
            actions += self._one(fn, now, call)
        return actions

    def _one(self, fn: FunctionCall, now: float, call: dict[str, str]) -> list[Action]:
        self._stats.functions_called += 1
        try:
            arguments = json.loads(fn.arguments) if fn.arguments.strip() else {}
        except ValueError:
            return self._answer(
                fn.id, fn.name, f"The arguments for {fn.name} were not valid JSON.", FunctionResult.ERROR
            )
        if not isinstance(arguments, dict):
            return self._answer(
                fn.id, fn.name, f"The arguments for {fn.name} must be a JSON object.", FunctionResult.ERROR
            )
        telephony = self._telephony
        if fn.name == END_CALL and telephony.end_call:
            return self._end_call(fn, arguments, now)
        if fn.name == TRANSFER_CALL and telephony.transfer and telephony.rest_available:
            return self._transfer(fn, arguments, now)
        if fn.name == SEND_DTMF and telephony.dtmf_out:
            return self._send_dtmf(fn, arguments)
        tool = telephony.tool(fn.name)
        if tool is None:
            known = [f["name"] for f in builtin_functions(telephony)] + [t.name for t in telephony.tools]
            offered = f" The functions available are: {', '.join(known)}." if known else ""
            return self._answer(
                fn.id, fn.name, f"There is no function called {fn.name}.{offered}", FunctionResult.UNKNOWN
            )
        if len(self.pending) >= MAX_PENDING_FUNCTIONS:
            return self._answer(
                fn.id, fn.name, f"Too many functions are running; try {fn.name} again shortly.", FunctionResult.REFUSED
            )
        self.pending[fn.id] = PendingFunction(fn.name, now, now + tool.timeout)
        payload = {**call, "function": fn.name, "arguments": arguments}
        return [
            Log(LogLevel.INFO, "function_started", {"name": fn.name, "id": fn.id}),
            RunFunction(fn.id, fn.name, tool.url, payload, tool.timeout),
        ]

    def _end_call(self, fn: FunctionCall, arguments: dict[str, Any], now: float) -> list[Action]:
        if self.handoff is not None:
            return self._answer(fn.id, fn.name, "The call is already ending.", FunctionResult.REFUSED)
        self.handoff = HandOff(HangupReason.END_CALL, "", now)
        reason = str(arguments.get("reason", ""))[:200]
        return [
            Log(LogLevel.INFO, "end_call_requested", {"reason": reason} if self._options.log_transcripts else {}),
            *self._answer(
                fn.id,
                fn.name,
                "The call will end once your goodbye has played: say one short goodbye now.",
                FunctionResult.OK,
            ),
        ]

    def _transfer(self, fn: FunctionCall, arguments: dict[str, Any], now: float) -> list[Action]:
        name = arguments.get("destination")
        allowed = ", ".join(n for n, _ in self._telephony.transfer)
        if not isinstance(name, str) or self._telephony.destination(name) is None:
            shown = name if isinstance(name, str) else "(none)"
            return self._answer(
                fn.id,
                fn.name,
                f"There is no transfer destination called {shown[:64]}. The allowed destinations are: {allowed}.",
                FunctionResult.REFUSED,
            )
        if self.handoff is not None:
            return self._answer(fn.id, fn.name, "The call is already ending.", FunctionResult.REFUSED)
        self.handoff = HandOff(None, name, now)
        return [
            Log(LogLevel.INFO, "transfer_requested", {"destination": name}),
            *self._answer(
                fn.id,
                fn.name,
                f"Transferring the caller to {name} once your announcement has played: tell them in one sentence.",
                FunctionResult.OK,
            ),
        ]

    def _send_dtmf(self, fn: FunctionCall, arguments: dict[str, Any]) -> list[Action]:
        """Keys for a phone menu: checked, then played by the call (``tones_due``) once answered."""
        digits = arguments.get("digits")
        digits = digits.strip().upper() if isinstance(digits, str) else ""
        problem = check_digits(digits)
        if problem is not None:
            return self._answer(fn.id, fn.name, f"No keys were pressed: {problem}.", FunctionResult.REFUSED)
        self.tones_due = digits
        return [
            Log(
                LogLevel.INFO,
                "dtmf_sent",
                {"keys": len(digits)} if not self._options.log_transcripts else {"digits": digits},
            ),
            *self._answer(fn.id, fn.name, f"Pressed {' '.join(digits)}.", FunctionResult.OK),
        ]

    def transfer_twiml(self) -> str:
        assert self.handoff is not None and self.handoff.is_transfer
        destination = self._telephony.destination(self.handoff.destination)
        assert destination is not None
        return transfer_twiml(destination)

    def function_done(self, event: FunctionDone, now: float) -> list[Action]:
        if self.pending.pop(event.id, None) is None:
            return [Log(LogLevel.INFO, "function_answer_too_late", {"name": event.name, "id": event.id})]
        content = event.content
        if len(content) > MAX_FUNCTION_CONTENT:
            content = content[:MAX_FUNCTION_CONTENT] + " [the rest of the answer was cut]"
        result = FunctionResult.ERROR if event.failed else FunctionResult.OK
        return self._answer(event.id, event.name, content, result)

    def _answer(self, call_id: str, name: str, content: str, result: FunctionResult) -> list[Action]:
        actions: list[Action] = [
            SendToAgent(agent_msg.function_call_response(call_id, name, content)),
            Measure(MetricName.FUNCTION_CALLS, 1, result.value),
            Notify(LiveEventType.FUNCTION, {"name": name[:64], "result": result.value}),
        ]
        if result is not FunctionResult.OK:
            actions.append(
                Log(LogLevel.WARNING, "function_failed", {"name": name[:64], "id": call_id, "result": result.value})
            )
        return actions

    # --- keypad ----------------------------------------------------------------------------

    def keypad(self, digit: str, now: float, live: bool) -> list[Action]:
        if not self._telephony.dtmf:
            return []
        self._digits.append(digit)
        self._last_digit_at = now
        if live and (digit == "#" or len(self._digits) >= MAX_KEYPAD_DIGITS):
            return self._send_digits()
        return []

    def _send_digits(self) -> list[Action]:
        text = "The caller pressed " + " ".join(self._digits)
        self._digits.clear()
        return [SendToAgent(agent_msg.inject_user_message(text))]

    # --- what the caller and the agent are doing --------------------------------------------

    def activity(self, now: float, caller: bool) -> None:
        """Someone spoke (or the agent finished speaking): the silence timer starts again; only
        the caller speaking undoes a check-in (the check-in itself is agent speech)."""
        self.last_activity = now
        if caller:
            self.checked_in = False

    def agent_speaks(self) -> None:
        if self.handoff is not None:
            self.handoff.goodbye_started = True

    def injection_refused(self) -> list[Action]:
        """Deepgram refuses an injection while someone speaks: it goes again at the next quiet moment."""
        if self.last_injection:
            self._unsent_injection = self.last_injection
        say = self.last_say
        if say is None:
            return []
        say.result = "refused_retrying"
        return [self._action_event(say)]

    def _inject(self, message: str, say: Steered | None = None) -> list[Action]:
        self.last_injection = message
        self.last_say = say  # an injection of the bridge's own makes an earlier "say" history
        self._unsent_injection = None
        return [SendToAgent(agent_msg.inject_agent_message(message))]

    # --- the operator ----------------------------------------------------------------------

    def leave_message(self, text: str, now: float) -> list[Action]:
        """A machine answered a call we placed: the agent says ``text``, then the call is completed."""
        self.handoff = HandOff(HangupReason.VOICEMAIL, "", now, timeout=VOICEMAIL_TIMEOUT_SECONDS)
        return self._inject(text)

    def steer_refusal(self, command: OperatorCommand) -> tuple[SteerProblem, str] | None:
        """Whether a live call can take ``command`` now, and if not why, in words."""
        telephony = self._telephony
        if self.handoff is not None:  # its goodbye or announcement must not be replaced
            return SteerProblem.NOT_NOW, "the call is already ending"
        match command.action:
            case OperatorAction.TRANSFER if not telephony.rest_available:
                return SteerProblem.NOT_NOW, "a transfer needs Twilio REST credentials (TWILIO_ACCOUNT_SID)"
            case OperatorAction.TRANSFER if telephony.destination(command.destination) is None:
                allowed = ", ".join(name for name, _ in telephony.transfer) or "(none)"
                return (
                    SteerProblem.INVALID,
                    f"no transfer destination called {command.destination[:64]!r}; listed: {allowed}",
                )
            case _:
                return None

    def steer(self, command: OperatorCommand, at: float, now: float) -> list[Action]:
        """Carry out an operator's command (``steer_refusal`` said yes); ``at`` is seconds into
        the stream, for the record. Audited: a log line, a metric, the record and the console."""
        action = command.action
        shown = self._options.log_transcripts
        kept = self._options.record_transcript
        text = command.text
        steered = Steered(action, command.action_id, round(at, 3), "sent", text if kept else "")
        if self.steered is None or self.awaiting_confirmation is None:
            self.steered = deque(maxlen=MAX_OPERATOR_ACTIONS_RECORDED)
            self.awaiting_confirmation = deque(maxlen=MAX_OPERATOR_ACTIONS_RECORDED)
        self.steered.append(steered)
        awaiting = self.awaiting_confirmation
        fields: dict[str, Any] = {"action": action.value, "action_id": command.action_id}
        if action is OperatorAction.TRANSFER:
            fields["destination"] = command.destination
        elif text and shown:
            fields["text"] = text
        actions: list[Action] = [
            Log(LogLevel.INFO, "operator_action", fields),
            Measure(MetricName.OPERATOR_ACTIONS, 1, action.value),
        ]
        match action:
            case OperatorAction.SAY:
                actions += self._inject(text, steered)
            case OperatorAction.INSTRUCT:
                awaiting.append(steered)
                actions.append(SendToAgent(agent_msg.update_prompt(text)))
            case OperatorAction.AS_CALLER:
                self.activity(now, caller=True)
                actions.append(SendToAgent(agent_msg.inject_user_message(text)))
            case OperatorAction.VOICE:
                awaiting.append(steered)
                actions.append(SendToAgent(agent_msg.update_speak(command.speak or {})))
            case OperatorAction.HANG_UP:
                self.handoff = HandOff(HangupReason.OPERATOR, "", now, by_operator=True)
                actions += self._inject(OPERATOR_GOODBYE)
            case OperatorAction.TRANSFER:
                self.handoff = HandOff(None, command.destination, now, by_operator=True)
                actions += self._inject(OPERATOR_TRANSFER_ANNOUNCEMENT)
            case _:
                assert_never(action)
        actions.append(self._action_event(steered))
        return actions

    def agent_confirmed(self, answer: str) -> list[Action]:
        """PromptUpdated or SpeakUpdated: the oldest operator action of that kind took."""
        kind, awaiting = CONFIRMED_BY.get(answer), self.awaiting_confirmation
        for steered in awaiting or ():
            if steered.action is kind and awaiting is not None:
                awaiting.remove(steered)
                steered.result = "confirmed"
                return [self._action_event(steered)]
        return []

    @staticmethod
    def _action_event(steered: Steered) -> Notify:
        fields = {"action": steered.action.value, "action_id": steered.action_id, "result": steered.result}
        return Notify(LiveEventType.ACTION, fields)

    # --- the clock -----------------------------------------------------------------------

    def tick(
        self, now: float, stream_started_at: float, live: bool, quiet: bool
    ) -> tuple[list[Action], HangUpDue | TransferDue | None]:
        """What time alone decides in a live call: a function's deadline, the hold message,
        the keypad burst, a refused injection again, the silence check-in, the time limit, and
        whether the goodbye has played so the hand-off is due."""
        actions: list[Action] = []
        for call_id, fn in list(self.pending.items()):
            if now >= fn.deadline:
                del self.pending[call_id]
                seconds = round(fn.deadline - fn.started_at)
                actions += self._answer(
                    call_id, fn.name, f"{fn.name} did not answer within {seconds} seconds.", FunctionResult.TIMEOUT
                )
        if not live:
            return actions, None
        if self._digits and (now - self._last_digit_at >= KEYPAD_PAUSE_SECONDS):
            actions += self._send_digits()
        if any(now - fn.started_at >= HOLD_AFTER_SECONDS and not fn.announced for fn in self.pending.values()):
            for fn in self.pending.values():
                fn.announced = True
            actions += self._inject(self._telephony.hold_message)
        elif self._unsent_injection is not None and quiet:
            say = self.last_say
            actions += self._inject(self._unsent_injection, say)
            if say is not None:  # the operator's words, tried again
                say.result = "sent"
                actions.append(self._action_event(say))
        handoff = self.handoff
        if handoff is None:
            actions += self._limits(now, stream_started_at, quiet)
            return actions, None
        waited = now - handoff.requested_at
        played = quiet and (handoff.goodbye_started or waited >= GOODBYE_GRACE_SECONDS)
        if not (played or waited >= handoff.timeout):
            return actions, None
        handoff.played = played and handoff.goodbye_started
        if handoff.reason is not None:
            return actions, HangUpDue(handoff.reason)
        return actions, TransferDue(handoff.destination, self.transfer_twiml())

    def _limits(self, now: float, stream_started_at: float, quiet: bool) -> list[Action]:
        telephony = self._telephony
        if now - stream_started_at >= telephony.max_call:
            self.handoff = HandOff(HangupReason.MAX_DURATION, "", now)
            return [
                Log(LogLevel.INFO, "call_time_limit", {"max_call_seconds": telephony.max_call}),
                *self._inject(telephony.time_limit_message),
            ]
        if not telephony.silence_check_in or not quiet or self.pending:
            return []
        if now - self.last_activity < telephony.silence_check_in:
            return []
        if not self.checked_in:
            self.checked_in = True
            self.last_activity = now
            return [Log(LogLevel.INFO, "silence_check_in", {}), *self._inject(telephony.check_in_message)]
        self.handoff = HandOff(HangupReason.SILENCE, "", now)
        return [Log(LogLevel.INFO, "silence_goodbye", {}), *self._inject(telephony.silence_goodbye_message)]
