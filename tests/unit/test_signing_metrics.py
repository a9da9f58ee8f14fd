from __future__ import annotations

from prometheus_client import generate_latest

from app import signing
from app.observability.metrics import Metrics

SECRET = b"0123456789abcdef"


def test_signature_roundtrip_and_freshness() -> None:
    headers = signing.signed_headers(SECRET, b'{"a":1}', now=1_000_000)
    ts, sig = headers[signing.TIMESTAMP_HEADER], headers[signing.SIGNATURE_HEADER]
    assert sig.startswith("v1=")
    assert signing.verify(SECRET, ts, b'{"a":1}', sig, now=1_000_100)
    assert not signing.verify(SECRET, ts, b'{"a":2}', sig, now=1_000_100)  # body changed
    assert not signing.verify(SECRET, ts, b'{"a":1}', sig, now=1_000_400)  # replayed too late
    assert not signing.verify(SECRET, "abc", b'{"a":1}', sig, now=1_000_000)


def test_record_dispatches_by_type_and_bounds_peer_labels() -> None:
    m = Metrics()
    m.record("barge_ins")
    m.record("agent_connect", 0.2)
    m.record("agent_errors", 1, "INTERNAL_SERVER_ERROR")
    m.record("agent_errors", 1, "made-up-code-" + "x" * 50)
    m.record("agent_latency", 0.5, "ttt")
    text = generate_latest(m.registry).decode()
    assert "callbridge_barge_ins_total 1.0" in text
    assert "callbridge_agent_connect_seconds_count 1.0" in text
    assert 'callbridge_agent_errors_total{code="INTERNAL_SERVER_ERROR"} 1.0' in text
    assert 'callbridge_agent_errors_total{code="other"} 1.0' in text
    assert "made-up-code" not in text
    assert 'callbridge_agent_latency_seconds_count{kind="ttt"} 1.0' in text


def test_the_log_limiter_bounds_lines_per_interval_and_says_how_many_it_left_out() -> None:
    from app.observability.log_limit import LogLimiter

    now = [0.0]
    limiter = LogLimiter(limit=3, interval=10.0, clock=lambda: now[0])
    assert [limiter.allow("forged")[0] for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("other") == (True, 0)  # each event has its own budget
    now[0] = 10.0
    assert limiter.allow("forged") == (True, 2)  # a new window, and the count of the last one
    assert limiter.allow("forged") == (True, 0)
