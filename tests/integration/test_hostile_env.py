"""The suite run by a developer who followed docs/deploy.md: a filled-in `.env` in the working
directory and keys exported in the shell. The tests that start servers or read configuration
must pass exactly as on a clean machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# what `cp .env.example .env && $EDITOR .env` gives: real-looking values for every variable
DOTENV = {
    "COMPOSE_PROFILES": "live",
    "DEEPGRAM_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "AGENT_URL": "wss://agent.example.com/v1/agent/converse",
    "AGENT_PROFILE": "/config/profile.json",
    "REQUIRE_DEEPGRAM": "1",
    "TWILIO_ACCOUNT_SID": "AC" + "0123456789abcdef" * 2,
    "TWILIO_AUTH_TOKEN": "developer-twilio-auth-token-0123",
    "PUBLIC_URL": "https://bridge.example.com",
    "STREAM_TOKEN_SECRET": "developer-stream-token-secret-0123456789",
    "FORWARDED_ALLOW_IPS": "*",
    "LOG_LEVEL": "error",
    "LOG_TRANSCRIPTS": "true",
    "DRAIN_TIMEOUT_SECONDS": "0",
    "CALL_EVENTS_URL": "https://ops.example.com/callbridge/events",
    "WEBHOOK_SIGNING_SECRET": "developer-signing-secret-0123",
    "READINESS_CHECK_AGENT": "true",
    "TWILIO_API_BASE": "https://twilio-egress.example.com",
}
# and in the shell, some in lower case (pydantic-settings reads those too)
EXPORTED = {
    "DEEPGRAM_API_KEY": "exported-deepgram-key-0123456789",
    "twilio_auth_token": "exported-twilio-token-0123456789",
    "public_url": "https://exported.example.com",
    "PORT": "1",
    "HOST": "203.0.113.7",
    "STREAM_TOKEN_TTL_SECONDS": "0.001",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
}
# every test that starts a server or a `callbridge` process, or reads configuration
SENSITIVE = [
    "tests/unit/test_config.py",
    "tests/integration/test_cli_offline_call.py",
    "tests/integration/test_twilio_setup.py",
    "tests/integration/test_operator_cli.py",
    "tests/integration/test_operations.py",
]


@pytest.mark.timeout(300)
def test_the_suite_ignores_the_developers_dotenv_and_environment(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in DOTENV.items()))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(REPO),
            "-c",
            str(REPO / "pyproject.toml"),
            *(str(REPO / path) for path in SENSITIVE),
        ],
        cwd=tmp_path,
        env={**os.environ, **EXPORTED},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
