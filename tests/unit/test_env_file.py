"""The .env file: a key callbridge does not read there is named (with the setting it is closest
to), an empty value is unset, and `.env.example` copied as it is loads offline, warning-free."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, Settings, env_file_warnings, load_settings, resolve

REPO = Path(__file__).resolve().parents[2]


def warnings_for(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / ".env"
    path.write_text(text)
    return [w.removeprefix(f"{path}: ") for w in env_file_warnings(path)]


def test_a_misspelled_setting_is_named_with_the_setting_it_is_closest_to(tmp_path: Path) -> None:
    assert warnings_for(tmp_path, "MAX_CALL=3\nTWILIO_ACOUNT_SID=AC1\nDEEPGRAM_KEY=k\nWHATEVER=1\n") == [
        "unknown key MAX_CALL ignored (did you mean MAX_CALLS?)",
        "unknown key TWILIO_ACOUNT_SID ignored (did you mean TWILIO_ACCOUNT_SID?)",
        "unknown key DEEPGRAM_KEY ignored (did you mean DEEPGRAM_API_KEY?)",
        "unknown key WHATEVER ignored",
    ]


def test_settings_in_any_case_and_what_compose_reads_are_not_warned_about(tmp_path: Path) -> None:
    text = "max_calls=3\nexport PORT=8081\nFORWARDED_ALLOW_IPS=*\nCOMPOSE_PROFILES=live\nCOMPOSE_PROJECT_NAME=cb\n"
    text += "DOMAIN=bridge.example.com\n"  # deploy/vm's Caddy
    assert warnings_for(tmp_path, text + "# MAX_CALL=commented out\nPUBLIC_URL=\n") == []


def test_a_proxy_in_dotenv_is_said_to_be_read_from_the_environment_only(tmp_path: Path) -> None:
    assert warnings_for(tmp_path, "HTTPS_PROXY=http://proxy:3128\n") == [
        "HTTPS_PROXY is read from the environment only, not from this file: export it (docker compose passes it on)"
    ]


def test_no_dotenv_no_warning(tmp_path: Path) -> None:
    assert env_file_warnings(tmp_path / ".env") == []


def test_the_environment_itself_is_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CALL", "3")
    assert warnings_for(tmp_path, "MAX_CALLS=3\n") == []


def test_empty_values_are_unset(tmp_path: Path) -> None:
    # a secret shorter than 16 characters is an error, and REQUIRE_DEEPGRAM without a key too:
    # empty, both are unset
    path = tmp_path / ".env"
    path.write_text("STREAM_TOKEN_SECRET=\nREQUIRE_DEEPGRAM=\nTWILIO_AUTH_TOKEN=\nLOG_TRANSCRIPTS=\nMAX_CALLS=\n")
    settings = Settings(_env_file=path)  # type: ignore[call-arg]
    assert settings.stream_token_secret is None and settings.twilio_auth_token is None
    assert not settings.require_deepgram and settings.max_calls == 100
    assert resolve(settings).use_local_agent
    path.write_text("STREAM_TOKEN_SECRET=short\n")
    with pytest.raises(ConfigError, match="STREAM_TOKEN_SECRET: must be at least 16 characters"):
        load_settings(_env_file=path)


def test_replicas_sharing_redis_must_share_a_stream_token_secret_even_an_empty_one_is_refused(tmp_path: Path) -> None:
    # empty means unset, and unset with REDIS_URL would give each replica its own secret: every
    # stream whose webhook another replica answered would be refused (bad_token)
    path = tmp_path / ".env"
    path.write_text("STREAM_TOKEN_SECRET=\nREDIS_URL=redis://redis:6379/0\n")
    with pytest.raises(ConfigError, match="STREAM_TOKEN_SECRET is required with REDIS_URL"):
        resolve(Settings(_env_file=path))  # type: ignore[call-arg]
    path.write_text("STREAM_TOKEN_SECRET=0123456789abcdef-shared\nREDIS_URL=redis://redis:6379/0\n")
    assert resolve(Settings(_env_file=path)).stream_token_secret == b"0123456789abcdef-shared"  # type: ignore[call-arg]


def test_env_example_copied_as_it_is_loads_offline_without_a_warning(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text((REPO / ".env.example").read_text())
    assert env_file_warnings(path) == []
    config = resolve(Settings(_env_file=path))  # type: ignore[call-arg]
    assert config.use_local_agent and config.settings.public_url is None
    assert config.twilio_auth_token == "callbridge-offline-development-token"


def test_env_example_says_what_to_fill_in_for_live_use_at_the_top() -> None:
    top = (REPO / ".env.example").read_text().split("\n\n", 1)[0]
    for name in ("DEEPGRAM_API_KEY", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "PUBLIC_URL", "STREAM_TOKEN_SECRET"):
        assert f"#   {name} " in top, name
    assert "REQUIRE_DEEPGRAM=1" in top
