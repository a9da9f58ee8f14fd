"""Audio quality of every conversion a profile can ask for, measured on synthetic signals with
the functions ``callbridge bench-audio`` prints (so docs/audio.md's figures are these tests' method).

- a telephone-band tone comes through within 0.5 dB;
- going down to 8 kHz, tones above 4 kHz are attenuated by at least 60 dB (no aliases);
  going up from it, the images above 4 kHz are at least 60 dB down;
- a sweep cut into random chunks converts to the same samples as the whole sweep, and matches
  the ideal sweep at the target rate sample by sample (no click, gap, lost or extra sample).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.codecs import TWILIO_FORMAT, AudioFormat, audioop
from app.devtools.bench_audio import (
    AMPLITUDE,
    TELEPHONE_BAND_HZ,
    AudioPath,
    Direction,
    above_band_db,
    agent_paths,
    alias_db,
    convert,
    db,
    decode,
    encode,
    gain_db,
    image_db,
    middle,
    rms,
    sixteen_bit,
    stopband_tones,
    sweep,
    tone,
)

PATHS = agent_paths()
RESAMPLING = [p for p in PATHS if p.resamples]
DOWN = [p for p in RESAMPLING if p.src.sample_rate > p.dst.sample_rate]
UP = [p for p in RESAMPLING if p.src.sample_rate < p.dst.sample_rate]
PASSBAND_DB = 0.5
REJECTION_DB = -60.0
# a sweep's largest error against the ideal: mu-law's coarsest step is 1024 (error up to 512);
# a lost, repeated or out-of-place sample at 3 kHz is an error of the order of the amplitude
SWEEP_ERROR = 1000
SWEEP_S = 0.4


def ids(path: AudioPath) -> str:
    return path.name


def test_every_offered_format_is_measured() -> None:
    agent_side = {(p.direction, p.agent_format) for p in PATHS}
    assert len(agent_side) == len(PATHS) == 10
    assert {f.sample_rate for d, f in agent_side if d is Direction.TO_AGENT} == {8000, 16000, 24000, 48000}
    assert AudioFormat("alaw", 8000) in {f for d, f in agent_side if d is Direction.TO_CALLER}
    assert len(DOWN) == len(UP) == 3


@pytest.mark.parametrize("path", PATHS, ids=ids)
def test_telephone_band_tone_comes_through_within_half_a_db(path: AudioPath) -> None:
    for freq in TELEPHONE_BAND_HZ:
        assert abs(gain_db(path, freq)) <= PASSBAND_DB, f"{freq} Hz"


@pytest.mark.parametrize("path", DOWN, ids=ids)
def test_tones_above_the_target_nyquist_are_removed(path: AudioPath) -> None:
    tones = stopband_tones(path)
    assert min(tones) < 4200 and max(tones) > path.src.sample_rate / 2 - 200  # the whole stopband
    for freq in tones:
        assert alias_db(path, freq) <= REJECTION_DB, f"{freq} Hz at the caller"
        # mu-law turns tiny residues into silence; at 16 bits the filter itself is measured
        assert alias_db(sixteen_bit(path), freq) <= REJECTION_DB, f"{freq} Hz at 16 bits"


@pytest.mark.parametrize("path", UP, ids=ids)
def test_images_above_the_source_band_are_removed(path: AudioPath) -> None:
    for freq in TELEPHONE_BAND_HZ:
        assert image_db(path, freq) <= REJECTION_DB, f"{freq} Hz"


def test_the_measurement_sees_aliases() -> None:
    """The old resampler (audioop.ratecv, no anti-aliasing filter) measured the same way: a
    6 kHz tone at 24 kHz comes out at 2 kHz at full level, so a missing filter cannot pass."""
    pcm = encode(tone(6000, 24000), AudioFormat("linear16", 24000))
    out, _ = audioop.ratecv(pcm, 2, 1, 24000, 8000, None)
    level = db(rms(middle(decode(out, AudioFormat("linear16", 8000)), 8000)) / (AMPLITUDE / np.sqrt(2)))
    assert level > -1.0
    images = AudioPath(Direction.TO_AGENT, TWILIO_FORMAT, AudioFormat("linear16", 16000))
    up, _ = audioop.ratecv(encode(tone(1000, 8000), AudioFormat("linear16", 8000)), 2, 1, 8000, 16000, None)
    assert above_band_db(middle(decode(up, images.dst), 16000), 16000, 4000) > REJECTION_DB


def cuts_strategy(size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=0, max_value=size), max_size=40).map(sorted)


@pytest.mark.parametrize("path", PATHS, ids=ids)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_sweep_in_random_chunks_is_the_unsplit_sweep(path: AudioPath, data: st.DataObject) -> None:
    signal = encode(sweep(100, 3400, path.src.sample_rate, SWEEP_S), path.src)
    cuts = data.draw(cuts_strategy(len(signal)), label="cuts")
    whole = convert(path, signal)
    assert convert(path, signal, cuts) == whole
    # and the whole is the sweep at the target rate, sample for sample
    out = decode(whole, path.dst)
    ideal = sweep(100, 3400, path.dst.sample_rate, SWEEP_S)
    assert out.size == ideal.size  # nothing lost or added, flushed to the end
    error = middle(np.abs(out - ideal), path.dst.sample_rate)
    assert error.max() <= SWEEP_ERROR


@pytest.mark.parametrize("path", RESAMPLING, ids=ids)
def test_twenty_ms_frames_join_without_a_click(path: AudioPath) -> None:
    """The bridge's own cut: 20 ms frames, including odd ones (a 321-byte linear16 chunk)."""
    signal = encode(sweep(100, 3400, path.src.sample_rate, SWEEP_S), path.src)
    frame = path.src.bytes_for(0.02) + (1 if path.src.encoding == "linear16" else 0)
    out = decode(convert(path, signal, range(frame, len(signal), frame)), path.dst)
    ideal = sweep(100, 3400, path.dst.sample_rate, SWEEP_S)
    assert out.size == ideal.size
    assert middle(np.abs(out - ideal), path.dst.sample_rate).max() <= SWEEP_ERROR


def test_a_lost_sample_is_caught() -> None:
    """The sweep check is not blind: one sample dropped mid-stream fails it."""
    path = PATHS[0]
    signal = encode(sweep(100, 3400, 8000, SWEEP_S), path.src)
    damaged = signal[:1600] + signal[1601:] + signal[-1:]
    out = decode(convert(path, damaged), path.dst)
    ideal = sweep(100, 3400, 8000, SWEEP_S)
    assert middle(np.abs(out - ideal), 8000).max() > SWEEP_ERROR
