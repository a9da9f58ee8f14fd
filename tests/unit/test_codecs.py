"""Codecs: conversions keep length and state across arbitrary chunk boundaries; utterance ends
are flushed and leave the resampler clean."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.codecs import (
    AGENT_INPUT_ENCODINGS,
    AGENT_OUTPUT_ENCODINGS,
    AGENT_SAMPLE_RATES,
    TWILIO_FORMAT,
    AudioFormat,
    Transcoder,
    agent_sample_rates,
    frames,
    from_linear16,
    rms_linear16,
    to_linear16,
)
from app.devtools import synth

FORMATS = [
    TWILIO_FORMAT,
    AudioFormat("alaw", 8000),
    AudioFormat("linear16", 8000),
    AudioFormat("linear16", 16000),
    AudioFormat("linear16", 24000),
    AudioFormat("linear16", 48000),
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
    pending = whole.pending_bytes
    expected += whole.flush()
    split = Transcoder(src, dst)
    got = b"".join(split.convert(piece) for piece in chunked(data, cuts))
    assert split.pending_bytes == pending  # odd bytes are carried, never dropped
    got += split.flush()
    assert got == expected


def test_odd_byte_is_carried_to_next_chunk() -> None:
    t = Transcoder(AudioFormat("linear16", 8000), TWILIO_FORMAT)
    assert t.convert(b"\x00") == b""
    assert t.pending_bytes == 1
    assert len(t.convert(b"\x00\x00\x00")) == 2


def test_passthrough_is_identity_and_free() -> None:
    t = Transcoder(TWILIO_FORMAT, TWILIO_FORMAT)
    data = bytes(range(256))
    assert t.convert(data) is data
    assert t.flush() == b""


@given(st.binary(min_size=0, max_size=400))
def test_mulaw_roundtrip_is_stable_after_one_pass(data: bytes) -> None:
    once = from_linear16(to_linear16(data, "mulaw"), "mulaw")
    assert from_linear16(to_linear16(once, "mulaw"), "mulaw") == once
    assert len(once) == len(data)


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
def test_resampling_keeps_duration_once_flushed(rate: int) -> None:
    up = Transcoder(TWILIO_FORMAT, AudioFormat("linear16", rate))
    held = b"".join(up.convert(b"\xff" * 160) for _ in range(100))  # 2 s
    assert len(held) < rate * 2 * 2  # the resampler holds the end back...
    tail = up.flush()
    assert tail  # ...until the utterance ends
    assert len(held + tail) == rate * 2 * 2
    down = Transcoder(AudioFormat("linear16", rate), TWILIO_FORMAT)
    speech = synth.speech_like("one two three", rate)
    out = down.convert(speech) + down.flush()
    assert len(out) == round(len(speech) // 2 * 8000 / rate)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.sample_rate != 8000])
def test_flush_starts_the_next_utterance_clean(fmt: AudioFormat) -> None:
    """After flush, an utterance converts exactly as on a fresh Transcoder: nothing of the
    previous one leaks into it (no tail, no click)."""
    speech = synth.speech_like("hello there", fmt.sample_rate)
    fresh = Transcoder(fmt, TWILIO_FORMAT)
    alone = fresh.convert(speech) + fresh.flush()
    reused = Transcoder(fmt, TWILIO_FORMAT)
    reused.convert(synth.speech_like("something else first", fmt.sample_rate))
    reused.flush()
    assert reused.convert(speech) + reused.flush() == alone
    assert reused.flush() == b""  # nothing went in since: nothing comes out


def test_reset_drops_what_is_held() -> None:
    fmt = AudioFormat("linear16", 24000)
    speech = synth.speech_like("hello there", 24000)
    fresh = Transcoder(fmt, TWILIO_FORMAT)
    alone = fresh.convert(speech) + fresh.flush()
    interrupted = Transcoder(fmt, TWILIO_FORMAT)
    interrupted.convert(synth.speech_like("cut short", 24000) + b"\x01")
    assert interrupted.pending_bytes == 1
    interrupted.reset()
    assert interrupted.pending_bytes == 0
    assert interrupted.flush() == b""  # the interrupted speech is gone, not delayed
    assert interrupted.convert(speech) + interrupted.flush() == alone


def test_flush_drops_a_trailing_half_sample() -> None:
    t = Transcoder(AudioFormat("linear16", 16000), TWILIO_FORMAT)
    t.convert(synth.tone(440, 0.1, rate=16000) + b"\x7f")
    assert t.pending_bytes == 1
    assert len(t.flush()) > 0
    assert t.pending_bytes == 0


def test_agent_formats_offered() -> None:
    assert AGENT_INPUT_ENCODINGS == ("mulaw", "linear16")
    assert AGENT_OUTPUT_ENCODINGS == ("mulaw", "alaw", "linear16")
    assert agent_sample_rates("linear16") == AGENT_SAMPLE_RATES == (8000, 16000, 24000, 48000)
    assert agent_sample_rates("mulaw") == agent_sample_rates("alaw") == (8000,)


def test_rms_and_frames() -> None:
    assert rms_linear16(b"") == 0
    assert rms_linear16(b"\x00\x10" * 10) == 4096
    assert [len(f) for f in frames(b"x" * 400)] == [160, 160, 80]
