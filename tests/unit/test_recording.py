"""Recording with consent (issue 10, item 6): the core's decisions, and the profile's checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.config import ConfigError, RuntimeConfig, Settings, load_profile, resolve
from app.core.actions import Log, Measure, SendToAgent, StartRecording
from app.core.events import (
    AgentAudio,
    AgentAudioDone,
    AgentConversationText,
    AgentUserStartedSpeaking,
    RecordingFailed,
    RecordingStarted,
    Tick,
    TwilioDtmf,
    TwilioMark,
)
from app.core.options import RecordingSpec
from app.core.vocabulary import ConsentMode, MetricName
from tests.unit.test_call import CALL, SID, feed, of, ready_call

GREETING_MS = 2000
CALLBACK = "https://bridge.example.com/twilio/recording-status"


def greeted(consent: ConsentMode, window: float = 30.0) -> Any:
    """A live call whose greeting (2 s, sent at once at t=1) carries the announcement."""
    call = ready_call(recording=RecordingSpec(consent, consent_window=window, status_callback_url=CALLBACK))
    feed(call, AgentConversationText("assistant", "This call is recorded. Hello!"), now=1.0)
    feed(call, AgentAudio(b"\xff" * 8 * GREETING_MS), AgentAudioDone(), now=1.0)
    return call


def recordings(actions: list[Any]) -> list[str]:
    return [a.label for a in of(actions, Measure) if a.metric is MetricName.RECORDINGS]


def test_implied_consent_records_once_the_announcement_has_played_through() -> None:
    call = greeted(ConsentMode.IMPLIED)
    assert of(feed(call, Tick(), now=2.0), StartRecording) == []  # still playing
    actions = feed(call, TwilioMark("agent-audio-1", SID), now=3.1)
    assert of(actions, StartRecording) == [StartRecording(CALL, CALLBACK)]
    assert recordings(feed(call, RecordingStarted("RE" + "1" * 32), now=3.3)) == ["started"]
    assert call.summary(10.0)["recording"] == {
        "consent_mode": "implied",
        "consent": "implied",
        "consent_at_s": 3.1,
        "state": "recording",
        "recording_sid": "RE" + "1" * 32,
    }


def test_implied_consent_is_not_given_by_a_caller_who_talked_over_the_announcement() -> None:
    call = greeted(ConsentMode.IMPLIED)
    actions = feed(call, AgentUserStartedSpeaking(), now=1.5)
    assert of(actions, StartRecording) == [] and recordings(actions) == ["no_consent"]
    feed(call, TwilioMark("agent-audio-1", SID), now=1.6)  # the cleared mark comes back: nothing changes
    record = call.summary(10.0)["recording"]
    assert record["consent"] == "none" and record["state"] == "not_recording"
    assert "talked over" in record["detail"]


def test_explicit_consent_by_the_key_which_the_agent_never_sees() -> None:
    call = greeted(ConsentMode.EXPLICIT)
    feed(call, TwilioMark("agent-audio-1", SID), now=3.0)
    actions = feed(call, TwilioDtmf("1", SID), now=4.0)
    assert of(actions, StartRecording) == [StartRecording(CALL, CALLBACK)]
    forwarded = feed(call, TwilioDtmf("2", SID), TwilioDtmf("#", SID), now=4.5)
    (burst,) = of(forwarded, SendToAgent)
    assert "pressed 2 #" in str(burst.data)  # the consent key is not among the digits
    assert call.summary(10.0)["recording"]["consent"] == "key"


def test_explicit_consent_can_be_given_while_the_announcement_still_plays() -> None:
    call = greeted(ConsentMode.EXPLICIT)
    assert of(feed(call, TwilioDtmf("1", SID), now=1.5), StartRecording)


@pytest.mark.parametrize(
    ("said", "consented"),
    [
        ("Yes, that's fine.", True),
        ("yeah sure", True),
        ("I agree", True),
        ("No.", False),
        ("yes... no, I don't want that", False),
        ("I do not agree", False),
        ("ok what is this about", False),
    ],
)
def test_explicit_consent_by_voice_is_a_yes_without_a_no(said: str, consented: bool) -> None:
    call = greeted(ConsentMode.EXPLICIT)
    feed(call, TwilioMark("agent-audio-1", SID), now=3.0)
    actions = feed(call, AgentConversationText("user", said), now=5.0)
    assert bool(of(actions, StartRecording)) is consented
    assert call.summary(10.0)["recording"]["consent"] == ("speech" if consented else "none")


def test_no_explicit_consent_within_the_window_means_no_recording_ever() -> None:
    call = greeted(ConsentMode.EXPLICIT, window=10.0)
    feed(call, TwilioMark("agent-audio-1", SID), now=3.0)
    assert recordings(feed(call, Tick(), now=12.9)) == []
    assert recordings(feed(call, Tick(), now=13.0)) == ["no_consent"]
    assert of(feed(call, TwilioDtmf("1", SID), AgentConversationText("user", "yes"), now=14.0), StartRecording) == []
    assert call.summary(20.0)["recording"]["detail"] == "no consent within the window"


def test_a_recording_twilio_refuses_is_logged_counted_and_in_the_record() -> None:
    call = greeted(ConsentMode.IMPLIED)
    feed(call, TwilioMark("agent-audio-1", SID), now=3.0)
    actions = feed(call, RecordingFailed("Twilio error 21220: HTTP 400 call not in progress"), now=3.2)
    assert recordings(actions) == ["failed"]
    assert [log.event for log in of(actions, Log)] == ["recording_failed"]
    record = call.summary(10.0)["recording"]
    assert record["consent"] == "implied" and record["state"] == "not_recording" and "21220" in record["detail"]


def test_without_a_recording_profile_nothing_is_asked_nor_recorded() -> None:
    call = ready_call()
    feed(call, AgentAudio(b"\xff" * 800), AgentAudioDone(), now=1.0)
    actions = feed(call, TwilioMark("agent-audio-1", SID), TwilioDtmf("1", SID), now=2.0)
    assert of(actions, StartRecording) == [] and "recording" not in call.summary(3.0)


# --- the profile -------------------------------------------------------------------------


def profile_file(tmp_path: Path, recording: dict[str, Any] | None, agent: Any = None) -> Path:
    base = json.loads((Path(__file__).parents[2] / "app" / "profiles" / "default.json").read_text())
    if agent is not None:
        base["agent"] = agent
    if recording is not None:
        base["bridge"]["recording"] = recording
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(base))
    return path


def config_for(path: Path, **settings: Any) -> RuntimeConfig:
    return resolve(Settings(_env_file=None, agent_profile=path, **settings))  # type: ignore[call-arg]


def test_the_announcement_leads_the_greeting_and_the_spec_reaches_the_call(tmp_path: Path) -> None:
    config = config_for(
        profile_file(tmp_path, {"consent": "explicit", "consent_key": "9"}), public_url="https://cb.example.com"
    )
    options = config.call_options()
    greeting = config.profile.agent.greeting  # type: ignore[union-attr]
    assert options.agent["greeting"] == (  # type: ignore[index]
        f"We would like to record this call. Press 9 or say yes if you agree. {greeting}"
    )
    assert options.recording == RecordingSpec(
        ConsentMode.EXPLICIT, consent_key="9", status_callback_url="https://cb.example.com/twilio/recording-status"
    )
    assert any("TWILIO_ACCOUNT_SID" in w for w in config.warnings)  # it cannot record without REST credentials


def test_recording_is_off_unless_the_profile_asks(tmp_path: Path) -> None:
    options = config_for(profile_file(tmp_path, None)).call_options()
    assert options.recording is None
    assert "record" not in str(options.agent).lower()


@pytest.mark.parametrize(
    ("recording", "field"),
    [
        ({"consent": "maybe"}, "bridge.recording.consent"),
        ({"consent": "explicit", "consent_key": "11"}, "bridge.recording.consent_key"),
        ({"consent": "implied", "consent_window_seconds": 1}, "bridge.recording.consent_window_seconds"),
        ({"consent": "implied", "record_everything": True}, "bridge.recording.record_everything"),
    ],
)
def test_a_bad_recording_option_is_a_start_up_error_naming_the_field(
    tmp_path: Path, recording: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_profile(profile_file(tmp_path, recording))


def test_recording_needs_an_inline_agent_to_announce_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bridge\.recording needs the agent block inline"):
        load_profile(profile_file(tmp_path, {"consent": "implied"}, agent="a-stored-agent-id"))


# --- the reconnect's "one moment" (issue 8) -------------------------------------------------


def test_the_builtin_one_moment_is_loaded_once_and_reaches_the_call(tmp_path: Path) -> None:
    options = config_for(profile_file(tmp_path, None)).call_options()
    assert 1.0 < len(options.hold_audio) / 8000 < 3.0 and options.hold_after == 2.0  # "One moment, please."


def test_hold_audio_none_is_silence_and_a_bad_file_is_a_start_up_error(tmp_path: Path) -> None:
    path = profile_file(tmp_path, None)
    data = json.loads(path.read_text())
    data["bridge"]["reconnect"] = {"hold_audio": "none"}
    path.write_text(json.dumps(data))
    assert config_for(path).call_options().hold_audio == b""
    data["bridge"]["reconnect"] = {"hold_audio": "missing.wav"}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bridge\.reconnect\.hold_audio: cannot read .*missing\.wav"):
        load_profile(path)
    (tmp_path / "mine.ulaw").write_bytes(b"\x7f" * 4000)  # the operator's own, next to the profile
    data["bridge"]["reconnect"] = {"hold_audio": "mine.ulaw", "hold_after_seconds": 1.5}
    path.write_text(json.dumps(data))
    options = config_for(path).call_options()
    assert options.hold_audio == b"\x7f" * 4000 and options.hold_after == 1.5
