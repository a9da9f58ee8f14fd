"""Service configuration (environment) and agent profiles (JSON or YAML files).

Everything is checked at start-up: a bad value stops the service with a message that names
the variable or the profile field, instead of failing the first phone call.
"""

from __future__ import annotations

import difflib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.audio_files import load_audio_file
from app.codecs import (
    AGENT_INPUT_ENCODINGS,
    AGENT_OUTPUT_ENCODINGS,
    TWILIO_FORMAT,
    TWILIO_SAMPLE_RATE,
    AudioFormat,
    agent_sample_rates,
)
from app.core.call_control import END_CALL, SEND_DTMF, TRANSFER_CALL
from app.core.options import DEFAULT_CONSENT_WORDS, CallOptions, OutboundSpec, RecordingSpec, Telephony, ToolSpec
from app.core.vocabulary import ConsentMode
from app.operator_auth import MIN_OPERATOR_TOKEN
from app.outbound import filled_agent
from app.twilio.rest import E164
from app.twilio.webhook import DEFAULT_FALLBACK_SAY, RECORDING_STATUS_PATH, Fallback, fallback_twiml
from app.workers import MAX_WORKERS

DEFAULT_AGENT_URL = "wss://agent.deepgram.com/v1/agent/converse"
DEFAULT_PROFILE = Path(__file__).parent / "profiles" / "default.json"
# Used only when no Twilio auth token is configured AND the local agent runs (no Deepgram key):
# lets `callbridge simulate-call` sign its webhook request on a machine with no secrets at all.
OFFLINE_TWILIO_AUTH_TOKEN = "callbridge-offline-development-token"
PROMPT_LIMIT = 25_000
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
OFFLINE_OUTBOUND_FROM = "+15550000002"  # offline, calls are placed "from" the number simulate-call dials


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


ENV_FILE = Path(".env")
"""Read from the working directory, under the environment (which wins)."""


class Settings(BaseSettings):
    # an empty value is unset, in .env and in the environment: `.env.example` copied as it is
    # leaves the keys to fill empty, and the offline quickstart runs on it
    model_config = SettingsConfigDict(
        env_file=ENV_FILE, env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True
    )

    deepgram_api_key: SecretStr | None = None
    agent_url: str | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_validate_signature: bool = True
    public_url: str | None = None
    agent_profile: Path | None = None
    agent_profiles_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    forwarded_allow_ips: str = "127.0.0.1"
    """Proxies whose X-Forwarded-* headers uvicorn trusts (comma separated, or *)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_transcripts: bool = False
    stream_token_secret: SecretStr | None = None
    stream_token_ttl_seconds: float = Field(default=60.0, gt=0, le=3600)
    require_deepgram: bool = False
    local_agent_port: int = Field(default=0, ge=0, le=65535)
    call_events_url: str | None = None
    call_events_transcript: bool = False
    webhook_signing_secret: SecretStr | None = None
    drain_timeout_seconds: float = Field(default=300.0, ge=0, le=86400)
    max_calls: int = Field(default=100, ge=1, le=10000)
    """Calls at once: admitted by the webhook, or streaming with a redeemed stream token."""
    max_tokenless_streams: int = Field(default=512, ge=1, le=100000)
    """Media sockets waiting for their ``start`` (no stream token yet), per process; when full,
    the oldest is closed to make room (app.stream_admission). They never count in MAX_CALLS.
    About 54 KiB each (27 MiB for a full pool at the default)."""
    stream_start_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    """A media socket must redeem its stream token within this: Twilio sends ``start``
    milliseconds after the upgrade, so this only bounds how long a socket that is not Twilio
    (or a badly stalled path) waits in the token-less pool."""
    http_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    loop_batch_ms: float = Field(default=1.0, ge=0, le=10)
    """Under load, the event loop's wake-ups are at most this far apart (app.loop_batching); 0: off."""
    loop_batch_min_calls: int = Field(default=40, ge=1, le=10000)
    """Calls in one process from which loop batching is on (off again below half of it): from
    40, two caller frames or more arrive per millisecond, so each wake-up saved serves two."""
    redis_url: str | None = None
    outbound_from: str | None = None
    """The caller id of calls the bridge places (``POST /api/calls`` without ``from``): a Twilio number, E.164."""
    operator_token: SecretStr | None = None
    """Bearer token of the live call API and the console (``/api/``, ``/console``); unset: both off."""
    console_transcripts: bool = False
    """What was said appears in the console and the live API (LOG_TRANSCRIPTS implies it)."""
    listen_ticket_seconds: float = Field(default=30.0, gt=0, le=600)
    """A console's ticket to listen to a call (``POST /api/calls/{sid}/listen``) is good this long, once."""
    workers: int | None = Field(default=None, ge=1, le=MAX_WORKERS)
    """Worker processes of ``serve`` (None: app.workers.default_workers, or 1 with the local agent)."""
    prometheus_multiproc_dir: Path | None = None
    """With workers: where prometheus-client's multiprocess files and app.machine_db live (a
    tmpfs); None: a new temporary directory. prometheus-client reads the variable itself."""

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL, e.g. redis://redis:6379/0")
        return value

    readiness_check_agent: bool = False
    twilio_api_base: str = "https://api.twilio.com"

    @field_validator("call_events_url")
    @classmethod
    def _events_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("outbound_from")
    @classmethod
    def _outbound_from(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not E164.fullmatch(value):
            raise ValueError("must be a phone number in E.164, e.g. +15557654321")
        return value

    @field_validator("operator_token", mode="before")
    @classmethod
    def _operator_token(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value == ""):
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if len(text) < MIN_OPERATOR_TOKEN:
            raise ValueError(
                f"must be at least {MIN_OPERATOR_TOKEN} characters "
                "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        return value

    @field_validator("webhook_signing_secret")
    @classmethod
    def _signing_len(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("agent_url")
    @classmethod
    def _ws_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("must be a ws:// or wss:// URL")
        return value

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL, e.g. https://bridge.example.com")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query string or fragment")
        return value.rstrip("/")

    @field_validator("stream_token_secret")
    @classmethod
    def _secret_len(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


# --- agent profile -------------------------------------------------------------------------


class AudioFormatModel(BaseModel):
    """The agent's audio format one way (an agent output; ``AgentInputFormatModel`` for input).

    Only formats the bridge converts properly: mu-law/A-law at 8 kHz, linear16 at the rates of
    ``AGENT_SAMPLE_RATES`` (app/codecs.py); anything else stops the service at start-up."""

    model_config = ConfigDict(extra="forbid")
    ENCODINGS: ClassVar[tuple[str, ...]] = AGENT_OUTPUT_ENCODINGS
    encoding: str = "mulaw"
    sample_rate: int = TWILIO_SAMPLE_RATE

    @field_validator("encoding")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in cls.ENCODINGS:
            raise ValueError(f"must be one of {', '.join(cls.ENCODINGS)}")
        return value

    @field_validator("sample_rate")
    @classmethod
    def _rate(cls, value: int, info: ValidationInfo) -> int:
        encoding = info.data.get("encoding")
        if encoding is None:  # the encoding is wrong itself, and said so
            return value
        rates = agent_sample_rates(encoding)
        if value not in rates:
            allowed = str(rates[0]) if len(rates) == 1 else f"one of {', '.join(map(str, rates))}"
            raise ValueError(f"must be {allowed} for {encoding}")
        return value

    def to_format(self) -> AudioFormat:
        return AudioFormat(self.encoding, self.sample_rate)  # type: ignore[arg-type]


class AgentInputFormatModel(AudioFormatModel):
    """The caller's audio as the agent gets it: A-law is not offered (see app/codecs.py)."""

    ENCODINGS: ClassVar[tuple[str, ...]] = AGENT_INPUT_ENCODINGS


class AgentAudioModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: AgentInputFormatModel = AgentInputFormatModel()
    output: AudioFormatModel = AudioFormatModel()


TRANSFER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def _transfer_name(name: str) -> str:
    if not TRANSFER_NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be lower-case letters, digits, - or _ (at most 32)")
    return name


def _destination(destination: str) -> str:
    if not (E164.fullmatch(destination) or re.fullmatch(r"sip:[^\s<>]+@[^\s<>]+", destination)):
        raise ValueError("must be an E.164 number (+15551230001) or a sip: URI (sip:desk@pbx.example.com)")
    return destination


class TelephonyModel(BaseModel):
    """``bridge.telephony``: what the agent may do to the call (docs/call-control.md)."""

    model_config = ConfigDict(extra="forbid")
    end_call: bool = True
    transfer: dict[Annotated[str, AfterValidator(_transfer_name)], Annotated[str, AfterValidator(_destination)]] = {}
    dtmf: bool = True
    silence_check_in_seconds: float = Field(default=15.0, ge=0, le=3600)
    max_call_seconds: float = Field(default=3600.0, gt=0, le=7200)  # Deepgram's session limit is 2 hours
    media_timeout_seconds: float = Field(default=10.0, ge=0, le=3600)
    """No Twilio media this long in a call: the stream is dead and the call completed (0: off)."""
    dtmf_out: bool = False
    """Offer the agent ``send_dtmf``: keypad tones sent into the call (a phone menu on the other end)."""

    @field_validator("media_timeout_seconds")
    @classmethod
    def _media_timeout(cls, value: float) -> float:
        if 0 < value < 1:  # ticks come every 0.5 s, and a network hiccup is not a dead stream
            raise ValueError("must be 0 (off) or at least 1 second")
        return value

    check_in_message: str | None = Field(default=None, min_length=1, max_length=500)
    silence_goodbye_message: str | None = Field(default=None, min_length=1, max_length=500)
    time_limit_message: str | None = Field(default=None, min_length=1, max_length=500)
    hold_message: str | None = Field(default=None, min_length=1, max_length=500)


class OutboundModel(BaseModel):
    """``bridge.outbound``: calls the bridge places (``POST /api/calls``)."""

    model_config = ConfigDict(extra="forbid")
    voicemail: str | None = Field(default=None, min_length=1, max_length=2000)
    """What the agent leaves on an answering machine, after its greeting; may hold {{placeholders}}."""
    amd_timeout_seconds: float = Field(default=30.0, ge=3, le=59)
    """Twilio's MachineDetectionTimeout: no verdict by then (plus a few seconds), a person answered."""


class FallbackModel(BaseModel):
    """``bridge.fallback``: what a caller hears when the agent cannot take the call."""

    model_config = ConfigDict(extra="forbid")
    say: str = Field(default=DEFAULT_FALLBACK_SAY, min_length=1, max_length=1000)
    dial: Annotated[str, AfterValidator(_destination)] | None = None


BUILTIN_HOLD_AUDIO = "builtin"
BUILTIN_HOLD_FILE = Path(__file__).parent / "profiles" / "one_moment.ulaw"
"""espeak-ng 1.51 (voice en-us+f3, 150 words a minute) saying "One moment, please.", converted
to mu-law 8 kHz and trimmed: 1.56 s, 12 KB."""
MAX_HOLD_AUDIO_SECONDS = 10.0
"""A hold message longer than this is refused at start-up: it would talk over the agent's return."""


def load_hold_audio(setting: str, profile_dir: Path) -> bytes:
    """``bridge.reconnect.hold_audio`` as mu-law 8 kHz, read once at start-up."""
    if setting == "none":
        return b""
    path = BUILTIN_HOLD_FILE if setting == BUILTIN_HOLD_AUDIO else profile_dir / setting
    try:
        audio = load_audio_file(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"bridge.reconnect.hold_audio: cannot read {path}: {exc}") from exc
    if not audio or len(audio) > MAX_HOLD_AUDIO_SECONDS * TWILIO_FORMAT.sample_rate:
        raise ConfigError(f"bridge.reconnect.hold_audio: {path} must hold 0-{MAX_HOLD_AUDIO_SECONDS:g} s of audio")
    return audio


class ReconnectModel(BaseModel):
    """``bridge.reconnect``: the budget for reopening an agent session lost mid-call."""

    model_config = ConfigDict(extra="forbid")
    attempts: int = Field(default=3, ge=0, le=10)
    within_seconds: float = Field(default=10.0, gt=0, le=60)
    hold_after_seconds: float = Field(default=2.0, ge=0.5, le=30)
    hold_audio: str = Field(default=BUILTIN_HOLD_AUDIO, min_length=1)
    """What the caller hears once a reconnect takes ``hold_after_seconds``: "builtin" (a short
    "One moment, please."), "none" (silence), or a 16-bit PCM WAV (any rate) or raw mu-law
    8 kHz ``.ulaw`` file, relative to the profile's directory."""


class ToolModel(BaseModel):
    """One of ``bridge.tools``: a client-side function answered by the operator's endpoint."""

    model_config = ConfigDict(extra="forbid")
    url: str
    timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value


class RecordingModel(BaseModel):
    """``bridge.recording``: record the call (both channels, by Twilio) after the caller's
    consent; absent, calls are never recorded (docs/recording.md)."""

    model_config = ConfigDict(extra="forbid")
    consent: ConsentMode
    announcement: str | None = Field(default=None, min_length=1, max_length=500)
    consent_key: str = Field(default="1", pattern=r"^[0-9*#]$")
    consent_words: list[Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z']+$")]] = Field(
        default=list(DEFAULT_CONSENT_WORDS), min_length=1, max_length=20
    )
    consent_window_seconds: float = Field(default=30.0, ge=5, le=300)

    def spoken_announcement(self) -> str:
        if self.announcement:
            return self.announcement
        if self.consent is ConsentMode.IMPLIED:
            return "This call is recorded."
        return f"We would like to record this call. Press {self.consent_key} or say yes if you agree."


class BridgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent_audio: AgentAudioModel = AgentAudioModel()
    tags: list[str] = []
    keepalive_after_seconds: float = Field(default=5.0, gt=0, le=8)
    agent_ready_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    max_prebuffer_seconds: float = Field(default=10.0, gt=0, le=60)
    telephony: TelephonyModel = TelephonyModel()
    tools: dict[str, ToolModel] = {}
    fallback: FallbackModel = FallbackModel()
    reconnect: ReconnectModel = ReconnectModel()
    recording: RecordingModel | None = None
    outbound: OutboundModel = OutboundModel()


class AgentBlock(BaseModel):
    """The parts of Deepgram's ``agent`` object the bridge relies on; the rest passes through."""

    model_config = ConfigDict(extra="allow")
    language: str | None = None
    listen: dict[str, Any]
    think: dict[str, Any] | list[dict[str, Any]]
    speak: dict[str, Any] | list[dict[str, Any]]
    greeting: str | None = None


class AgentProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent: AgentBlock | str
    bridge: BridgeOptions = BridgeOptions()
    _hold_audio: bytes = PrivateAttr(default=b"")  # bridge.reconnect.hold_audio, read by load_profile
    _source: Path | None = PrivateAttr(default=None)  # the file it was loaded from (load_profile)

    @property
    def hold_audio(self) -> bytes:
        return self._hold_audio

    @property
    def source(self) -> Path | None:
        return self._source

    def agent_payload(self) -> dict[str, Any] | str:
        if isinstance(self.agent, str):
            return self.agent
        return self.agent.model_dump(exclude_none=True)

    def prompt_length(self) -> int:
        if isinstance(self.agent, str):
            return 0
        thinks = self.agent.think if isinstance(self.agent.think, list) else [self.agent.think]
        return max((len(str(t.get("prompt", ""))) for t in thinks), default=0)


def load_profile(path: Path, variable: str = "AGENT_PROFILE") -> AgentProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{variable}: {path} is not valid {path.suffix[1:] or 'JSON'}: {exc}") from exc
    try:
        profile = AgentProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{variable} {path}: " + "; ".join(profile_problems(data, exc))) from exc
    if profile.prompt_length() > PROMPT_LIMIT:
        raise ConfigError(f"{variable} {path}: agent.think.prompt is over {PROMPT_LIMIT} characters")
    if profile.bridge.recording is not None and isinstance(profile.agent, str):
        raise ConfigError(
            f"{variable} {path}: bridge.recording needs the agent block inline: its greeting carries the announcement"
        )
    problem = function_problem(profile)
    if problem:
        raise ConfigError(f"{variable} {path}: {problem}")
    profile._hold_audio = load_hold_audio(profile.bridge.reconnect.hold_audio, path.parent)
    profile._source = path
    return profile


def declared_functions(profile: AgentProfile) -> dict[str, dict[str, Any]]:
    """The functions the profile declares in ``agent.think.functions`` (every think provider)."""
    if isinstance(profile.agent, str):
        return {}
    thinks = profile.agent.think if isinstance(profile.agent.think, list) else [profile.agent.think]
    found: dict[str, dict[str, Any]] = {}
    for think in thinks:
        for fn in think.get("functions", []) or []:
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                found[fn["name"]] = fn
    return found


def function_problem(profile: AgentProfile) -> str:
    """Built-in telephony functions and operator tools against what the agent declares."""
    declared = declared_functions(profile)
    telephony, tools = profile.bridge.telephony, profile.bridge.tools
    builtins = {END_CALL: telephony.end_call, TRANSFER_CALL: bool(telephony.transfer), SEND_DTMF: telephony.dtmf_out}
    for name, offered in builtins.items():
        if offered and name in declared:
            return (
                f"agent.think.functions declares {name}, which the bridge provides itself "
                f"(bridge.telephony); remove it from the profile's functions"
            )
        if name in tools:
            return f"bridge.tools.{name}: {name} is a built-in telephony function; give the tool another name"
    for name in tools:
        if isinstance(profile.agent, str):
            return f"bridge.tools.{name}: tools need the agent configured in the profile, not a stored agent id"
        if name not in declared:
            return (
                f"bridge.tools.{name} is not declared in agent.think.functions; declare it there "
                '(e.g. {"name": "%s", "description": "...", "parameters": {"type": "object", "properties": {}}}), '
                "without an endpoint" % name
            )
        if "endpoint" in declared[name]:
            return f"bridge.tools.{name} is declared with an endpoint, so Deepgram would call it; remove the endpoint"
    return ""


# What a valid value looks like, for each profile field an error can name.
PROFILE_EXAMPLES = {
    "": '{"agent": {"listen": ..., "think": ..., "speak": ...}, "bridge": {...}}',
    "agent": '{"listen": ..., "think": ..., "speak": ...} or the id of a stored agent configuration, "my-agent-id"',
    "agent.language": '"en"',
    "agent.listen": '{"provider": {"type": "deepgram", "model": "nova-3"}}',
    "agent.think": '{"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "prompt": "You are ..."}',
    "agent.speak": '{"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}}',
    "agent.greeting": '"Hello! How can I help you today?"',
    "bridge": '{"tags": ["callbridge"], "keepalive_after_seconds": 5}',
    "bridge.agent_audio": '{"input": {"encoding": "mulaw", "sample_rate": 8000}, "output": {...}}',
    "bridge.agent_audio.input": '{"encoding": "mulaw", "sample_rate": 8000}',
    "bridge.agent_audio.output": '{"encoding": "linear16", "sample_rate": 16000}',
    "bridge.agent_audio.input.encoding": '"mulaw"',
    "bridge.agent_audio.output.encoding": '"mulaw"',
    "bridge.agent_audio.input.sample_rate": "8000",
    "bridge.agent_audio.output.sample_rate": "8000",
    "bridge.tags": '["callbridge"]',
    "bridge.keepalive_after_seconds": "5",
    "bridge.agent_ready_timeout_seconds": "10",
    "bridge.max_prebuffer_seconds": "10",
    "bridge.telephony": '{"end_call": true, "transfer": {"sales": "+15551230001"}, "dtmf": true}',
    "bridge.telephony.end_call": "true",
    "bridge.telephony.transfer": '{"sales": "+15551230001", "support": "sip:support@pbx.example.com"}',
    "bridge.telephony.dtmf": "true",
    "bridge.telephony.silence_check_in_seconds": "15 (0 turns the check-in off)",
    "bridge.telephony.max_call_seconds": "3600",
    "bridge.telephony.media_timeout_seconds": "10 (0 turns the dead-stream watchdog off)",
    "bridge.fallback": '{"say": "Sorry, our assistant is unavailable right now.", "dial": "+15551230002"}',
    "bridge.fallback.dial": '"+15551230002" or "sip:desk@pbx.example.com"',
    "bridge.reconnect": '{"attempts": 3, "within_seconds": 10}',
    "bridge.tools": '{"lookup_order": {"url": "https://ops.example.com/tools/lookup_order", "timeout_seconds": 10}}',
}
PROFILE_FIELDS: dict[str, tuple[str, ...]] = {
    "": tuple(AgentProfile.model_fields),
    "bridge": tuple(BridgeOptions.model_fields),
    "bridge.agent_audio": tuple(AgentAudioModel.model_fields),
    "bridge.telephony": tuple(TelephonyModel.model_fields),
    "bridge.agent_audio.input": tuple(AudioFormatModel.model_fields),
    "bridge.agent_audio.output": tuple(AudioFormatModel.model_fields),
}


def profile_problems(data: Any, exc: ValidationError) -> list[str]:
    """pydantic's errors said in the profile's own terms: the field as written in the file
    (no model or union-member names), what is wrong with it, and a valid example."""
    by_path: dict[str, list[Any]] = {}
    for err in exc.errors():
        by_path.setdefault(_profile_path(data, err["loc"], err["type"]), []).append(err)
    problems = []
    for path, errors in by_path.items():
        # a union (agent: object or id; think: object or list) fails once per member: when the
        # value has the member's shape, only the errors inside it are worth saying
        if any(other.startswith((path + ".", path + "[")) or not path for other in by_path if other != path):
            continue
        problems.append(_say(path, errors))
    return problems


def _profile_path(data: Any, loc: tuple[int | str, ...], kind: str) -> str:
    """The dotted path of keys that exist in ``data`` (plus a missing or unknown last key)."""
    path = ""
    here = data
    for i, step in enumerate(loc):
        if isinstance(here, dict) and step in here:
            here = here[step]
            path += f".{step}" if path else str(step)
        elif isinstance(here, list) and isinstance(step, int) and 0 <= step < len(here):
            here = here[step]
            path += f"[{step}]"
        elif i == len(loc) - 1 and kind == "missing":
            path += f".{step}" if path else str(step)
        # anything else names a model or a union member, not a key of the file
    return path


def _say(path: str, errors: list[Any]) -> str:
    name = path or "the profile"
    example = PROFILE_EXAMPLES.get(re.sub(r"\[\d+\]", "", path))
    if any(e["type"] == "missing" for e in errors):
        problem = f"{name} is missing"
    elif any(e["type"] == "extra_forbidden" for e in errors):
        parent = path.rpartition(".")[0]
        known = PROFILE_FIELDS.get(parent, ())
        where = f"in {parent}" if parent else "at the top of the profile"
        problem = f"{name} is not a field known {where}" + (f" (known: {', '.join(known)})" if known else "")
        example = None
    elif len(errors) > 1 or errors[0]["type"] in ("model_type", "dict_type"):
        problem = f"{name} has the wrong type (found {_shown(errors[0].get('input'))})"
    else:
        message = str(errors[0]["msg"]).removeprefix("Value error, ")
        message = message.replace("Input should be", "should be").replace("less than or equal to", "at most")
        message = message.replace("greater than or equal to", "at least")
        problem = f"{name} {message[:1].lower() + message[1:]} (found {_shown(errors[0].get('input'))})"
    return problem + (f", e.g. {example}" if example else "")


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    text = json.dumps(value) if isinstance(value, str | int | float | bool) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


# --- the resolved configuration the service runs with -----------------------------------


@dataclass(frozen=True)
class RuntimeConfig:
    settings: Settings
    profile: AgentProfile
    use_local_agent: bool
    agent_url: str | None  # None until the local agent has a port
    twilio_auth_token: str | None
    stream_token_secret: bytes
    warnings: tuple[str, ...]
    profiles: Mapping[str, AgentProfile] = field(default_factory=dict)  # dialled number -> its profile
    generated_operator_token: str | None = None
    """Offline quickstart on loopback only: a token made up for this run, so the console works at once."""
    offline_dialer: tuple[str, str, str] | None = None
    """Offline quickstart on loopback only: (REST base URL, account SID, public URL) of the Twilio
    REST stand-in ``serve`` started, which places calls to simulated callees (``callbridge call``).
    Only calls placed use it; the calls answered behave as without credentials."""

    @property
    def outbound_from(self) -> str | None:
        """Caller id of calls placed without ``from``: OUTBOUND_FROM; offline, the simulated number."""
        if self.settings.outbound_from is None and self.offline_dialer is not None:
            return OFFLINE_OUTBOUND_FROM
        return self.settings.outbound_from

    @property
    def operator_token(self) -> str | None:
        token = self.settings.operator_token
        return token.get_secret_value() if token is not None else self.generated_operator_token

    def profile_for_number(self, number: str) -> str:
        """The profile name for a dialled number: the number itself when it has one, else ""."""
        return number if number in self.profiles else ""

    @property
    def deepgram_api_key(self) -> str | None:
        key = self.settings.deepgram_api_key
        return key.get_secret_value() if key else None

    @property
    def webhook_signing_secret(self) -> bytes | None:
        secret = self.settings.webhook_signing_secret
        return secret.get_secret_value().encode() if secret else None

    def secrets(self) -> list[str]:
        signing = self.webhook_signing_secret
        redis_password = urlsplit(self.settings.redis_url).password if self.settings.redis_url else None
        values = [
            redis_password,
            self.deepgram_api_key,
            self.twilio_auth_token,
            self.stream_token_secret.decode(),
            signing.decode() if signing else None,
            self.operator_token,
        ]
        return [v for v in values if v]

    def call_options(self, profile_name: str = "") -> CallOptions:
        """The options of a call to ``profile_name``'s number ("" for the default profile)."""
        profile = self.profile_named(profile_name)
        bridge = profile.bridge
        return CallOptions(
            agent=self.announced(profile),
            agent_input=bridge.agent_audio.input.to_format(),
            agent_output=bridge.agent_audio.output.to_format(),
            tags=tuple(bridge.tags),
            keepalive_after=bridge.keepalive_after_seconds,
            agent_ready_timeout=bridge.agent_ready_timeout_seconds,
            max_prebuffer_seconds=bridge.max_prebuffer_seconds,
            log_transcripts=self.settings.log_transcripts,
            console_transcripts=self.settings.log_transcripts or self.settings.console_transcripts,
            start_timeout=self.settings.stream_start_timeout_seconds,
            # what the posted call record carries is all that is kept for it
            record_utterances=self.settings.call_events_url is not None,
            record_transcript=self.settings.call_events_url is not None and self.settings.call_events_transcript,
            telephony=self.telephony(profile),
            fallback_twiml=self.fallback_twiml(profile_name),
            reconnect_attempts=bridge.reconnect.attempts,
            reconnect_within=bridge.reconnect.within_seconds,
            recording=self.recording(profile),
            hold_audio=profile.hold_audio,
            hold_after=bridge.reconnect.hold_after_seconds,
        )

    def profile_named(self, name: str) -> AgentProfile:
        return self.profiles[name] if name else self.profile

    def profiles_loaded(self) -> str:
        """Which profile answers which number, in one sentence for the operator at start-up."""
        default = self.profile.source or DEFAULT_PROFILE
        fallback = f"the built-in default ({default})" if default == DEFAULT_PROFILE else str(default)
        if not self.profiles:
            return f"profile for every number: {fallback}"
        numbers = [name for name in self.profiles if E164.fullmatch(name)]
        named = [name for name in self.profiles if not E164.fullmatch(name)]
        parts = ([f"{', '.join(numbers)} (calls to these numbers)"] if numbers else []) + (
            [f"{', '.join(named)} (calls placed that name it)"] if named else []
        )
        return f"profiles from {self.settings.agent_profiles_dir}: {'; '.join(parts)}; every other number: {fallback}"

    def outbound_voicemail(self, name: str) -> str:
        """The profile's voicemail message, placeholders unfilled ("": none)."""
        return self.profile_named(name).bridge.outbound.voicemail or ""

    def outbound_call_options(self, name: str, variables: dict[str, str], voicemail: str, amd: bool) -> CallOptions:
        """A placed call's options: the profile's, with its placeholders filled from
        ``variables`` (checked complete by the API), and how to meet whoever answers.
        ``voicemail`` is filled already (the API did it, once)."""
        options = self.call_options(name)
        amd_timeout = self.profile_named(name).bridge.outbound.amd_timeout_seconds
        return replace(
            options,
            agent=filled_agent(options.agent, variables),
            outbound=OutboundSpec(voicemail=voicemail, amd=amd, amd_timeout=amd_timeout),
        )

    @staticmethod
    def announced(profile: AgentProfile) -> dict[str, Any] | str:
        """The agent payload, with the recording announcement leading the greeting: the caller
        hears it first, and its playing through (or being cut short) is known from its mark."""
        agent, recording = profile.agent_payload(), profile.bridge.recording
        if recording is None or isinstance(agent, str):
            return agent
        greeting = agent.get("greeting")
        return {**agent, "greeting": " ".join(filter(None, (recording.spoken_announcement(), greeting)))}

    def recording(self, profile: AgentProfile) -> RecordingSpec | None:
        recording = profile.bridge.recording
        if recording is None:
            return None
        public = self.settings.public_url
        return RecordingSpec(
            consent=recording.consent,
            consent_key=recording.consent_key,
            consent_words=tuple(recording.consent_words),
            consent_window=recording.consent_window_seconds,
            status_callback_url=public.rstrip("/") + RECORDING_STATUS_PATH if public else "",
        )

    def fallback(self, profile_name: str = "") -> Fallback:
        """The fallback of ``profile_name``'s number ("" for the default profile)."""
        fallback = self.profile_named(profile_name).bridge.fallback
        return Fallback(fallback.say, fallback.dial)

    def fallback_twiml(self, profile_name: str = "") -> str:
        fallback = self.fallback(profile_name)
        return fallback_twiml(fallback.say, fallback.dial)

    @property
    def rest_available(self) -> bool:
        """Twilio REST credentials for hang-ups and transfers (not the offline token)."""
        return bool(self.settings.twilio_account_sid and self.settings.twilio_auth_token)

    def telephony(self, profile: AgentProfile) -> Telephony:
        telephony, tools = profile.bridge.telephony, profile.bridge.tools
        messages = {
            key: value
            for key in ("check_in_message", "silence_goodbye_message", "time_limit_message", "hold_message")
            if (value := getattr(telephony, key)) is not None
        }
        return Telephony(
            end_call=telephony.end_call,
            transfer=tuple(telephony.transfer.items()),
            dtmf=telephony.dtmf,
            silence_check_in=telephony.silence_check_in_seconds,
            max_call=telephony.max_call_seconds,
            media_timeout=telephony.media_timeout_seconds,
            dtmf_out=telephony.dtmf_out,
            tools=tuple(ToolSpec(name, tool.url, tool.timeout_seconds) for name, tool in tools.items()),
            rest_available=self.rest_available,
            **messages,
        )


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError("invalid environment: " + _describe_env(exc)) from exc


ENVIRONMENT_ONLY = frozenset({"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "WS_PROXY", "WSS_PROXY"})
"""Read by the HTTP and WebSocket libraries from the environment itself, never from .env
(docker compose's ``env_file`` does make them the container's environment)."""
OTHER_TOOLS = ("COMPOSE_", "DOCKER_")
"""Prefixes of what docker compose reads from .env for itself (COMPOSE_PROFILES, COMPOSE_PROJECT_NAME...)."""
DEPLOY_KEYS = frozenset({"DOMAIN"})
"""Keys our deploy files read from the same .env (deploy/vm: Caddy's site name)."""
CLOSE_MATCH = 0.75
"""difflib's ratio from which a setting is offered as what an unknown key meant (MAX_CALL: MAX_CALLS)."""


def env_file_warnings(path: Path = ENV_FILE) -> list[str]:
    """One sentence per key of the .env file that callbridge does not read there: not a setting
    (pydantic-settings ignores it silently; the setting it is closest to is suggested), or a
    variable only the environment gives. The environment itself is not checked: it holds
    everything else the machine runs with."""
    try:
        keys = list(dotenv_values(path, encoding="utf-8")) if path.is_file() else []
    except (OSError, UnicodeDecodeError):
        return []  # unreadable: load_settings says so
    known = sorted(name.upper() for name in Settings.model_fields)
    warnings = []
    for key in keys:
        name = key.upper()
        if name in known or name in DEPLOY_KEYS or name.startswith(OTHER_TOOLS):
            continue
        if name in ENVIRONMENT_ONLY:
            warnings.append(
                f"{path}: {key} is read from the environment only, not from this file: export it "
                "(docker compose passes it on)"
            )
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=CLOSE_MATCH)
        warnings.append(f"{path}: unknown key {key} ignored" + (f" (did you mean {close[0]}?)" if close else ""))
    return warnings


def _describe_env(exc: ValidationError) -> str:
    return "; ".join(
        f"{str(err['loc'][0]).upper()}: {str(err['msg']).removeprefix('Value error, ')}" for err in exc.errors()
    )


def resolve(settings: Settings) -> RuntimeConfig:
    warnings: list[str] = []
    key = settings.deepgram_api_key.get_secret_value() if settings.deepgram_api_key else ""
    use_local = not key and not settings.agent_url
    if use_local and settings.require_deepgram:
        raise ConfigError(
            "REQUIRE_DEEPGRAM is set but neither DEEPGRAM_API_KEY nor AGENT_URL is: "
            "refusing to start with the local agent"
        )
    agent_url = None if use_local else (settings.agent_url or DEFAULT_AGENT_URL)
    if not use_local and not key:
        warnings.append("AGENT_URL is set without DEEPGRAM_API_KEY: connecting without credentials")

    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    if token is None and settings.twilio_validate_signature:
        if not use_local:
            raise ConfigError(
                "TWILIO_AUTH_TOKEN is required to validate Twilio's webhook signatures when AGENT_URL or "
                "DEEPGRAM_API_KEY is set (or set TWILIO_VALIDATE_SIGNATURE=false, which is unsafe). "
                "Testing with `callbridge emulate-agent`? Any value will do, e.g. TWILIO_AUTH_TOKEN=dev-token, "
                "and give `callbridge simulate-call` the same one"
            )
        token = OFFLINE_TWILIO_AUTH_TOKEN
        warnings.append("no TWILIO_AUTH_TOKEN: using the offline development token (local agent mode only)")

    if settings.stream_token_secret is not None:
        secret = settings.stream_token_secret.get_secret_value().encode()
    elif settings.redis_url:
        # REDIS_URL means replicas: each would make up its own secret and refuse the others'
        # tokens (calls lost as bad_token), so an unset or empty secret stops start-up here
        raise ConfigError(
            "STREAM_TOKEN_SECRET is required with REDIS_URL (several replicas): set the same value, "
            "16+ characters, on every replica"
        )
    else:
        secret = secrets.token_urlsafe(32).encode()
        warnings.append(
            "STREAM_TOKEN_SECRET not set: generated one for this process; "
            "multi-replica deployments must set the same secret on every replica"
        )
    if settings.call_events_url and settings.webhook_signing_secret is None:
        warnings.append("CALL_EVENTS_URL is set without WEBHOOK_SIGNING_SECRET: call records are sent unsigned")
    if settings.public_url and not settings.public_url.startswith("https://") and not use_local:
        warnings.append("PUBLIC_URL is not https: Twilio requires https webhooks and wss streams")

    profile = load_profile(settings.agent_profile or DEFAULT_PROFILE)
    profiles = load_number_profiles(settings.agent_profiles_dir) if settings.agent_profiles_dir else {}
    rest = bool(settings.twilio_account_sid and settings.twilio_auth_token)
    if profile.bridge.telephony.transfer and not rest:
        warnings.append("bridge.telephony.transfer is set but transfer_call is not offered: needs TWILIO_ACCOUNT_SID")
    if isinstance(profile.agent, str) and (profile.bridge.telephony.end_call or profile.bridge.telephony.transfer):
        warnings.append("the agent is a stored configuration id: end_call and transfer_call cannot be added to it")
    if profile.bridge.tools and settings.webhook_signing_secret is None:
        warnings.append("bridge.tools is set without WEBHOOK_SIGNING_SECRET: tool requests are sent unsigned")
    recorded = [p for p in (profile, *profiles.values()) if p.bridge.recording is not None]
    if recorded and not rest:
        warnings.append("bridge.recording is set but calls cannot be recorded: needs TWILIO_ACCOUNT_SID")
    if recorded and not settings.public_url:
        warnings.append("bridge.recording is set without PUBLIC_URL: Twilio gets no recording status callback")
    generated = None
    if settings.operator_token is None and use_local and settings.host in LOOPBACK_HOSTS:
        generated = secrets.token_urlsafe(24)  # the offline quickstart's console: this run only
    return RuntimeConfig(
        settings=settings,
        profile=profile,
        use_local_agent=use_local,
        agent_url=agent_url,
        twilio_auth_token=token,
        stream_token_secret=secret,
        warnings=tuple(warnings),
        profiles=profiles,
        generated_operator_token=generated,
    )


PROFILE_SUFFIXES = (".json", ".yaml", ".yml")
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""A profile file named so is not any number's: outbound calls name it (``"profile"``)."""


def load_number_profiles(directory: Path) -> dict[str, AgentProfile]:
    """``AGENT_PROFILES_DIR``: one profile per dialled number, in a file named by the number in
    E.164 (``+15551230001.yaml``). Every file is checked now, not at the first call."""
    if not directory.is_dir():
        raise ConfigError(f"AGENT_PROFILES_DIR: {directory} is not a directory")
    profiles: dict[str, AgentProfile] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in PROFILE_SUFFIXES or path.name.startswith("."):
            continue
        number = path.stem
        if not E164.fullmatch(number) and not PROFILE_NAME.fullmatch(number):
            raise ConfigError(
                f"AGENT_PROFILES_DIR: {path.name} must be named by the number it answers in E.164, "
                "e.g. +15551230001.yaml, or by a name for calls placed with it (letters, digits, - and _), "
                "e.g. reminders.yaml"
            )
        if number in profiles:
            raise ConfigError(f"AGENT_PROFILES_DIR: two profiles for {number}")
        profiles[number] = load_profile(path, "AGENT_PROFILES_DIR")
    if not profiles:
        raise ConfigError(f"AGENT_PROFILES_DIR: {directory} holds no profile (+15551230001.json or .yaml)")
    return profiles
