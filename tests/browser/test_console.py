"""The operator console (GET /console) in a real headless Chromium, against a real bridge with
OPERATOR_TOKEN set and a real local agent, while a simulated caller is on the line.

Debian's chromium is driven through playwright (``executable_path``); playwright's own browser
builds are never used. Without /usr/bin/chromium the test is skipped, saying so.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from app.codecs import TWILIO_FORMAT
from app.devtools import synth
from app.devtools.local_agent import SessionRecord
from app.devtools.simulated_caller import CallResult, SimulatedCaller
from tests.conftest import TWILIO_TOKEN, AgentHandle, BridgeHandle, wait_until

pytestmark = pytest.mark.timeout(90)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--autoplay-policy=no-user-gesture-required",
]
OPERATOR_TOKEN = "test-operator-token-0123456789"
SAID = "An operator says: your refund is on its way <b>today</b>."
AS_CALLER = 'Where is <img src=x onerror="window.injectedMarkupRan = 1"> my parcel?'  # untrusted, as transcripts are

# what the caller says, in turns, with pauses for the agent's echo between them: about 10 s of
# it, long enough for the console to open the call, act on it and listen while both still talk
CALLER_TURNS: list[tuple[str, float | str]] = [
    ("silence", 1.0),
    ("speech", "hello I am calling today"),
    ("silence", 1.0),
    ("speech", "my order has not arrived"),
    ("silence", 1.0),
    ("speech", "can you check it now"),
    ("silence", 1.0),
    ("speech", "thank you very much"),
    ("silence", 0.5),
]


LISTED_AT = """sid => [...document.querySelectorAll("#calls-body tr")].some(row => row.dataset.callSid === sid)
    && Date.now()"""
"""In the page: when (ms since the epoch) the list has a row for the call ``sid``; false until then."""


def caller_audio() -> bytes:
    pcm = b"".join(
        synth.silence(float(value)) if kind == "silence" else synth.speech_like(str(value))
        for kind, value in CALLER_TURNS
    )
    return synth.encode(pcm, TWILIO_FORMAT)


@dataclass
class Console:
    page: Page
    errors: list[str] = field(default_factory=list)  # uncaught exceptions of the page's script


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    """A fresh headless Chromium (its own profile directory) with one page."""
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}; apt-get install chromium): no browser test")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1366, "height": 800},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(10_000)
            found = Console(page)
            page.on("pageerror", lambda error: found.errors.append(str(error)))
            yield found
        finally:
            context.close()


class CallInThread:
    """A simulated Twilio call placed from a thread of its own (the test thread drives the browser)."""

    def __init__(self, caller: SimulatedCaller, audio: bytes) -> None:
        self.caller = caller
        self.audio = audio
        self.result: CallResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = asyncio.run(self.caller.run(self.audio))
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float) -> CallResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the simulated call did not end within {timeout} s"
        if self.error is not None:
            raise AssertionError(f"the simulated call failed: {self.error!r}") from self.error
        assert self.result is not None
        return self.result


def injected(session: SessionRecord, kind: str) -> list[str]:
    """The texts of what the local agent received of ``kind`` (InjectAgentMessage, InjectUserMessage)."""
    return [i.text for i in list(session.injections) if i.kind == kind]


def what_it_shows(page: Page) -> str:
    """The console's state in a line, for a failure's message."""
    shown = page.evaluate(
        """() => ({
            connection: document.getElementById("connection").textContent,
            notice: document.getElementById("notice").textContent,
            rows: [...document.querySelectorAll("#calls-body tr")].map(row => row.dataset.callSid),
        })"""
    )
    return f"the console shows {shown}"


def logged_at(record: dict[str, object]) -> float:
    """A bridge log record's time (its ISO 8601 ``timestamp``) as seconds since the epoch."""
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_console_lists_opens_steers_and_listens_to_a_live_call(
    start_agent: Callable[..., AgentHandle],
    start_bridge: Callable[..., BridgeHandle],
    console: Console,
) -> None:
    agent = start_agent()
    bridge = start_bridge(agent.url, operator_token=OPERATOR_TOKEN, console_transcripts=True)
    page = console.page
    page.goto(f"{bridge.base_url}/console")

    # signing in: a wrong token is refused and asked for again, the right one shows the (empty) list
    expect(page.locator("#login-view")).to_be_visible()
    page.fill("#token", "not-the-operator-token")
    page.click("#login-submit")
    expect(page.locator("#login-message")).to_contain_text("refused")
    expect(page.locator("#login-view")).to_be_visible()
    page.fill("#token", OPERATOR_TOKEN)
    page.click("#login-submit")
    expect(page.locator("#connection")).to_have_attribute("data-state", "ok")
    expect(page.locator("#calls-empty")).to_be_visible()
    expect(page.locator("#calls-body tr")).to_have_count(0)

    caller = SimulatedCaller(bridge.base_url, TWILIO_TOKEN, tail=1.0, max_tail=8.0)
    call = CallInThread(caller, caller_audio())
    row = page.locator(f'#calls-body tr[data-call-sid="{caller.call_sid}"]')

    # listed within a second of the stream's start (the page polls the list twice a second); the
    # browser tells when it saw the row, on the clock the bridge's log timestamps are on
    try:
        listed = page.wait_for_function(LISTED_AT, arg=caller.call_sid, polling=20, timeout=10_000)
    except PlaywrightTimeoutError:
        pytest.fail(f"the call was never listed; {what_it_shows(page)}; the call: {call.error or 'no error'}")
    listed_at = float(listed.json_value()) / 1000
    stream_started = logged_at(bridge.wait_for("stream_started"))
    expect(row).to_be_visible()
    assert listed_at - stream_started <= 1.0, f"listed {listed_at - stream_started:.2f} s after the stream started"
    expect(row.locator('td[data-field="from"]')).to_have_text(caller.caller)
    expect(row.locator('td[data-field="to"]')).to_have_text(caller.callee)

    # the call's own view: its events stream in as they happen
    row.click()
    expect(page.locator("#call-view")).to_be_visible()
    expect(page.locator("#call-sid")).to_have_text(caller.call_sid)
    assert page.evaluate("location.hash") == f"#call={caller.call_sid}"
    expect(page.locator('#events li[data-type="state"]').first).to_be_visible()
    expect(page.locator('#events li[data-type="agent_speaking"]').first).to_be_visible()
    expect(page.locator("#events-status")).to_contain_text("Live")

    # "say": the agent is sent exactly that text, and the action's result comes in on the stream
    session = agent.agent.sessions[0]
    page.fill("#say-text", SAID)
    page.click("#say-send")
    assert wait_until(lambda: SAID in injected(session, "InjectAgentMessage"), 5), session.injections
    said = page.locator('#action-results li[data-testid="action-result"]', has_text=SAID)
    expect(said).to_have_count(1)
    expect(said).to_have_attribute("data-action-id", re.compile(r"."))
    expect(said).to_have_attribute("data-result", re.compile(r"."))  # an `action` event reported it
    expect(page.locator("#say-text")).to_have_value("")

    # "as the caller": the agent gets it as a user message, and the transcript shows it as text
    page.fill("#as-caller-text", AS_CALLER)
    page.click("#as-caller-send")
    assert wait_until(lambda: AS_CALLER in injected(session, "InjectUserMessage"), 5), session.injections
    expect(page.locator("#transcript li", has_text=AS_CALLER)).to_have_count(1)
    expect(page.locator("#action-results li", has_text=AS_CALLER)).to_have_count(1)
    expect(page.locator("#call-view img")).to_have_count(0)  # the markup in it stayed text
    assert page.evaluate("window.injectedMarkupRan") is None

    # listening: both tracks play, and their level meters move
    page.click("#listen")
    expect(page.locator("#stop-listening")).to_be_enabled()
    for track in ("caller", "agent"):
        page.wait_for_function(f"document.getElementById('meter-{track}').value > 0", timeout=8_000)
    page.click("#stop-listening")
    expect(page.locator("#listen-status")).to_contain_text("Stopped listening")
    expect(page.locator("#listen")).to_be_enabled()

    # the end: the view says so, and the row leaves the list
    assert call.finish(timeout=30).violations == []
    expect(page.locator('#events li[data-type="ended"]')).to_have_count(1)
    expect(page.locator("#call-ended")).to_contain_text("ended")
    expect(page.locator("#say-text")).to_be_disabled()
    page.click("#back")
    expect(page.locator("#calls-view")).to_be_visible()
    expect(row).to_have_count(0, timeout=5_000)
    expect(page.locator("#calls-empty")).to_be_visible()
    assert console.errors == [], console.errors
