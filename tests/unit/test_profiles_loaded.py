"""The start-up sentence saying which agent profile answers which number."""

from __future__ import annotations

import json
from pathlib import Path

from app.config import DEFAULT_PROFILE, Settings, resolve


def test_the_default_alone_and_a_chosen_profile_for_every_number(tmp_path: Path) -> None:
    config = resolve(Settings(_env_file=None))  # type: ignore[call-arg]
    assert config.profiles_loaded() == f"profile for every number: the built-in default ({DEFAULT_PROFILE})"
    chosen = tmp_path / "profile.json"
    chosen.write_text(DEFAULT_PROFILE.read_text())
    config = resolve(Settings(_env_file=None, agent_profile=chosen))  # type: ignore[call-arg]
    assert config.profiles_loaded() == f"profile for every number: {chosen}"


def test_numbers_of_the_directory_then_the_profile_of_every_other_number(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers"
    numbers.mkdir()
    profile = json.loads(DEFAULT_PROFILE.read_text())
    for name in ("+15551230002", "+15551230001"):
        (numbers / f"{name}.json").write_text(json.dumps(profile))
    config = resolve(Settings(_env_file=None, agent_profiles_dir=numbers))  # type: ignore[call-arg]
    assert config.profiles_loaded() == (
        f"profiles from {numbers}: +15551230001, +15551230002 (calls to these numbers); "
        f"every other number: the built-in default ({DEFAULT_PROFILE})"
    )
