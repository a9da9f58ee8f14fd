from __future__ import annotations

import pytest

from app.twilio.stream_token import StreamTokens

CALL = "CA" + "1" * 32


def tokens() -> StreamTokens:
    return StreamTokens(b"0123456789abcdef0123", ttl_seconds=60)


def test_token_redeems_once_for_its_call() -> None:
    t = tokens()
    token = t.mint(CALL, now=1000)
    assert t.redeem(token, "CA" + "2" * 32, now=1001) == "bad signature or wrong call"
    assert t.redeem(token, CALL, now=1001) is None
    assert t.redeem(token, CALL, now=1002) == "already used"


def test_token_expires() -> None:
    t = tokens()
    token = t.mint(CALL, now=1000)
    assert t.redeem(token, CALL, now=1061) == "expired"


@pytest.mark.parametrize("bad", ["", "abc", "1.2", "x.y.z", "99999999999.n.sig"])
def test_malformed_or_forged_tokens(bad: str) -> None:
    assert tokens().redeem(bad, CALL, now=1000) is not None


def test_other_secret_cannot_forge() -> None:
    forged = StreamTokens(b"another-secret-of-16+").mint(CALL, now=1000)
    assert tokens().redeem(forged, CALL, now=1000) == "bad signature or wrong call"


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError):
        StreamTokens(b"short")


def test_used_nonces_are_forgotten_after_expiry() -> None:
    t = tokens()
    for i in range(50):
        assert t.redeem(t.mint(CALL, now=1000 + i), CALL, now=1000 + i) is None
    t.redeem(t.mint(CALL, now=5000), CALL, now=5000)
    assert len(t._used) == 1


def test_the_profile_is_bound_into_the_token() -> None:
    t = StreamTokens(b"a-very-secret-key-0123")
    token = t.mint(CALL, "+15551230001", now=1000)
    assert t.redeem(token, CALL, "+15557654321", now=1001) == "bad signature or wrong call"  # changed on the way
    assert t.redeem(token, CALL, "", now=1001) == "bad signature or wrong call"
    assert t.redeem(token, CALL, "+15551230001", now=1001) is None
