"""Codecs: conversions keep length and state across arbitrary chunk boundaries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.codecs import TWILIO_FORMAT, AudioFormat, Transcoder, frames, from_linear16, rms_linear16, to_linear16

FORMATS = [
    TWILIO_FORMAT,
    AudioFormat("alaw", 8000),
    AudioFormat("linear16", 8000),
    AudioFormat("linear16", 16000),
    AudioFormat("linear16", 24000),
]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
    src=st.sampled_from(FORMATS),
    dst=st.sampled_from(FORMATS),
)
def test_split_stream_converts_exactly_like_whole_stream(
    data: bytes, cuts: list[int], src: AudioFormat, dst: AudioFormat
) -> None:
    whole = Transcoder(src, dst)
    expected = whole.convert(data)
    split = Transcoder(src, dst)
    got = b"".join(split.convert(piece) for piece in chunked(data, cuts))
    assert got == expected
    assert split.pending_bytes == whole.pending_bytes  # odd bytes are carried, never dropped


def test_odd_byte_is_carried_to_next_chunk() -> None:
    t = Transcoder(AudioFormat("linear16", 8000), TWILIO_FORMAT)
    assert t.convert(b"\x00") == b""
    assert t.pending_bytes == 1
    assert len(t.convert(b"\x00\x00\x00")) == 2


def test_passthrough_is_identity_and_free() -> None:
    t = Transcoder(TWILIO_FORMAT, TWILIO_FORMAT)
    data = bytes(range(256))
    assert t.convert(data) is data


@given(st.binary(min_size=0, max_size=400))
def test_mulaw_roundtrip_is_stable_after_one_pass(data: bytes) -> None:
    once = from_linear16(to_linear16(data, "mulaw"), "mulaw")
    assert from_linear16(to_linear16(once, "mulaw"), "mulaw") == once
    assert len(once) == len(data)


def test_resampling_keeps_duration() -> None:
    up = Transcoder(TWILIO_FORMAT, AudioFormat("linear16", 16000))
    out = b"".join(up.convert(b"\xff" * 160) for _ in range(100))  # 2 s
    assert abs(len(out) - 64000) <= 4


def test_rms_and_frames() -> None:
    assert rms_linear16(b"") == 0
    assert rms_linear16(b"\x00\x10" * 10) == 4096
    assert [len(f) for f in frames(b"x" * 400)] == [160, 160, 80]
