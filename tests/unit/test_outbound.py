"""Calls the bridge places, in the core: waiting for who answers, the greeting after the
callee's first words (which reach the agent after it), a machine's message, a late verdict,
a fax, no verdict; keys pressed into the call (send_dtmf). Simulated time, no sockets."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from app.core.actions import Action, ClearTwilio, ConnectAgent, HangUpCall, SendMark, SendMedia, SendToAgent
from app.core.call import Call
from app.core.dtmf import dtmf_ulaw
from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentConnected,
    AgentFunctionCallRequest,
    AgentSettingsApplied,
    AgentStartedSpeaking,
    AgentUserStartedSpeaking,
    AgentWelcome,
    AmdVerdict,
    CallUpdated,
    FunctionCall,
    StreamTokenAccepted,
    Tick,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
)
from app.core.options import (
    AMD_GRACE_SECONDS,
    CALLEE_QUIET_SECONDS,
    SILENT_CALLEE_SECONDS,
    CallOptions,
    OutboundSpec,
    Telephony,
)
from app.core.states import CallState
from app.core.vocabulary import Outcome, RestResult
from app.outbound import fill, filled_agent, missing_variables

SID, CALL = "MZ" + "a" * 32, "CA" + "b" * 32
AGENT: dict[str, Any] = {
    "listen": {"provider": {"type": "deepgram"}},
    "think": {"provider": {"type": "open_ai"}, "prompt": "You call {{name}} about {{topic}}."},
    "speak": {"provider": {"type": "deepgram"}},
    "greeting": "Hi {{name}}, this is the clinic.",
}
LOUD, SILENT = b"\x00" * 160, b"\xff" * 160
MESSAGE = "Hello Ada, please call the clinic back."


def placed(spec: OutboundSpec | None = None, dtmf_out: bool = False) -> Call:
    options = CallOptions(
        agent=AGENT,
        telephony=Telephony(rest_available=True, media_timeout=0, dtmf_out=dtmf_out, silence_check_in=0),
        outbound=spec or OutboundSpec(voicemail=MESSAGE, amd=True, amd_timeout=30),
    )
    call = Call(CallOptions(agent="placeholder"), now=0.0)
    call.handle(TwilioStart(SID, CALL), 0.0)
    call.handle(StreamTokenAccepted(options), 0.0)
    assert call.state is CallState.AWAITING_ANSWER
    return call


def media(call: Call, frame: bytes, start: float, seconds: float) -> list[Action]:
    out: list[Action] = []
    t = start
    while t < start + seconds - 1e-9:
        out += call.handle(TwilioMedia(frame, SID), t)
        t += 0.02
    return out


def ready(call: Call, now: float) -> list[Action]:
    out: list[Action] = []
    for event in (AgentConnected(), AgentWelcome("r"), AgentSettingsApplied()):
        out += call.handle(event, now)
    assert call.state is CallState.LIVE
    return out


def sent_json(actions: list[Action]) -> list[dict[str, Any]]:
    return [json.loads(a.data) for a in actions if isinstance(a, SendToAgent) and isinstance(a.data, str)]


def sent_audio(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToAgent) and isinstance(a.data, bytes))


def test_a_pause_in_the_callees_frames_is_not_quiet() -> None:
    """A machine's greeting whose frames stop arriving for a while (a stalled network, a busy
    sender) is not over: only quiet frames received count, so its verdict can still come first."""
    call = placed()
    media(call, LOUD, 0.0, 1.0)  # "You've reached..."
    call.handle(Tick(), 1.0 + 3 * CALLEE_QUIET_SECONDS)  # no frames at all for 1.8 s
    assert call.state is CallState.AWAITING_ANSWER
    media(call, SILENT, 2.8, CALLEE_QUIET_SECONDS - 0.02)  # one frame short of the quiet it takes
    call.handle(Tick(), 2.8 + CALLEE_QUIET_SECONDS)
    assert call.state is CallState.AWAITING_ANSWER
    media(call, SILENT, 2.8 + CALLEE_QUIET_SECONDS, 0.02)
    call.handle(Tick(), 2.82 + CALLEE_QUIET_SECONDS)
    assert call.state is CallState.CONNECTING_AGENT


def test_the_greeting_follows_the_callees_hello_which_reaches_the_agent_after_it() -> None:
    call = placed()
    assert media(call, SILENT, 0.0, 1.0) == []  # an empty line: nobody is greeted
    assert call.handle(Tick(), 1.0) == [] or call.state is CallState.AWAITING_ANSWER
    held = media(call, LOUD, 1.0, 0.4)  # "Hello?"
    assert held == [] and call.state is CallState.AWAITING_ANSWER
    media(call, SILENT, 1.4, CALLEE_QUIET_SECONDS)
    actions = call.handle(Tick(), 1.4 + CALLEE_QUIET_SECONDS)
    assert call.state is CallState.CONNECTING_AGENT and any(isinstance(a, ConnectAgent) for a in actions)
    settings = [m for m in sent_json(ready(call, 2.2)) if m["type"] == "Settings"]
    assert settings[0]["agent"]["greeting"] == "Hi {{name}}, this is the clinic."  # filled by the API side
    # the agent greets; the callee's words wait for the greeting to be sent, then all go, in order
    during = media(call, SILENT, 2.3, 0.2)
    assert sent_audio(during) == b""
    call.handle(AgentStartedSpeaking(None, None, None), 2.5)
    done = call.handle(AgentAudio(b"\xff" * 1600), 2.5) + call.handle(AgentAudioDone(), 3.0)
    words = sent_audio(done)
    assert LOUD * 20 in words and words.endswith(SILENT * 10)
    assert sent_audio(call.handle(TwilioMedia(LOUD, SID), 3.1)) == LOUD  # live from then on
    record = call.summary(4.0)
    assert record["direction"] == "outbound" and record["answered_by"] is None and record["voicemail_left"] is False


@pytest.mark.parametrize("verdict", ["human", "unknown"])
def test_a_person_verdict_greets_at_once(verdict: str) -> None:
    call = placed()
    media(call, SILENT, 0.0, 0.5)
    call.handle(AmdVerdict(verdict, 1800), 1.8)
    assert call.state is CallState.CONNECTING_AGENT
    record = call.summary(2.0)
    assert record["answered_by"] == verdict and record["amd_ms"] == 1800


def test_a_machine_gets_the_message_after_its_greeting_then_the_call_is_completed() -> None:
    call = placed()
    media(call, LOUD, 0.0, 3.0)  # "You've reached Ada, leave a message" (not yet over: no quiet)
    call.handle(AmdVerdict("machine_end_beep", 3400), 3.4)
    assert call.state is CallState.CONNECTING_AGENT and call.caller.buffered_bytes == 0  # not for the agent
    actions = ready(call, 3.5)
    settings = next(m for m in sent_json(actions) if m["type"] == "Settings")
    assert "greeting" not in settings["agent"]  # no greeting for a machine
    assert {"type": "InjectAgentMessage", "message": MESSAGE} in sent_json(actions)
    assert sent_audio(media(call, SILENT, 3.5, 1.0)) == b""  # the recorder's silence: nothing relayed
    call.handle(AgentStartedSpeaking(None, None, None), 3.6)
    spoken = call.handle(AgentAudio(b"\xff" * 800), 3.6) + call.handle(AgentAudioDone(), 4.0)
    (mark,) = [a.name for a in spoken if isinstance(a, SendMark)]
    assert not any(isinstance(a, HangUpCall) for a in call.handle(Tick(), 4.5))  # not before its mark
    call.handle(TwilioMark(mark, SID), 6.0)
    assert any(isinstance(a, HangUpCall) for a in call.handle(Tick(), 6.5))
    call.handle(CallUpdated(RestResult.OK), 6.7)
    record = call.summary(7.0)
    assert record["outcome"] == Outcome.COMPLETED.value and record["hangup_reason"] == "voicemail"
    assert record["answered_by"] == "machine_end_beep" and record["amd_ms"] == 3400 and record["voicemail_left"]


def test_a_late_machine_verdict_stops_the_agent_and_switches_to_the_message() -> None:
    call = placed()
    media(call, LOUD, 0.0, 0.5)
    media(call, SILENT, 0.5, CALLEE_QUIET_SECONDS)
    call.handle(Tick(), 0.5 + CALLEE_QUIET_SECONDS)  # the machine's first words taken for a person's
    ready(call, 1.5)
    call.handle(AgentStartedSpeaking(None, None, None), 1.6)
    call.handle(AgentAudio(b"\xff" * 800), 1.6)
    late = call.handle(AmdVerdict("machine_end_beep", 5000), 5.0)
    assert isinstance(next(a for a in late if isinstance(a, ClearTwilio | SendToAgent)), ClearTwilio)
    assert {"type": "InjectAgentMessage", "message": MESSAGE} in sent_json(late)
    assert call.stats.barge_ins == 0  # the verdict cut the agent short: nobody talked over it
    assert call.handle(AgentAudio(b"\xff" * 800), 5.1) == []  # the rest of the reply to the machine: dropped
    call.handle(AgentAudioDone(), 5.2)
    call.handle(AgentStartedSpeaking(None, None, None), 5.5)  # the message
    assert any(isinstance(a, SendMedia) for a in call.handle(AgentAudio(b"\xff" * 800), 5.5))
    assert call.summary(6.0)["answered_by"] == "machine_end_beep"


def test_a_fax_is_hung_up_at_once() -> None:
    call = placed()
    actions = call.handle(AmdVerdict("fax", 1200), 1.2)
    assert any(isinstance(a, HangUpCall) for a in actions) and call.state is CallState.HANGING_UP
    assert call.hangup_reason is not None and call.hangup_reason.value == "fax"


def test_no_verdict_in_time_is_a_person_and_without_amd_silence_is_too() -> None:
    call = placed()
    media(call, SILENT, 0.0, 1.0)
    call.handle(Tick(), 30.0 + AMD_GRACE_SECONDS - 0.5)
    assert call.state is CallState.AWAITING_ANSWER
    call.handle(Tick(), 30.0 + AMD_GRACE_SECONDS)
    assert call.state is CallState.CONNECTING_AGENT
    quiet = placed(OutboundSpec(voicemail="", amd=False))
    quiet.handle(Tick(), SILENT_CALLEE_SECONDS - 0.5)
    assert quiet.state is CallState.AWAITING_ANSWER
    quiet.handle(Tick(), SILENT_CALLEE_SECONDS)
    assert quiet.state is CallState.CONNECTING_AGENT


def test_a_machine_with_no_message_to_leave_is_hung_up() -> None:
    call = placed(OutboundSpec(voicemail="", amd=True))
    actions = call.handle(AmdVerdict("machine_end_silence", 4000), 4.0)
    assert any(isinstance(a, HangUpCall) for a in actions)
    assert call.summary(5.0)["voicemail_left"] is False


def test_placeholders_are_filled_once_and_as_text() -> None:
    variables = {"name": "Ada {{topic}}", "topic": "<b>your &appointment</b>"}
    agent = filled_agent(AGENT, variables)
    assert isinstance(agent, dict)
    assert agent["think"]["prompt"] == "You call Ada {{topic}} about <b>your &appointment</b>."
    assert agent["greeting"] == "Hi Ada {{topic}}, this is the clinic."
    assert sorted(missing_variables(AGENT, "Bye {{who}}", {"name": "x"})) == ["topic", "who"]
    assert fill("{{ name }}!", {"name": "Ada"}) == "Ada!"


# --- keys out ----------------------------------------------------------------------------


def dtmf_call() -> Call:
    call = placed(dtmf_out=True)
    call.handle(AmdVerdict("human", 1000), 1.0)
    ready(call, 1.1)
    call.handle(AgentStartedSpeaking(None, None, None), 1.2)
    call.handle(AgentAudioDone(), 1.2)
    return call


def press(call: Call, digits: str, now: float) -> list[Action]:
    request = AgentFunctionCallRequest((FunctionCall("f1", "send_dtmf", json.dumps({"digits": digits}), True),))
    return call.handle(request, now)


def test_send_dtmf_plays_the_tones_after_a_clear_and_holds_the_agent_until_they_played() -> None:
    call = dtmf_call()
    actions = press(call, "12#", 2.0)
    answers = [m for m in sent_json(actions) if m["type"] == "FunctionCallResponse"]
    assert answers == [{"type": "FunctionCallResponse", "id": "f1", "name": "send_dtmf", "content": "Pressed 1 2 #."}]
    twilio = [a for a in actions if isinstance(a, ClearTwilio | SendMedia | SendMark)]
    assert isinstance(twilio[0], ClearTwilio) and isinstance(twilio[-1], SendMark)
    tones = b"".join(
        base64.b64decode(json.loads(a.text)["media"]["payload"]) for a in twilio if isinstance(a, SendMedia)
    )
    assert tones == dtmf_ulaw("12#")
    # the agent's reply meanwhile is held, a barge-in does not clear the tones, then all of it goes
    call.handle(AgentStartedSpeaking(None, None, None), 2.1)
    assert call.handle(AgentAudio(b"\xff" * 800), 2.1) == []
    assert not any(isinstance(a, ClearTwilio) for a in call.handle(AgentUserStartedSpeaking(), 2.2))
    call.handle(AgentStartedSpeaking(None, None, None), 2.3)
    assert call.handle(AgentAudio(b"\x7f" * 800), 2.3) == []
    assert not any(isinstance(a, SendMark | SendMedia) for a in call.handle(AgentAudioDone(), 2.4))
    mark = twilio[-1].name  # type: ignore[union-attr]
    released = call.handle(TwilioMark(mark, SID), 2.6)
    assert [type(a) for a in released if isinstance(a, SendMedia | SendMark)] == [SendMedia, SendMark]
    assert call.state is CallState.LIVE


@pytest.mark.parametrize("digits", ["", "12x", "1" * 33])
def test_bad_keys_are_refused_in_words(digits: str) -> None:
    call = dtmf_call()
    actions = press(call, digits, 2.0)
    (answer,) = [m for m in sent_json(actions) if m["type"] == "FunctionCallResponse"]
    assert answer["content"].startswith("No keys were pressed")
    assert not any(isinstance(a, SendMedia) for a in actions)


def test_send_dtmf_is_offered_only_when_the_profile_enables_it() -> None:
    from app.core.call_control import builtin_functions

    assert "send_dtmf" not in [f["name"] for f in builtin_functions(Telephony())]
    assert "send_dtmf" in [f["name"] for f in builtin_functions(Telephony(dtmf_out=True))]
