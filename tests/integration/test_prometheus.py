"""The Grafana dashboard and the alert rules against a real Prometheus (Debian's ``prometheus``
package): promtool checks and unit-tests the rules; then a Prometheus on loopback scrapes a real
bridge carrying simulated calls, and every expression of every dashboard panel and every alert
runs through its query API. Each must be a valid query; the series the calls produce must be
there; no alert may be pending or firing after a healthy run; and the alerts for calls refused
at MAX_CALLS and for a full token-less pool fire once those are produced.

The checks of the live run are gathered and reported together, so one run says everything that
is missing (a metric not exported yet names the panel or alert that needs it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.asyncio.client import ClientConnection, connect

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.endpoints import free_port
from app.devtools.local_agent import LocalAgentConfig, ScriptStep
from app.devtools.simulated_caller import CallResult, SimulatedCaller
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, get, metric_value, wait_until

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/callbridge-alerts.yml"
RULE_TESTS = ROOT / "deploy/prometheus/callbridge-alerts.test.yml"
DASHBOARD = ROOT / "deploy/grafana/callbridge.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="prometheus and promtool are not on PATH: apt-get install prometheus; .ci/run installs it",
    ),
]

JOB = "callbridge"  # the job CallbridgeTargetDown names (the ServiceMonitor's, from the Service)
MAX_CALLS = 3
TOKENLESS_POOL = 4
CALLS_PER_ROUND = 2  # at once; two rounds, so that labelled series created by the first move in the second
WARNING_CODE = "SPEAK_REQUEST_FAILED"  # the agent sends one Warning a call: the warnings series has data
# Grafana's variables, as a dashboard with "All" selected expands them. The whole run is shorter
# than the rate window, so rates cover all of it.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
# (panel title, refId) whose query may rightly return nothing after a healthy run
MAY_BE_EMPTY = {
    ("Fallbacks by reason", "A"): "no call falls back in a healthy run",
    ("Agent errors and warnings", "A"): "the agent sends no Error in a healthy run",
    ("Operator actions", "A"): "no operator acts on these calls (the metric's presence is checked apart)",
    ("Agent latency (reported by the agent)", "C"): "the local agent sends no LatencyReport",
}
# (panel title, refId): (label, value) pairs that must be among the series returned
MUST_SHOW = {
    ("Calls ended by outcome", "A"): [("outcome", "caller_hangup")],
    ("Webhooks by result", "A"): [("result", "answered"), ("result", "over_capacity")],
    ("Streams rejected by reason", "A"): [("reason", "evicted")],
    ("Agent latency (reported by the agent)", "B"): [("kind", "total"), ("kind", "ttt"), ("kind", "tts")],
    ("Agent errors and warnings", "B"): [("code", WARNING_CODE)],
}
INDUCED_ALERTS = {"CallbridgeCallsRefused", "CallbridgeTokenlessPoolFull"}
# counters whose first increment after a start the induced alerts must see: increase() counts
# nothing for a series that first appears with its value already above 0
MUST_START_AT_ZERO = (
    'callbridge_webhook_requests_total{result="over_capacity"}',
    'callbridge_streams_rejected_total{reason="evicted"}',
)


# --- promtool ------------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        done = subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    assert "SUCCESS" in done.stdout


# --- a Prometheus on loopback --------------------------------------------------------------


def rfc3339(text: str) -> float:
    """Unix time of an RFC 3339 timestamp as Prometheus writes it (up to 9 fractional digits)."""
    match = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    assert match, text
    zone = "+00:00" if match[3] == "Z" else match[3]
    return datetime.fromisoformat(match[1] + (match[2] or "")[:7] + zone).timestamp()


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET one API endpoint, directly (no proxy); its errors are JSON bodies too."""
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=5) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                body = exc.read()
        answer: dict[str, Any] = json.loads(body)
        return answer

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", {"query": expr})

    def vector(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.vector(expr)
        return float(result[0]["value"][1]) if result else None

    def scraped_since(self, t: float) -> bool:
        """A scrape of the bridge that began after ``t`` (unix time) is stored."""
        last = self.value(f'max(timestamp(up{{job="{JOB}"}}))')
        return last is not None and last > t

    def evaluated_since(self, t: float) -> bool:
        groups = self.api("/api/v1/rules")["data"]["groups"]
        return bool(groups) and all(rfc3339(g["lastEvaluation"]) > t for g in groups)

    def alerts(self) -> dict[str, str]:
        """Alert name -> state (pending, firing) of the alerts active now."""
        return {a["labels"]["alertname"]: a["state"] for a in self.api("/api/v1/alerts")["data"]["alerts"]}

    def ready(self) -> bool:
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll a condition on another process every 0.1 s; True if it held within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    """A Prometheus of its own: scrapes ``target``'s /metrics and evaluates the alert rules,
    every second; its data in ``tmp_path``."""
    assert PROMETHEUS is not None
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        started = eventually(lambda: prometheus.ready() or proc.poll() is not None, 15)
        assert started and proc.poll() is None, f"prometheus did not start:\n{log.read_text()[-3000:]}"
        yield prometheus
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- what the bridge is put through ----------------------------------------------------------


def caller_audio(*parts: tuple[str, float | str]) -> bytes:
    pcm = b""
    for kind, value in parts:
        pcm += synth.silence(float(value)) if kind == "silence" else synth.speech_like(str(value))
    return synth.encode(pcm, TWILIO_FORMAT)


def place_calls(bridge: BridgeHandle, count: int) -> list[CallResult]:
    """``count`` calls at once, each talking over the greeting (a barge-in) and then waiting for
    the agent's answer to what it said (a turn)."""
    audio = caller_audio(("silence", 1.0), ("speech", "wait wait"), ("silence", 0.6))

    async def calls() -> list[CallResult]:
        callers = [SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=0.5) for _ in range(count)]
        return list(await asyncio.gather(*(caller.run(audio) for caller in callers)))

    return asyncio.run(calls())


def call_round(bridge: BridgeHandle, prometheus: Prometheus) -> float:
    """CALLS_PER_ROUND calls, then a scrape of everything they counted: when (unix time) the
    bridge had counted it all."""
    before = len(bridge.records("call_ended"))
    results = place_calls(bridge, CALLS_PER_ROUND)
    assert all(r.ended_by == "caller" and r.violations == [] for r in results)
    assert all(r.clears for r in results), "each call is meant to barge in"
    assert wait_until(lambda: len(bridge.records("call_ended")) == before + CALLS_PER_ROUND, 5)
    settled = time.time()
    assert eventually(lambda: prometheus.scraped_since(settled), 10)
    return settled


def refuse_a_call(bridge: BridgeHandle) -> str:
    """Webhooks until the bridge is full: MAX_CALLS admitted (their streams never open, so
    each holds its place), one more answered with the fallback. That one's TwiML."""
    bodies = []
    for _ in range(MAX_CALLS + 1):
        status, body = SimulatedCaller(bridge.base_url, TWILIO_TOKEN).post_webhook()
        assert status == 200, body
        bodies.append(body)
    assert all("<Stream" in body for body in bodies[:-1])
    return bodies[-1]


def crowd_the_tokenless_pool(bridge: BridgeHandle, evictions: int) -> None:
    """Media sockets that never send ``start``, beyond the token-less pool: the bridge evicts
    the oldest to make room for each one past TOKENLESS_POOL. They are dropped once it did."""
    url = bridge.base_url.replace("http://", "ws://") + "/twilio/media"

    def evicted() -> float:
        return metric_value(
            get(f"{bridge.base_url}/metrics")[1], "callbridge_streams_rejected_total", 'reason="evicted"'
        )

    async def crowd() -> None:
        sockets: list[ClientConnection] = []
        try:
            for _ in range(TOKENLESS_POOL + evictions):
                sockets.append(await connect(url, compression=None, proxy=None, open_timeout=5))
            assert await asyncio.to_thread(wait_until, lambda: evicted() >= evictions, 5.0)
        finally:
            for ws in sockets:
                ws.transport.abort()

    asyncio.run(crowd())


def expand(text: str) -> str:
    """A query of the dashboard as Grafana sends it with "All" selected."""
    for name, value in GRAFANA_VARIABLES.items():
        text = text.replace(name, value)
    assert "$" not in text, f"a variable the test does not expand: {text}"
    return text


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expression) of every query of every panel, Grafana's variables
    expanded as with "All" selected."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["refId"], expand(target["expr"])))
    return out


def dashboard_variables() -> list[tuple[str, str, str]]:
    """(name, series selector, label) of each ``label_values(selector, label)`` variable."""
    out = []
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
            assert match, variable["query"]
            out.append((variable["name"], expand(match[1]), match[2]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


# --- the run -------------------------------------------------------------------------------


def test_dashboard_and_alerts_on_a_real_prometheus_scraping_a_real_bridge(
    start_agent: Callable[..., AgentHandle], start_bridge: Callable[..., BridgeHandle], tmp_path: Path
) -> None:
    agent = start_agent(LocalAgentConfig(script=[ScriptStep(on="utterance", do="warning", code=WARNING_CODE)]))
    bridge = start_bridge(agent.url, max_calls=MAX_CALLS, max_tokenless_streams=TOKENLESS_POOL)
    target = bridge.base_url.removeprefix("http://")
    problems: list[str] = []
    with running_prometheus(tmp_path, target) as prometheus:
        assert eventually(lambda: prometheus.scraped_since(0), 10), prometheus.api("/api/v1/targets")
        (scraped,) = prometheus.api("/api/v1/targets")["data"]["activeTargets"]
        assert scraped["health"] == "up" and scraped["scrapeUrl"] == f"{bridge.base_url}/metrics", scraped

        # a healthy run: two rounds of calls, each scraped once it is over (so that the series
        # the first round creates have moved by the second)
        call_round(bridge, prometheus)
        settled = call_round(bridge, prometheus)
        assert eventually(lambda: prometheus.evaluated_since(settled), 10)

        for rule in alert_rules():
            answer = prometheus.query(rule["expr"])
            if answer["status"] != "success":
                problems.append(f"alert {rule['alert']}: not a valid query: {answer.get('error')}")
            elif answer["data"]["result"]:
                problems.append(f"alert {rule['alert']} fires in a healthy run: {answer['data']['result']}")
        for group in prometheus.api("/api/v1/rules")["data"]["groups"]:
            for rule in group["rules"]:
                if rule["health"] != "ok":
                    problems.append(f"rule {rule['name']} does not evaluate: {rule.get('lastError')}")
        if active := prometheus.alerts():
            problems.append(f"alerts active after a healthy run: {active}")
        turns = prometheus.value("sum(callbridge_response_latency_seconds_count)")
        if turns is None or turns < 2 * CALLS_PER_ROUND:
            problems.append(f"callbridge_response_latency_seconds counted {turns} turns of {2 * CALLS_PER_ROUND} calls")
        for series in MUST_START_AT_ZERO:
            if prometheus.value(series) != 0:
                problems.append(
                    f"{series} is not exported at 0 before it first counts (got {prometheus.value(series)}): "
                    "increase() cannot see the first one after a start, so its alert stays silent; "
                    "initialise every label value of the counter at start"
                )

        # a full instance refuses a call; a crowd of token-less sockets overflows the pool
        fallback = refuse_a_call(bridge)
        assert "<Stream" not in fallback and "<Say" in fallback, fallback
        crowd_the_tokenless_pool(bridge, evictions=2)
        induced = time.time()
        if not eventually(
            lambda: INDUCED_ALERTS.issubset(n for n, s in prometheus.alerts().items() if s == "firing"), 10
        ):
            problems.append(f"expected {sorted(INDUCED_ALERTS)} firing, active alerts: {prometheus.alerts()}")
        if unexpected := set(prometheus.alerts()) - INDUCED_ALERTS:
            problems.append(f"alerts that should not be active: {sorted(unexpected)}")
        assert eventually(lambda: prometheus.scraped_since(induced), 10)

        # every panel's queries, on everything the run produced
        for title, ref, expr in dashboard_targets():
            answer = prometheus.query(expr)
            where = f"panel {title!r} query {ref}"
            if answer["status"] != "success":
                problems.append(f"{where}: not a valid query: {answer.get('error')}: {expr}")
                continue
            result = answer["data"]["result"]
            if not result and (title, ref) not in MAY_BE_EMPTY:
                problems.append(f"{where}: no data: {expr}")
            if result and "histogram_quantile" in expr and not any(math.isfinite(float(s["value"][1])) for s in result):
                problems.append(f"{where}: no finite quantile: {result}")
            for label, value in MUST_SHOW.get((title, ref), []):
                if not any(s["metric"].get(label) == value for s in result):
                    problems.append(f"{where}: no series with {label}={value!r}: {result}")
        ours = {"job": JOB, "instance": target}
        for name, series, label in dashboard_variables():  # asked as Grafana asks label_values()
            values = prometheus.api(f"/api/v1/label/{label}/values", {"match[]": series})
            if values["status"] != "success" or ours[name] not in values["data"]:
                problems.append(f"dashboard variable ${name} would not offer this bridge: {values}")

    exposition = get(f"{bridge.base_url}/metrics")[1]
    if "# TYPE callbridge_operator_actions_total counter" not in exposition:
        problems.append("the bridge does not export callbridge_operator_actions_total (panel Operator actions)")
    assert PROMTOOL is not None
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30)
    if lint.returncode != 0:
        problems.append(f"promtool check metrics on the bridge's /metrics:\n{lint.stdout}{lint.stderr}")
    assert not problems, "\n".join(problems)
