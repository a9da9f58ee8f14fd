"""``callbridge serve --workers 2`` as real processes on loopback: calls whose webhook and
stream land on different workers, metrics summed over both, a killed worker replaced while
the other's call goes on, SIGTERM draining both, and single use of tokens across workers.

Which worker accepts a connection is the kernel's choice; the tests read it from the
``worker`` field of the JSON logs and make as many calls as it takes (bounded) to see what
they need."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.endpoints import free_port
from app.devtools.simulated_caller import CallResult, SimulatedCaller, parse_twiml
from tests.conftest import get, metric_value, start_serve, stop_serve, wait_until

pytestmark = pytest.mark.timeout(120)
OFFLINE_TOKEN = "callbridge-offline-development-token"  # the offline mode's own (no TWILIO_AUTH_TOKEN)


class RecordSink(BaseHTTPRequestHandler):
    records: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        type(self).records.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Instance:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    records: list[dict[str, Any]]

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    lines.append(record)
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == name]

    def worker_pids(self) -> dict[int, int]:
        """The pid of each worker now (a replacement's, once started)."""
        return {r["worker"]: r["pid"] for r in self.events("worker_started")}

    def worker_of(self, event: str, call_sid: str) -> int | None:
        for record in self.events(event):
            if record.get("call_sid") == call_sid:
                return int(record["worker"])
        return None


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Instance]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    sink = type("Sink", (RecordSink,), {"records": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    env = {
        **os.environ,  # without the operator's variables (conftest): no keys, so the offline local agent
        "PORT": str(port),
        "DRAIN_TIMEOUT_SECONDS": "30",
        "CALL_EVENTS_URL": f"http://127.0.0.1:{server.server_address[1]}/events",
    }
    proc, log_path = start_serve(tmp_path, env, "--workers", "2")
    handle = Instance(proc, f"http://127.0.0.1:{port}", log_path, sink.records)
    try:
        started = lambda: {r.get("worker") for r in handle.events("service_started")} == {1, 2}  # noqa: E731
        assert wait_until(started, timeout=30), log_path.read_text()
        yield handle
    finally:
        server.shutdown()
        server.server_close()
        stop_serve(proc)
        for pid in handle.worker_pids().values():  # none should be left; never leave one behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def caller_audio(seconds_of_silence: float) -> bytes:
    pcm = synth.silence(0.2) + synth.speech_like("hello over there") + synth.silence(seconds_of_silence)
    return synth.encode(pcm, TWILIO_FORMAT)


def calls(base_url: str, count: int, fast: bool = True, silence: float = 0.6) -> list[CallResult]:
    async def all_of_them() -> list[CallResult]:
        callers = [SimulatedCaller(base_url, OFFLINE_TOKEN, fast=fast, tail=0.5) for _ in range(count)]
        return list(await asyncio.gather(*(c.run(caller_audio(silence)) for c in callers)))

    return asyncio.run(all_of_them())


def call_in_thread(base_url: str, silence: float) -> tuple[SimulatedCaller, threading.Thread, dict[str, CallResult]]:
    caller = SimulatedCaller(base_url, OFFLINE_TOKEN, tail=0.5)
    outcome: dict[str, CallResult] = {}
    audio = caller_audio(silence)
    thread = threading.Thread(target=lambda: outcome.update(result=asyncio.run(caller.run(audio))))
    thread.start()
    return caller, thread, outcome


def test_calls_cross_workers_and_metrics_and_records_cover_both(instance: Instance) -> None:
    results: list[CallResult] = []
    crossed: list[str] = []
    ended_on: list[int] = []
    # the kernel spreads connections by a hash: a batch of 8 has every webhook-stream pair on one
    # worker, or every stream on one worker, with a chance of 2**-7 each; four batches make both rare
    for _ in range(4):
        results += calls(instance.base_url, 8)
        assert wait_until(lambda: len(instance.events("call_ended")) == len(results), timeout=20)  # noqa: B023
        crossed = [
            sid
            for sid in (r["call_sid"] for r in instance.events("call_ended"))
            if instance.worker_of("call_answered", sid) != instance.worker_of("call_ended", sid)
        ]
        ended_on = [int(r["worker"]) for r in instance.events("call_ended")]
        if crossed and set(ended_on) == {1, 2}:
            break
    assert crossed, "no call had its webhook and its stream on different workers"
    assert all(r.ended_by == "caller" and r.close_code == 1000 for r in results)  # such calls work too
    assert set(ended_on) == {1, 2}

    # /metrics, on whichever worker answers, counts every worker's calls
    for _ in range(4):
        _, text = get(instance.base_url + "/metrics")
        assert metric_value(text, "callbridge_calls_total", 'outcome="caller_hangup"') == len(results)
        assert metric_value(text, "callbridge_webhook_requests_total", 'result="answered"') == len(results)
        assert metric_value(text, "callbridge_active_calls") == 0

    # every call record names the worker that carried the call
    assert wait_until(lambda: len(instance.records) == len(results), timeout=10)
    for record in instance.records:
        assert record["worker"] == instance.worker_of("call_ended", record["call_sid"])

    # one local agent for both workers: the supervisor's
    (starting,) = instance.events("workers_starting")
    assert {r["agent_url"] for r in instance.events("service_started")} == {starting["local_agent"]}


def stream_once(base_url: str, caller: SimulatedCaller, params: dict[str, str]) -> int | None:
    """Open a media stream with ``params``, say a little, hang up: the close code."""
    url = base_url.replace("http://", "ws://") + "/twilio/media"

    async def run() -> int | None:
        async with await caller.open_stream(url) as ws:
            await ws.send(caller.start_message(params))
            await asyncio.sleep(0.3)
            with contextlib.suppress(ConnectionClosed):  # a refused stream is closed by now
                await ws.send(json.dumps({"event": "stop", "streamSid": caller.stream_sid, "stop": {}}))
                async for _ in ws:
                    pass
            return ws.close_code

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_a_stream_token_is_single_use_across_workers(instance: Instance) -> None:
    caller = SimulatedCaller(instance.base_url, OFFLINE_TOKEN)
    status, twiml = caller.post_webhook()
    assert status == 200
    _, params = parse_twiml(twiml)
    assert stream_once(instance.base_url, caller, params) == 1000
    assert wait_until(lambda: instance.worker_of("stream_started", caller.call_sid) is not None, timeout=5)
    accepted_on = instance.worker_of("stream_started", caller.call_sid)
    refused_on: set[int] = set()
    for attempt in range(1, 25):  # each replay lands on the other worker with chance 1/2
        assert stream_once(instance.base_url, caller, params) == 1008
        assert wait_until(lambda: len(instance.events("stream_token_rejected")) == attempt, timeout=5)  # noqa: B023
        refused_on = {int(r["worker"]) for r in instance.events("stream_token_rejected")}
        if refused_on - {accepted_on}:
            break
    assert refused_on - {accepted_on}, "no replay reached the other worker"
    assert {r["problem"] for r in instance.events("stream_token_rejected")} == {"already used"}
    assert len(instance.events("call_ended")) == 1  # one agent session, one call


def calls_on_both_workers(
    instance: Instance, silence: float
) -> list[tuple[SimulatedCaller, threading.Thread, dict[str, CallResult]]]:
    """Calls in progress, started one by one until each worker carries at least one."""
    started: list[tuple[SimulatedCaller, threading.Thread, dict[str, CallResult]]] = []
    while len(started) < 12:  # all on one worker with chance 2**-11
        started.append(call_in_thread(instance.base_url, silence))
        sid = started[-1][0].call_sid
        assert wait_until(lambda: instance.worker_of("stream_started", sid) is not None, timeout=10)  # noqa: B023
        carriers = {instance.worker_of("stream_started", c.call_sid) for c, _, _ in started}
        if carriers == {1, 2}:
            return started
    raise AssertionError("every call landed on the same worker")


def test_a_killed_worker_is_replaced_while_the_other_workers_call_goes_on(instance: Instance) -> None:
    started = calls_on_both_workers(instance, silence=6.0)
    survivor = started[0]
    carrier = instance.worker_of("stream_started", survivor[0].call_sid)
    victim = 2 if carrier == 1 else 1
    old_pid = instance.worker_pids()[victim]
    os.kill(old_pid, signal.SIGKILL)
    assert wait_until(lambda: instance.worker_pids()[victim] != old_pid, timeout=10)
    died = [r for r in instance.events("worker_died") if r["worker"] == victim]
    assert died and died[0]["how"] == "signal SIGKILL"
    survivor[1].join(30)
    result = survivor[2]["result"]
    assert result.ended_by == "caller" and result.close_code == 1000  # not cut by the other's death
    for _, thread, _ in started[1:]:
        thread.join(30)
    # the replacement answers: a new call lands on it sooner or later
    assert wait_until(lambda: victim in {r.get("worker") for r in instance.events("service_started")[2:]}, timeout=20)
    _, text = get(instance.base_url + "/metrics")
    assert metric_value(text, "callbridge_active_calls") == 0  # the dead worker's calls left the gauge


def test_sigterm_drains_the_calls_of_both_workers(instance: Instance) -> None:
    started = calls_on_both_workers(instance, silence=4.0)
    instance.proc.send_signal(signal.SIGTERM)
    not_ready: set[int] = set()

    def both_say_draining() -> bool:
        status, body = get(instance.base_url + "/readyz")
        if status == 503 and "draining" in body:
            not_ready.add(int(json.loads(body)["worker"]))
        return not_ready == {1, 2}

    assert wait_until(both_say_draining, timeout=10)
    assert instance.proc.poll() is None  # still carrying the calls
    for _, thread, _ in started:
        thread.join(30)
    for _, _, outcome in started:
        assert outcome["result"].ended_by == "caller" and outcome["result"].close_code == 1000
    assert instance.proc.wait(30) == 0
    finished = instance.events("drain_finished")
    assert sorted(r["worker"] for r in finished) == [1, 2] and all(r["calls_left"] == 0 for r in finished)


def test_while_one_worker_drains_a_call_the_idle_one_is_gone_and_every_request_is_answered(
    instance: Instance,
) -> None:
    """A worker with no calls stops at once on SIGTERM; its listening socket must go with it, or
    the kernel would keep queueing half of the new connections where nobody accepts them."""
    caller, thread, outcome = call_in_thread(instance.base_url, silence=4.0)
    assert wait_until(lambda: instance.worker_of("stream_started", caller.call_sid) is not None, timeout=10)
    instance.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: bool(instance.events("worker_stopped")), timeout=10)  # the idle one
    answers = [get(instance.base_url + "/readyz")[0] for _ in range(20)]  # each would hang 5 s, not answer
    assert answers == [503] * 20
    thread.join(30)
    assert outcome["result"].ended_by == "caller"
    assert instance.proc.wait(30) == 0


def test_worker_count_is_checked(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--workers", "0"], cwd=tmp_path, capture_output=True, timeout=30
    )
    assert proc.returncode == 2 and b"must be between 1 and 64" in proc.stderr


def operator_token(instance: Instance) -> str:
    """The token the offline ``serve`` made up for this run (printed on its stderr)."""
    for line in instance.log_path.read_text(errors="replace").splitlines():
        if "operator token (this run only): " in line:
            return line.rsplit(": ", 1)[1].strip()
    raise AssertionError("serve printed no operator token")


def test_the_live_api_on_either_worker_sees_and_steers_every_workers_calls(instance: Instance) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {operator_token(instance)}"}
    running = [call_in_thread(instance.base_url, silence=6.0) for _ in range(10)]
    sids = {caller.call_sid for caller, _, _ in running}
    # which worker holds each stream, from the logs (10 streams all on one worker: 1 in 512)
    assert wait_until(lambda: len(instance.events("stream_started")) == 10, timeout=10)
    holders = {sid: instance.worker_of("stream_started", sid) for sid in sids}
    assert set(holders.values()) == {1, 2}
    for _ in range(6):  # each request lands on either worker: every one lists all 10 calls
        listed = httpx.get(instance.base_url + "/api/calls", headers=headers, timeout=5).json()["calls"]
        assert {line["call_sid"] for line in listed} == sids
        assert {line["call_sid"]: line["worker"] for line in listed} == holders
    for sid in sids:  # an action reaches the worker that holds the call, wherever it was asked
        answer = httpx.post(
            f"{instance.base_url}/api/calls/{sid}/actions",
            headers=headers,
            json={"action": "instruct", "text": f"Note for {sid}."},
            timeout=5,
        )
        assert answer.status_code == 202, answer.text
    detail = httpx.get(f"{instance.base_url}/api/calls/{sorted(sids)[0]}", headers=headers, timeout=5).json()
    assert detail["call_sid"] == sorted(sids)[0] and detail["events"]
    for _, thread, _ in running:
        thread.join(30)
    assert wait_until(
        lambda: httpx.get(instance.base_url + "/api/calls", headers=headers, timeout=5).json()["calls"] == [], 3.0
    )
    audited = {r["call_sid"]: r["worker"] for r in instance.events("operator_action")}
    assert audited == holders  # each carried out by the call's own worker
