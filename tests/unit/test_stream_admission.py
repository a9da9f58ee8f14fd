"""Admission (issue 16, item 1): MAX_CALLS counts calls, token-less sockets wait apart."""

from __future__ import annotations

from app.stream_admission import ADMISSION_HOLD_SECONDS, Admission, TokenlessPool


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_pool_evicts_its_oldest_socket_for_each_newcomer() -> None:
    pool: TokenlessPool[str] = TokenlessPool(3)
    assert [pool.add(s) for s in "abc"] == [None, None, None]
    assert pool.add("d") == "a" and pool.add("e") == "b"
    pool.discard("c")  # redeemed its token: it leaves the pool
    assert pool.add("f") is None and len(pool) == 3
    assert pool.add("g") == "d"


def test_token_less_sockets_never_take_a_place_under_max_calls() -> None:
    admission: Admission[str] = Admission(max_calls=2, max_tokenless=4)
    for i in range(100):  # a flood of sockets that never present a token
        admission.socket_opened(f"idle-{i}")
    assert admission.active() == 0
    assert admission.try_admit("CA1") is None and admission.try_admit("CA2") is None
    assert admission.try_admit("CA3") == "over_capacity"  # two calls admitted: full
    assert admission.claim("real-1", "CA1") and admission.claim("real-2", "CA2")
    assert admission.active() == 2 and len(admission.tokenless) == 4


def test_a_stream_takes_its_admitted_place_or_a_free_one_and_gives_it_back() -> None:
    clock = Clock()
    admission: Admission[str] = Admission(max_calls=2, max_tokenless=8, clock=clock)
    assert admission.try_admit("CA1") is None
    assert admission.claim("s-other", "CA-elsewhere")  # admitted by another replica: a free place
    assert admission.try_admit("CA2") == "over_capacity"
    assert not admission.claim("s-late", "CA-late")  # no admission here and no place left
    assert admission.claim("s1", "CA1")  # its own admission's place
    admission.socket_closed("s-other")
    assert admission.active() == 1 and admission.try_admit("CA2") is None
    clock.now += ADMISSION_HOLD_SECONDS + 1  # Twilio never opened CA2's stream: its hold lapses
    assert admission.claim("s-late", "CA-late")


def test_draining_admits_no_new_call_but_lets_admitted_streams_in() -> None:
    admission: Admission[str] = Admission(max_calls=5, max_tokenless=8)
    assert admission.try_admit("CA1") is None
    admission.draining = True
    assert admission.try_admit("CA2") == "draining"
    assert admission.claim("s1", "CA1")  # admitted before the drain: its caller is let through
    assert not admission.claim("s2", "CA-unknown")
