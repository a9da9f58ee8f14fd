"""The ``callbridge`` command: serve, emulate-agent, simulate-call."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

from app.config import OFFLINE_TWILIO_AUTH_TOKEN, ConfigError, load_settings, resolve
from app.observability import logging as logs


def cmd_serve(args: argparse.Namespace) -> int:
    from app.serving import serve

    try:
        settings = load_settings()
        config = resolve(settings)
    except ConfigError as exc:
        print(f"callbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    logs.register_secrets(config.secrets())
    serve(config, args.host or settings.host, args.port or settings.port)
    return 0


def cmd_emulate_agent(args: argparse.Namespace) -> int:
    from app.devtools.local_agent import LocalAgent, LocalAgentConfig, ScriptStep

    logs.configure(args.log_level)
    script = []
    if args.script:
        script = [ScriptStep.from_dict(step) for step in json.loads(Path(args.script).read_text())]
    config = LocalAgentConfig(
        require_key=args.require_key, speak_rate=args.speak_rate, idle_timeout=args.idle_timeout, script=script
    )

    async def main() -> None:
        agent = LocalAgent(config)
        port = await agent.start(args.host, args.port)
        logs.get_logger(component="local_agent").info(
            "local_agent_listening", url=f"ws://{args.host}:{port}/v1/agent/converse"
        )
        try:
            await asyncio.Event().wait()
        finally:
            await agent.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def default_caller_audio() -> bytes:
    """Two spoken-like phrases with pauses, when no WAV is given."""
    from app.codecs import TWILIO_FORMAT
    from app.devtools import synth

    pcm = (
        synth.silence(2.5)
        + synth.speech_like("hello I would like to check on my order please")
        + synth.silence(3.0)
        + synth.speech_like("thank you very much")
    )
    return synth.encode(pcm, TWILIO_FORMAT)


def cmd_simulate_call(args: argparse.Namespace) -> int:
    from app.devtools.simulated_caller import SimulatedCaller, SimulationError
    from app.devtools.wavio import load_caller_audio, write_mulaw_as_wav

    try:
        audio = load_caller_audio(Path(args.wav)) if args.wav else default_caller_audio()
    except (OSError, ValueError) as exc:
        print(f"callbridge: {exc}", file=sys.stderr)
        return 2
    token = args.auth_token or os.environ.get("TWILIO_AUTH_TOKEN") or OFFLINE_TWILIO_AUTH_TOKEN
    url = args.url or f"http://127.0.0.1:{os.environ.get('PORT', '8080')}"
    caller = SimulatedCaller(url, token, fast=args.fast, tail=args.tail)
    print(
        f"calling {url}/twilio/voice as {caller.caller} (CallSid {caller.call_sid}), "
        f"{len(audio) / 8000:.1f} s of caller audio{' (fast)' if args.fast else ''}"
    )
    try:
        result = asyncio.run(caller.run(audio))
    except (SimulationError, OSError) as exc:
        print(f"callbridge: call failed: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    write_mulaw_as_wav(out, bytes(result.heard))
    print(result.transcript())
    print(
        f"heard {len(result.heard) / 8000:.2f} s (agent audio received {len(result.received) / 8000:.2f} s, "
        f"{result.bytes_dropped_by_clear / 8000:.2f} s dropped by {len(result.clears)} clear(s)); "
        f"marks played {len(result.marks_played)}, cleared {len(result.marks_cleared)}; "
        f"stream closed with code {result.close_code}; wrote {out}"
    )
    if result.violations:
        print("protocol violations:\n  " + "\n  ".join(result.violations), file=sys.stderr)
        return 1
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from app.devtools import loadtest

    report = loadtest.run(args.calls, args.seconds, args.ramp, args.url, args.auth_token)
    print(report.render())
    return 1 if report.failures or any(r.violations for r in report.results) else 0


def cmd_twilio(args: argparse.Namespace) -> int:
    from app.twilio import rest

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"callbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    try:
        client = rest.make_client(settings.twilio_account_sid, token, settings.twilio_api_base)
    except rest.SetupError as exc:
        client = None
        if args.twilio_command == "configure-number":
            print(f"callbridge: {exc}", file=sys.stderr)
            return 2
    if args.twilio_command == "configure-number":
        assert client is not None
        try:
            sid, changes = rest.configure_number(
                client,
                args.number,
                settings.public_url,
                dry_run=args.dry_run,
                status_callback=not args.no_status_callback,
            )
        except rest.SetupError as exc:
            print(f"callbridge: {exc}", file=sys.stderr)
            return 1
        if not changes:
            print(f"{args.number} ({sid}) already points at {settings.public_url}: nothing to change")
            return 0
        verb = "would change" if args.dry_run else "changed"
        print(f"{args.number} ({sid}) {verb}:")
        for change in changes:
            print(f"  {change.field}: {change.current or '(empty)'} -> {change.desired}")
        return 0
    checks = rest.check_setup(client, settings.twilio_account_sid, settings.public_url, args.number)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    return 0 if all(c.ok for c in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbridge", description="A Twilio phone number to Deepgram Voice Agent bridge."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the bridge (configuration from the environment / .env)")
    serve.add_argument("--host", help="override HOST")
    serve.add_argument("--port", type=int, help="override PORT")
    serve.set_defaults(func=cmd_serve)

    agent = sub.add_parser("emulate-agent", help="run a local server speaking the Deepgram Voice Agent protocol")
    agent.add_argument("--host", default="127.0.0.1")
    agent.add_argument("--port", type=int, default=8765)
    agent.add_argument("--require-key", help="answer 401 unless 'Authorization: Token KEY' is sent")
    agent.add_argument("--speak-rate", type=float, default=4.0, help="reply audio speed vs real time")
    agent.add_argument("--idle-timeout", type=float, default=10.0)
    agent.add_argument("--script", help="JSON file: a list of scripted steps (see README)")
    agent.add_argument("--log-level", default="info")
    agent.set_defaults(func=cmd_emulate_agent)

    sim = sub.add_parser("simulate-call", help="play Twilio: call the bridge with a WAV file")
    sim.add_argument("--url", help="bridge base URL (default http://127.0.0.1:$PORT)")
    sim.add_argument("--wav", help="caller audio: 16-bit PCM WAV, or raw mu-law with a .ulaw suffix")
    sim.add_argument("--out", default="heard.wav", help="where to write what the caller heard")
    sim.add_argument("--fast", action="store_true", help="send caller audio as fast as possible")
    sim.add_argument("--tail", type=float, default=3.0, help="seconds to stay on the line after the audio")
    sim.add_argument("--auth-token", help="Twilio auth token to sign with (default TWILIO_AUTH_TOKEN)")
    sim.set_defaults(func=cmd_simulate_call)

    load = sub.add_parser("loadtest", help="benchmark: concurrent simulated calls; prints latency, CPU, memory")
    load.add_argument("--calls", type=int, default=20, help="concurrent calls")
    load.add_argument("--seconds", type=float, default=20.0, help="caller audio per call")
    load.add_argument("--ramp", type=float, default=2.0, help="seconds over which calls start")
    load.add_argument("--url", help="test an already running bridge instead of starting one (no CPU/RSS)")
    load.add_argument("--auth-token", help="with --url: the bridge's TWILIO_AUTH_TOKEN")
    load.set_defaults(func=cmd_loadtest)

    twilio = sub.add_parser(
        "twilio", help="Twilio number setup (uses TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, PUBLIC_URL)"
    )
    twilio_sub = twilio.add_subparsers(dest="twilio_command", required=True)
    configure = twilio_sub.add_parser("configure-number", help="point a number's voice webhook at PUBLIC_URL")
    configure.add_argument("number", help="E.164, e.g. +15551234567")
    configure.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    configure.add_argument("--no-status-callback", action="store_true", help="leave the status callback alone")
    configure.set_defaults(func=cmd_twilio)
    check = twilio_sub.add_parser("check", help="verify credentials and that PUBLIC_URL is https and reachable")
    check.add_argument("--number", help="also check that this number points at the bridge")
    check.set_defaults(func=cmd_twilio)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
