"""Configuration: good defaults, and a bad value stops start-up naming the culprit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.codecs import AudioFormat
from app.config import (
    DEFAULT_AGENT_URL,
    DEFAULT_PROFILE,
    OFFLINE_TWILIO_AUTH_TOKEN,
    ConfigError,
    Settings,
    load_profile,
    load_settings,
    resolve,
)


def settings(**fields: Any) -> Settings:
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


def test_no_keys_means_local_agent_with_offline_token() -> None:
    config = resolve(settings())
    assert config.use_local_agent and config.agent_url is None
    assert config.twilio_auth_token == OFFLINE_TWILIO_AUTH_TOKEN
    assert any("STREAM_TOKEN_SECRET" in w for w in config.warnings)
    assert len(config.stream_token_secret) >= 32


def test_require_deepgram_refuses_local_agent() -> None:
    with pytest.raises(ConfigError, match="REQUIRE_DEEPGRAM"):
        resolve(settings(require_deepgram=True))


def test_deepgram_key_uses_real_agent_and_needs_twilio_token() -> None:
    with pytest.raises(ConfigError, match="TWILIO_AUTH_TOKEN"):
        resolve(settings(deepgram_api_key="k" * 40))
    config = resolve(settings(deepgram_api_key="k" * 40, twilio_auth_token="t" * 32, stream_token_secret="s" * 32))
    assert not config.use_local_agent and config.agent_url == DEFAULT_AGENT_URL
    assert config.deepgram_api_key == "k" * 40
    assert config.warnings == ()
    assert "k" * 40 in config.secrets()


def test_default_profile_loads_with_expected_models() -> None:
    profile = resolve(settings()).profile
    agent = profile.agent_payload()
    assert isinstance(agent, dict)
    assert agent["listen"]["provider"]["model"] == "nova-3"
    assert agent["think"]["provider"]["model"] == "gpt-4o-mini"
    assert agent["speak"]["provider"]["model"] == "aura-2-thalia-en"
    assert agent["greeting"]
    options = resolve(settings()).call_options()
    assert options.agent_input == AudioFormat("mulaw", 8000) and options.agent_output == AudioFormat("mulaw", 8000)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"port": 0}, "PORT"),
        ({"agent_url": "https://agent.example.com"}, "AGENT_URL"),
        ({"public_url": "ftp://x"}, "PUBLIC_URL"),
        ({"public_url": "https://x.example.com/?a=1"}, "PUBLIC_URL"),
        ({"log_level": "loud"}, "LOG_LEVEL"),
        ({"stream_token_secret": "short"}, "STREAM_TOKEN_SECRET"),
    ],
)
def test_bad_environment_names_the_variable(env: dict[str, Any], names: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key.upper(), str(value))
    with pytest.raises(ConfigError, match=names):
        load_settings(_env_file=None)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_profile_and_bad_profiles(tmp_path: Path) -> None:
    good = write(
        tmp_path,
        "p.yaml",
        "agent:\n  listen: {provider: {type: deepgram, model: nova-3}}\n"
        "  think: {provider: {type: open_ai, model: gpt-4o-mini}, prompt: hi}\n"
        "  speak: {provider: {type: deepgram, model: aura-2-thalia-en}}\n"
        "bridge:\n  agent_audio: {output: {encoding: linear16, sample_rate: 16000}}\n",
    )
    profile = load_profile(good)
    assert profile.bridge.agent_audio.output.to_format() == AudioFormat("linear16", 16000)
    with pytest.raises(ConfigError, match=r"agent_audio\.input\.encoding"):
        load_profile(
            write(
                tmp_path,
                "a.json",
                json.dumps({"agent": "id", "bridge": {"agent_audio": {"input": {"encoding": "mp3"}}}}),
            )
        )
    with pytest.raises(ConfigError, match=r"agent\.listen is missing"):
        load_profile(write(tmp_path, "b.json", json.dumps({"agent": {"think": {}, "speak": {}}})))
    with pytest.raises(ConfigError, match="not valid"):
        load_profile(write(tmp_path, "c.json", "{"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="bogus"):
        load_profile(write(tmp_path, "d.json", json.dumps({"agent": "id", "bogus": 1})))
    long_prompt = {"agent": {"listen": {}, "think": {"prompt": "x" * 25001}, "speak": {}}}
    with pytest.raises(ConfigError, match="25000"):
        load_profile(write(tmp_path, "e.json", json.dumps(long_prompt)))


def test_stored_agent_id_profile(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, "id.json", json.dumps({"agent": "agent-config-123"})))
    assert profile.agent_payload() == "agent-config-123"


@pytest.mark.parametrize(
    ("profile", "said"),
    [
        (
            {"agent": {"think": {}, "speak": {}}},
            'agent.listen is missing, e.g. {"provider": {"type": "deepgram", "model": "nova-3"}}',
        ),
        (
            {"agent": 5},
            "agent has the wrong type (found 5), e.g. {",
        ),
        (
            {"agent": {"listen": {}, "think": [{}, 3], "speak": {}}},
            'agent.think[1] has the wrong type (found 3), e.g. {"provider": {"type": "open_ai"',
        ),
        (
            {"agent": "id", "bridge": {"keepalive_after_seconds": 20}},
            "bridge.keepalive_after_seconds should be at most 8 (found 20), e.g. 5",
        ),
        (
            {"agent": "id", "bridge": {"agent_audio": {"output": {"encoding": "mp3"}}}},
            'bridge.agent_audio.output.encoding must be one of mulaw, alaw, linear16 (found "mp3"), e.g. "mulaw"',
        ),
        (
            {"agent": "id", "bridge": {"keepalive": 5}},
            "bridge.keepalive is not a field known in bridge (known: agent_audio, tags, keepalive_after_seconds",
        ),
        ([], 'the profile has the wrong type (found a list), e.g. {"agent": {'),
    ],
)
def test_profile_errors_speak_the_profile_language(tmp_path: Path, profile: Any, said: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_profile(write(tmp_path, "p.json", json.dumps(profile)))
    message = str(info.value)
    assert said in message
    # one statement per wrong field, and nothing of the models behind it
    assert message.count(";") == 0
    for internal in ("AgentBlock", "AgentProfile", "BridgeOptions", "dict[", "list[", "Field required", "str:"):
        assert internal not in message


def test_a_missing_twilio_token_with_an_agent_url_says_what_to_do() -> None:
    with pytest.raises(ConfigError) as info:
        resolve(settings(agent_url="ws://127.0.0.1:8765/v1/agent/converse"))
    assert "TWILIO_AUTH_TOKEN" in str(info.value) and "simulate-call" in str(info.value)


def _default_profile() -> dict[str, Any]:
    return json.loads(DEFAULT_PROFILE.read_text())


def test_profiles_per_dialled_number_are_all_checked_at_start_up(tmp_path: Path) -> None:
    sales = _default_profile()
    sales["agent"]["greeting"] = "Sales, how can I help?"
    sales["bridge"]["telephony"] = {"transfer": {"desk": "+15551230009"}, "max_call_seconds": 600}
    (tmp_path / "+15551230001.json").write_text(json.dumps(sales))
    (tmp_path / "notes.txt").write_text("not a profile")
    config = resolve(settings(agent_profiles_dir=tmp_path))
    assert config.profile_for_number("+15551230001") == "+15551230001"
    assert config.profile_for_number("+15550000000") == ""  # unknown numbers: the default profile
    options = config.call_options("+15551230001")
    assert isinstance(options.agent, dict) and options.agent["greeting"] == "Sales, how can I help?"
    assert options.telephony.max_call == 600 and options.telephony.transfer == (("desk", "+15551230009"),)
    assert config.call_options().telephony.max_call == 3600

    (tmp_path / "sales team.json").write_text(json.dumps(sales))  # a name for outbound calls has no space
    with pytest.raises(ConfigError, match=r"sales team.json must be named by the number it answers in E.164"):
        resolve(settings(agent_profiles_dir=tmp_path))
    (tmp_path / "sales team.json").unlink()
    (tmp_path / "+15551230002.yaml").write_text("agent: {listen: {}}\n")
    with pytest.raises(ConfigError, match=r"\+15551230002.yaml.*agent.think is missing"):
        resolve(settings(agent_profiles_dir=tmp_path))


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"telephony": {"transfer": {"Sales Desk": "+15551230001"}}}, "lower-case letters"),
        ({"telephony": {"transfer": {"sales": "5551230001"}}}, "must be an E.164 number"),
        ({"tools": {"lookup": {"url": "https://ops.example.com/lookup"}}}, "not declared in agent.think.functions"),
        ({"tools": {"end_call": {"url": "https://ops.example.com/x"}}}, "is a built-in telephony function"),
        ({"telephony": {"silence_check_in_seconds": -1}}, "silence_check_in_seconds should be at least 0"),
    ],
)
def test_call_control_profile_mistakes_are_start_up_errors(tmp_path: Path, change: dict[str, Any], said: str) -> None:
    profile = _default_profile()
    profile["bridge"].update(change)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(ConfigError, match=said):
        resolve(settings(agent_profile=path))


def test_a_profile_may_not_declare_a_built_in_function_itself(tmp_path: Path) -> None:
    profile = _default_profile()
    profile["agent"]["think"]["functions"] = [{"name": "end_call", "description": "bye", "parameters": {}}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(ConfigError, match="declares end_call, which the bridge provides itself"):
        resolve(settings(agent_profile=path))
    profile["bridge"]["telephony"] = {"end_call": False}  # turned off: the profile's own is fine
    path.write_text(json.dumps(profile))
    assert resolve(settings(agent_profile=path)).call_options().telephony.end_call is False
