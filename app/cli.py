"""The ``callbridge`` command: serve, emulate-agent, simulate-call."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import LOOPBACK_HOSTS, ConfigError, RuntimeConfig, env_file_warnings, load_settings, resolve
from app.observability import logging as logs

if TYPE_CHECKING:
    from app.devtools.loadtest import MetricsSnapshot


def cmd_serve(args: argparse.Namespace) -> int:
    from app.serving import EXIT_CANNOT_LISTEN, CannotListen, claim_address
    from app.workers import default_workers

    env_file_problems = warn_about_env_file()
    try:
        settings = load_settings()
        config = resolve(settings)
    except ConfigError as exc:
        print(f"callbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    logs.register_secrets(config.secrets())
    log = logs.get_logger(component="server")
    if env_file_problems:
        log.warning("env_file_keys_ignored", detail=env_file_problems)
    host, port = args.host or settings.host, args.port or settings.port
    # the offline quickstart stays one process: one stream of logs, one local agent
    count = args.workers or settings.workers or (1 if config.use_local_agent else default_workers())
    try:
        claim = claim_address(host, port, workers=count > 1)
    except CannotListen as exc:
        log.error("cannot_listen", host=host, port=port, detail=str(exc))
        print(f"callbridge: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    try:
        return run_serve(config, host, port, count)
    finally:
        claim.close()


def warn_about_env_file() -> list[str]:
    """Say which keys of .env callbridge does not read (a misspelled setting is otherwise
    silently ignored), one line each; the sentences, for the log."""
    problems = env_file_warnings()
    for problem in problems:
        print(f"callbridge: {problem}", file=sys.stderr)
    return problems


def run_serve(config: RuntimeConfig, host: str, port: int, count: int) -> int:
    """``serve`` once its address is claimed: the start-up lines, then one process or a supervisor."""
    from app.serving import prepare_multiproc_dir, serve, supervise
    from app.workers import ENV_MULTIPROC_DIR

    if config.generated_operator_token and host in LOOPBACK_HOSTS:
        os.environ["OPERATOR_TOKEN"] = config.generated_operator_token  # workers, if any, share it
        print(
            f"callbridge: console at http://{host}:{port}/console  operator token (this run only): "
            f"{config.generated_operator_token}",
            file=sys.stderr,
        )
    elif config.generated_operator_token:  # --host took it off loopback: no made-up token there
        config = dataclasses.replace(config, generated_operator_token=None)
    if config.generated_operator_token and not config.rest_available:
        config = offline_dialer(config, host, port)
    say_profiles(config)
    if count > 1:
        return supervise(config, host, port, count)
    if os.environ.get(ENV_MULTIPROC_DIR):  # set in the image: one process still reads its metrics there
        prepare_multiproc_dir(os.environ[ENV_MULTIPROC_DIR])
    return serve(config, host, port)


def say_profiles(config: RuntimeConfig) -> None:
    """Which profile answers which number: in the log always, and on stderr when the operator
    chose profiles (AGENT_PROFILE, AGENT_PROFILES_DIR), so that a per-number profile's being
    loaded or not is seen at start-up rather than at the first call."""
    logs.get_logger(component="server").info(
        "profiles_loaded",
        default=str(config.profile.source),
        numbers=sorted(config.profiles),
        directory=str(config.settings.agent_profiles_dir) if config.settings.agent_profiles_dir else None,
    )
    if config.settings.agent_profile or config.settings.agent_profiles_dir:
        print(f"callbridge: {config.profiles_loaded()}", file=sys.stderr)


def cmd_call(args: argparse.Namespace) -> int:
    """POST /api/calls on a running bridge, and say what it answered."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    from app.twilio.rest import failure_words

    token = os.environ.get("OPERATOR_TOKEN", "")
    if not token:
        print("callbridge: set OPERATOR_TOKEN to the bridge's (serve prints it offline)", file=sys.stderr)
        return 2
    variables: dict[str, str] = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"callbridge: --var {item!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        variables[name] = value
    body: dict[str, object] = {"to": args.to, "variables": variables, "amd": not args.no_amd}
    for key, value in (("from", args.from_), ("profile", args.profile), ("voicemail", args.voicemail)):
        if value is not None:
            body[key] = value
    url = (args.url or f"http://127.0.0.1:{os.environ.get('PORT', '8080')}").rstrip("/") + "/api/calls"
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read() or b"{}")
            print(f"callbridge: calling {args.to}: {answer.get('call_sid', '?')} ({answer.get('status', '?')})")
            return 0
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        print(f"callbridge: the bridge refused the call (HTTP {exc.code}): {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        why = failure_words(exc, urlsplit(url).hostname or "", timeout=30)
        print(f"callbridge: nothing answers at {url} ({why}): is `callbridge serve` running?", file=sys.stderr)
        return 1


def offline_dialer(config: RuntimeConfig, host: str, port: int) -> RuntimeConfig:
    """The offline quickstart can place calls too: a Twilio REST stand-in in this process dials
    simulated callees (a person, a voicemail box, a phone menu... by number: app.devtools.callees)
    and calls the bridge back on loopback, signed with the offline token, as Twilio would."""
    from app.devtools.twilio_api import TwilioApiStandIn

    stand_in = TwilioApiStandIn(auth_token=config.twilio_auth_token or "").start()
    print(
        f"callbridge: outbound calls go to simulated callees offline (`callbridge call +15550100001`; "
        f"numbers in app/devtools/callees.py), through a Twilio stand-in at {stand_in.base_url}",
        file=sys.stderr,
    )
    return dataclasses.replace(
        config, offline_dialer=(stand_in.base_url, stand_in.account_sid, f"http://{host}:{port}")
    )


def worker_count(text: str) -> int:
    """argparse type of --workers: 1..MAX_WORKERS."""
    from app.workers import MAX_WORKERS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}")
    return value


def cmd_emulate_agent(args: argparse.Namespace) -> int:
    from app.devtools.local_agent import LocalAgent, LocalAgentConfig, ScriptStep

    logs.configure(args.log_level)
    script = []
    if args.script:
        try:
            steps = json.loads(Path(args.script).read_text())
            if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
                raise ValueError("the script must be a JSON list of objects")
            script = [ScriptStep.from_dict(step) for step in steps]
        except (OSError, ValueError, TypeError) as exc:
            print(f"callbridge: --script {args.script}: {exc}", file=sys.stderr)
            return 2
    config = LocalAgentConfig(
        require_key=args.require_key,
        speak_rate=args.speak_rate,
        idle_timeout=args.idle_timeout,
        script=script,
        function_reply=args.function_reply,
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


SIMULATED_CALLER = "+15550000001"
SIMULATED_CALLEE = "+15550000002"  # app.config.OFFLINE_OUTBOUND_FROM: offline, calls are placed from it


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


@dataclass(frozen=True)
class BridgeSide:
    """Where `serve` on this machine listens and what PUBLIC_URL it has (environment and .env)."""

    port: int
    public_url: str | None
    account_sid: str | None = None

    @classmethod
    def read(cls) -> BridgeSide:
        try:
            settings = load_settings()
        except ConfigError:  # serve would refuse to start; the caller can still try --url
            return cls(8080, None)
        return cls(settings.port, settings.public_url, settings.twilio_account_sid)


def writable_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written, checked before a whole call is spent producing it."""
    parent = path.parent
    if path.is_dir():
        return f"{path} is a directory"
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{path} is not writable"
    return None


def webhook_refusal_hint(url: str, token_source: str, public_url: str | None) -> str:
    """The likely causes of a 403 on the webhook, which the bridge logs but does not send back."""
    hint = (
        f"the bridge refused the webhook signature (HTTP 403). The simulator signed {url}/twilio/voice "
        f"with {token_source}. Likely causes: the bridge runs with another TWILIO_AUTH_TOKEN (pass the same "
        "one with --auth-token), or the bridge has PUBLIC_URL set, so it checks signatures against "
        "PUBLIC_URL/twilio/voice instead of the URL called (use --url with that PUBLIC_URL, or unset "
        "PUBLIC_URL for local tests)"
    )
    if public_url and public_url != url:
        hint += f"; PUBLIC_URL here is {public_url}"
    return hint


def key_presses(spec: str) -> tuple[float, str]:
    """argparse type of --press: SECONDS:DIGITS."""
    from app.devtools.simulated_caller import parse_keys

    try:
        return parse_keys(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bridge_metrics(url: str) -> MetricsSnapshot | None:
    """The bridge's /metrics now, or None if it cannot be read (another host, a proxy)."""
    from app.devtools.loadtest import scrape

    try:
        return scrape(url)
    except (OSError, ValueError):
        return None


def bridge_said(url: str, before: MetricsSnapshot | None) -> str:
    """What the bridge counted during the call (its outcome, the functions it answered, its
    REST updates), from /metrics, since the caller cannot see the agent's side."""
    from app.devtools.loadtest import scrape_settled

    if before is None:
        return "bridge counted: nothing (its /metrics is not readable)"
    try:
        change = scrape_settled(url, before, calls=1).minus(before)
    except (OSError, ValueError):
        return "bridge counted: nothing (its /metrics is not readable)"
    parts = []
    for name, what in (
        ("callbridge_calls_total", "call outcome"),
        ("callbridge_function_calls_total", "functions answered"),
        ("callbridge_call_updates_total", "Twilio REST updates"),
    ):
        counts = change.by_label(name, "outcome" if name == "callbridge_calls_total" else "result")
        if counts:
            parts.append(what + " " + ", ".join(f"{label} {int(n)}" for label, n in sorted(counts.items())))
    return "bridge counted: " + ("; ".join(parts) if parts else "nothing")


def cmd_simulate_call(args: argparse.Namespace) -> int:
    from app.audio_files import load_audio_file as load_caller_audio
    from app.devtools.loadtest import signing_token
    from app.devtools.simulated_caller import BridgeUnreachable, NotConnected, SimulatedCaller, SimulationError
    from app.devtools.twilio_api import DEFAULT_ACCOUNT_SID, TwilioApiStandIn
    from app.devtools.wavio import write_mulaw_as_wav

    out = Path(args.out)
    problem = writable_file_problem(out)
    if problem:
        print(f"callbridge: cannot write --out {out}: {problem}", file=sys.stderr)
        return 2
    try:
        audio = load_caller_audio(Path(args.wav)) if args.wav else default_caller_audio()
    except (OSError, ValueError) as exc:
        print(f"callbridge: {exc}", file=sys.stderr)
        return 2
    bridge = BridgeSide.read()
    token, token_source = signing_token(args.auth_token)
    url = (args.url or f"http://127.0.0.1:{bridge.port}").rstrip("/")
    api: TwilioApiStandIn | None = None
    if args.twilio_api_port is not None:
        account_sid = args.account_sid or bridge.account_sid or DEFAULT_ACCOUNT_SID
        try:
            api = TwilioApiStandIn(account_sid, token, port=args.twilio_api_port).start()
        except OSError as exc:
            print(
                f"callbridge: cannot serve the Twilio API stand-in on port {args.twilio_api_port}: {exc}",
                file=sys.stderr,
            )
            return 2
        print(
            f"Twilio REST API stand-in at {api.base_url} (the bridge needs TWILIO_API_BASE={api.base_url} "
            f"TWILIO_ACCOUNT_SID={account_sid} and the same TWILIO_AUTH_TOKEN)"
        )
    caller = SimulatedCaller(
        url,
        token,
        caller=args.from_,
        callee=args.to,
        fast=args.fast,
        tail=args.tail,
        keys=args.press or (),
        key_gap=args.key_gap,
        twilio_api=api,
        await_agent=True,  # a call without agent audio fails: give a slow agent its time first
    )
    before = bridge_metrics(url)
    print(
        f"calling {url}/twilio/voice from {caller.caller} to {caller.callee} (CallSid {caller.call_sid}), "
        f"{len(audio) / 8000:.1f} s of caller audio{' (fast)' if args.fast else ''}"
    )
    try:
        result = asyncio.run(caller.run(audio))
    except BridgeUnreachable as exc:
        print(f"callbridge: {exc}: is `callbridge serve` running?", file=sys.stderr)
        return 1
    except NotConnected as exc:
        print(
            "callbridge: call not connected: the bridge answered TwiML without a media stream (its fallback "
            f"when it is at MAX_CALLS or stopping; its log says why): {' '.join(exc.twiml.split())}",
            file=sys.stderr,
        )
        return 1
    except (SimulationError, OSError) as exc:
        if isinstance(exc, SimulationError) and "HTTP 403" in str(exc):
            print(
                f"callbridge: call failed: {webhook_refusal_hint(url, token_source, bridge.public_url)}",
                file=sys.stderr,
            )
        else:
            print(f"callbridge: call failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if api is not None:
            api.stop()
    write_mulaw_as_wav(out, bytes(result.heard))
    print(result.transcript())
    for request in result.rest_requests:
        parts = [request.method, request.path, *(f"{k}={v}" for k, v in request.form.items())]
        print(f"twilio REST: {' '.join(parts)} -> {request.status}")
    print(bridge_said(url, before))
    print(
        f"heard {len(result.heard) / 8000:.2f} s (agent audio received {len(result.received) / 8000:.2f} s, "
        f"{result.bytes_dropped_by_clear / 8000:.2f} s dropped by {len(result.clears)} clear(s)); "
        f"marks played {len(result.marks_played)}, cleared {len(result.marks_cleared)}; "
        f"stream closed with code {result.close_code}; wrote {out}"
    )
    failed = result.failure()
    if failed:
        print(f"callbridge: call failed: {failed}", file=sys.stderr)
    if result.violations:
        print("protocol violations:\n  " + "\n  ".join(result.violations), file=sys.stderr)
    return 1 if failed or result.violations else 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from app.devtools import loadtest

    if args.url and (args.floor or args.workers is not None or args.rounds != 1):
        print("callbridge: --floor, --workers and --rounds start their own servers: not with --url", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.calls < 1:
        print("callbridge: --rounds and --calls must be at least 1", file=sys.stderr)
        return 2
    if args.watch and (args.url or not 0 < args.watch <= args.calls):
        print("callbridge: --watch needs a bridge the load test starts, and at most --calls calls", file=sys.stderr)
        return 2
    try:
        report = loadtest.run(
            args.calls,
            args.seconds,
            args.ramp,
            args.url,
            args.auth_token,
            floor=args.floor,
            workers=args.workers,
            rounds=args.rounds,
            watch=args.watch,
        )
    except RuntimeError as exc:  # a server or the agent did not start: what it said is in the message
        print(f"callbridge: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    return 1 if report.failures or any(r.violations for r in report.results) else 0


def cmd_memory(args: argparse.Namespace) -> int:
    from app.devtools import memory_profile

    if args.calls < 1 or args.seconds <= 0 or args.frames < 1:
        print("callbridge: --calls and --frames must be at least 1, --seconds above 0", file=sys.stderr)
        return 2
    try:
        print(memory_profile.run(args.calls, args.seconds, args.ramp, args.frames, args.top, args.floor))
    except RuntimeError as exc:  # the bridge or the agent did not start, or the probe did not answer
        print(f"callbridge: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_soak_call(args: argparse.Namespace) -> int:
    from app.devtools import soak_call

    if args.minutes <= 0 or args.barge_in_every <= 1 or args.sample_every <= 0 or args.frames < 0:
        print(
            "callbridge: --minutes and --sample-every must be above 0, --barge-in-every above 1, --frames at least 0",
            file=sys.stderr,
        )
        return 2
    try:
        soak = soak_call.measure(args.minutes, args.barge_in_every, args.sample_every, args.frames)
    except RuntimeError as exc:  # the bridge or the agent did not start, or the probe did not answer
        print(f"callbridge: {exc}", file=sys.stderr)
        return 2
    print(soak_call.render(soak, args.settle_minutes))
    return 0 if soak_call.ok(soak) else 1


def cmd_bench_audio(args: argparse.Namespace) -> int:
    from app.devtools import bench_audio

    if args.frames < 1:
        print("callbridge: --frames must be at least 1", file=sys.stderr)
        return 2
    print(bench_audio.run(args.frames))
    return 0


def cmd_twilio(args: argparse.Namespace) -> int:
    from app.twilio import rest

    warn_about_env_file()
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
        print(f"{'skip' if check.skipped else 'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    return 0 if all(c.ok for c in checks) else 1


class DefaultsHelp(argparse.HelpFormatter):
    """Shows each option's default in --help, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbridge", description="A Twilio phone number to Deepgram Voice Agent bridge."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the bridge (configuration from the environment / .env)")
    serve.add_argument("--host", help="override HOST")
    serve.add_argument("--port", type=int, help="override PORT")
    serve.add_argument(
        "--workers",
        type=worker_count,
        help="override WORKERS: worker processes sharing the port (default: the cores this process may use, "
        "1 with the local agent)",
    )
    serve.set_defaults(func=cmd_serve)

    agent = sub.add_parser(
        "emulate-agent",
        help="run a local server speaking the Deepgram Voice Agent protocol",
        formatter_class=DefaultsHelp,
    )
    agent.add_argument("--host", default="127.0.0.1", help="address to listen on")
    agent.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port)")
    agent.add_argument(
        "--require-key", help="answer 401 unless 'Authorization: Token KEY' is sent (default: no key needed)"
    )
    agent.add_argument(
        "--speak-rate", type=float, default=4.0, help="how fast reply audio is sent, as a multiple of real time"
    )
    agent.add_argument(
        "--idle-timeout", type=float, default=10.0, help="seconds of client silence before CLIENT_MESSAGE_TIMEOUT"
    )
    agent.add_argument(
        "--script", help="JSON file: a list of scripted steps, see docs/local-test-peers.md (default: no script)"
    )
    agent.add_argument(
        "--function-reply",
        default="Done.",
        help="what the agent says once a function request is answered (empty: nothing)",
    )
    agent.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    agent.set_defaults(func=cmd_emulate_agent)

    sim = sub.add_parser(
        "simulate-call",
        help="play Twilio: call the bridge with a WAV file",
        formatter_class=DefaultsHelp,
        epilog="Exit status: 0 when the call went through: the webhook answered <Connect><Stream>, the bridge "
        "accepted the stream, agent audio came back and the call ended normally (the caller hung up, the bridge "
        "hung up or transferred it through the REST API, or closed the stream with code 1000 and nothing after "
        "<Connect>). 1 when it did not: nothing answers at the URL, "
        "the webhook refused (HTTP 403...) or answered the fallback (MAX_CALLS reached, stopping), the stream "
        "could not be opened, the bridge closed it with another code (1008: a stream token it refused; 1013: "
        "full; 1011: its error; 1001: stopping) or ended it into the fallback, no agent audio came back at all "
        "before the call ended (unless the bridge hung up or transferred it through the REST API, see "
        "--twilio-api-port); or what the bridge sent broke Twilio's protocol. 2: a bad argument or file.",
    )
    sim.add_argument("--url", help="bridge base URL (default: http://127.0.0.1:$PORT)")
    sim.add_argument(
        "--to",
        default=SIMULATED_CALLEE,
        metavar="NUMBER",
        help="the number dialled (Twilio's To): with AGENT_PROFILES_DIR, picks that number's profile",
    )
    sim.add_argument(
        "--from", dest="from_", default=SIMULATED_CALLER, metavar="NUMBER", help="the caller's number (Twilio's From)"
    )
    sim.add_argument("--wav", help="caller audio: 16-bit PCM WAV, or raw mu-law with a .ulaw suffix")
    sim.add_argument("--out", default="heard.wav", help="where to write what the caller heard")
    sim.add_argument("--fast", action="store_true", help="send caller audio as fast as possible")
    sim.add_argument(
        "--tail",
        type=float,
        default=3.0,
        help="seconds of quiet to stay on the line after the audio, once the agent has spoken (its first audio "
        "is waited for up to 30 s)",
    )
    sim.add_argument(
        "--auth-token",
        help="Twilio auth token to sign with (default: TWILIO_AUTH_TOKEN from the environment or .env, "
        "else the offline development token)",
    )
    sim.add_argument(
        "--press",
        action="append",
        type=key_presses,
        metavar="SECONDS:DIGITS",
        help="press keypad keys (0-9 * # A-D) this many seconds into the call, e.g. 3:1234#; repeatable "
        "(default: no keys)",
    )
    sim.add_argument("--key-gap", type=float, default=0.15, help="seconds between the digits of one --press")
    sim.add_argument(
        "--twilio-api-port",
        type=int,
        help="serve a stand-in of Twilio's REST API on 127.0.0.1:PORT (0: any free port) so the bridge can hang "
        "up or transfer the call; the bridge's TWILIO_API_BASE must point there (default: none)",
    )
    sim.add_argument(
        "--account-sid",
        help="account SID of that stand-in (default: TWILIO_ACCOUNT_SID from the environment or .env, else AC000...)",
    )
    sim.set_defaults(func=cmd_simulate_call)

    load = sub.add_parser(
        "loadtest",
        help="benchmark: concurrent simulated calls; prints latency, CPU, memory",
        formatter_class=DefaultsHelp,
    )
    load.add_argument("--calls", type=int, default=20, help="concurrent calls")
    load.add_argument("--seconds", type=float, default=20.0, help="caller audio per call")
    load.add_argument("--ramp", type=float, default=2.0, help="seconds over which calls start")
    load.add_argument("--url", help="test an already running bridge instead of starting one (no CPU/RSS)")
    load.add_argument("--auth-token", help="with --url: the bridge's TWILIO_AUTH_TOKEN")
    load.add_argument(
        "--floor",
        action="store_true",
        help="first run the same load through the floor (app.devtools.minimal_relay, a relay that does nothing "
        "else) and print every figure of the bridge as a difference and a ratio to it",
    )
    load.add_argument(
        "--watch",
        type=int,
        default=0,
        help="this many of the calls are followed (events) and listened to (both tracks) through the live "
        "call API while they last, as operators at the console would",
    )
    load.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the load this many times (with --floor: floor, bridge, floor, bridge...) and pool the figures",
    )
    load.add_argument(
        "--workers",
        type=int,
        help="start the bridge (and the floor) with --workers N (default: the option is not passed)",
    )
    load.set_defaults(func=cmd_loadtest)

    memory = sub.add_parser(
        "memory",
        help="benchmark: what each concurrent call's memory is spent on (tracemalloc in the bridge)",
        formatter_class=DefaultsHelp,
    )
    memory.add_argument("--calls", type=int, default=50, help="concurrent calls")
    memory.add_argument("--seconds", type=float, default=20.0, help="caller audio per call")
    memory.add_argument("--ramp", type=float, default=2.0, help="seconds over which calls start")
    memory.add_argument(
        "--frames", type=int, default=8, help="stack frames tracemalloc keeps per allocation (more: slower)"
    )
    memory.add_argument("--top", type=int, default=20, help="rows in each table")
    memory.add_argument(
        "--floor",
        action="store_true",
        help="first measure the floor (app.devtools.minimal_relay) the same way and print the bridge against it",
    )
    memory.set_defaults(func=cmd_memory)

    soak = sub.add_parser(
        "soak-call",
        help="benchmark: one long call with frequent barge-ins; the bridge's memory sampled all along",
        formatter_class=DefaultsHelp,
    )
    soak.add_argument("--minutes", type=float, default=10.0, help="length of the call")
    soak.add_argument("--barge-in-every", type=float, default=3.0, help="seconds between the caller's barge-ins")
    soak.add_argument("--sample-every", type=float, default=15.0, help="seconds between samples of the bridge")
    soak.add_argument(
        "--settle-minutes", type=float, default=2.0, help="the slopes are fitted from this far into the call"
    )
    soak.add_argument(
        "--frames", type=int, default=1, help="stack frames tracemalloc keeps per allocation (0: no tracemalloc)"
    )
    soak.set_defaults(func=cmd_soak_call)

    bench = sub.add_parser(
        "bench-audio",
        help="benchmark: each agent audio format's conversion (quality, held-back audio, cost per 20 ms frame)",
        formatter_class=DefaultsHelp,
    )
    bench.add_argument("--frames", type=int, default=5000, help="20 ms frames timed per path (best of 3 runs)")
    bench.set_defaults(func=cmd_bench_audio)

    call = sub.add_parser(
        "call",
        help="have a running bridge place a call (POST /api/calls; OPERATOR_TOKEN from the environment)",
        formatter_class=DefaultsHelp,
    )
    call.add_argument("to", help="the number to call, E.164, e.g. +15551234567")
    call.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="fill {{NAME}} in the profile (repeatable)"
    )
    call.add_argument("--from", dest="from_", help="caller id, E.164 (default: the bridge's OUTBOUND_FROM)")
    call.add_argument("--profile", help="a profile of AGENT_PROFILES_DIR, by its file name without extension")
    call.add_argument("--voicemail", help="the message left on a machine (default: the profile's)")
    call.add_argument("--no-amd", action="store_true", help="no answering-machine detection")
    call.add_argument("--url", help="the bridge (default: http://127.0.0.1:$PORT)")
    call.set_defaults(func=cmd_call)

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
