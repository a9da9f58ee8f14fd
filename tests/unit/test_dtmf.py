"""Keypad tones: the generator meets the DTMF figures, measured on its own mu-law output, and the
test peers' receiver hears exactly the keys sent and nothing in silence, tones, noise or speech.

The measurements here use their own tables and tools, not the module's: the nominal
frequencies are written out below, the mu-law is decoded by audioop, and levels are read
against G.711's digital milliwatt (the mu-law sequence that is 0 dBm0 by definition)."""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from app.codecs import TWILIO_FORMAT, audioop
from app.core.dtmf import DIGITS, MAX_DIGITS, check_digits, dtmf_ulaw, linear_to_ulaw
from app.devtools import synth
from app.devtools.dtmf_detect import DtmfDetector, detect_digits

Samples = npt.NDArray[np.float64]

RATE = 8000
FRAME = 160  # bytes of one 20 ms Twilio frame
# ITU-T Q.23, written out independently of app.core.dtmf: key -> (low Hz, high Hz).
NOMINAL: dict[str, tuple[int, int]] = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "A": (697, 1633),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477), "B": (770, 1633),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "C": (852, 1633),
    "*": (941, 1209), "0": (941, 1336), "#": (941, 1477), "D": (941, 1633),
}  # fmt: skip
# G.711 table 5: the digital milliwatt, a 1 kHz sine at 0 dBm0 as eight mu-law bytes.
DIGITAL_MILLIWATT = bytes([0x1E, 0x0B, 0x0B, 0x1E, 0x9E, 0x8B, 0x8B, 0x9E])
ALL_KEYS = "0123456789*#ABCD"

FREQUENCY_TOLERANCE = 0.015  # ITU-T Q.23: a generated tone within 1.5% of nominal
TONE_MS_RANGE = (70.0, 100.0)
MIN_GAP_MS = 60.0
TARGET_DBM0 = -10.0
LEVEL_TOLERANCE_DB = 1.0
TWIST_RANGE_DB = (1.0, 2.0)  # high tone above the low one
EDGE_MS = 5  # left out at each end of a tone when measuring its steady part (ramps are shorter)
MERGE_MS = 10  # zero samples inside a tone (near zero crossings) shorter than this are not a gap


def decode(ulaw: bytes) -> Samples:
    return np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype="<i2").astype(np.float64)


def encode(samples: Samples) -> bytes:
    clipped = np.clip(np.round(samples), -32768, 32767).astype("<i2")
    return audioop.lin2ulaw(clipped.tobytes(), 2)


def rms(samples: Samples) -> float:
    return float(np.sqrt(np.mean(samples * samples)))


# 0 dBm0 as an RMS in 16-bit linear, from the standard's own reference signal.
ZERO_DBM0_RMS = rms(decode(DIGITAL_MILLIWATT * 100))


def dbm0(rms_value: float) -> float:
    return 20 * math.log10(rms_value / ZERO_DBM0_RMS)


def bursts(samples: Samples) -> list[tuple[int, int]]:
    """(first, last) sample index of each run of sound, short zero runs inside bridged."""
    loud = np.flatnonzero(samples != 0)
    if loud.size == 0:
        return []
    index: list[int] = loud.tolist()
    breaks: list[int] = np.flatnonzero(np.diff(loud) > RATE * MERGE_MS // 1000).tolist()
    starts = [index[0], *(index[i + 1] for i in breaks)]
    ends = [*(index[i] for i in breaks), index[-1]]
    return list(zip(starts, ends, strict=True))


def amplitudes(samples: Samples, freqs: Samples) -> Samples:
    """Peak amplitude of the sine at each frequency: a Hann-windowed DFT evaluated there."""
    window = np.hanning(len(samples))
    n = np.arange(len(samples))
    basis = np.exp(-2j * np.pi * np.outer(freqs, n) / RATE)
    result: Samples = 2 * np.abs(basis @ (window * samples)) / window.sum()
    return result


def strongest_two(samples: Samples) -> list[tuple[float, float]]:
    """The two strongest components between 600 and 1700 Hz: (frequency, amplitude), sorted by
    frequency. A 1 Hz scan finds the peaks, a 0.01 Hz scan around each refines them."""
    scan = np.arange(600.0, 1700.0, 1.0)
    spectrum = amplitudes(samples, scan)
    peaks = [i for i in range(1, len(scan) - 1) if spectrum[i - 1] <= spectrum[i] >= spectrum[i + 1]]
    peaks.sort(key=lambda i: -spectrum[i])
    first = peaks[0]
    # the second must lie outside the first's main lobe (the Hann window's is +-2 bins, < 30 Hz)
    second = next(i for i in peaks if abs(scan[i] - scan[first]) > 60)
    found = []
    for i in (first, second):
        fine = np.arange(scan[i] - 1, scan[i] + 1, 0.01)
        fine_spectrum = amplitudes(samples, fine)
        best = int(np.argmax(fine_spectrum))
        found.append((float(fine[best]), float(fine_spectrum[best])))
    return sorted(found)


@dataclass(frozen=True)
class Tone:
    key: str
    duration_ms: float
    gap_after_ms: float
    low_hz: float
    high_hz: float
    low_dbm0: float
    high_dbm0: float


@functools.cache
def measured() -> tuple[Tone, ...]:
    """Every key, sent once in a row, measured from the decoded audio."""
    samples = decode(dtmf_ulaw(ALL_KEYS))
    runs = bursts(samples)
    assert len(runs) == len(ALL_KEYS)
    edge = RATE * EDGE_MS // 1000
    tones = []
    for k, (key, (start, end)) in enumerate(zip(ALL_KEYS, runs, strict=True)):
        following = runs[k + 1][0] if k + 1 < len(runs) else len(samples)
        (low, low_amp), (high, high_amp) = strongest_two(samples[start + edge : end + 1 - edge])
        tones.append(
            Tone(
                key=key,
                duration_ms=(end + 1 - start) * 1000 / RATE,
                gap_after_ms=(following - end - 1) * 1000 / RATE,
                low_hz=low,
                high_hz=high,
                low_dbm0=dbm0(low_amp / math.sqrt(2)),
                high_dbm0=dbm0(high_amp / math.sqrt(2)),
            )
        )
    return tuple(tones)


# --- the generator ------------------------------------------------------------------------


def test_the_reference_level_is_g711s() -> None:
    """The digital milliwatt decodes to a sine 3.17 dB below mu-law's full-scale sine."""
    full_scale_sine_rms = 32767 / math.sqrt(2)
    assert 20 * math.log10(ZERO_DBM0_RMS / full_scale_sine_rms) == pytest.approx(-3.17, abs=0.05)


@pytest.mark.parametrize("index", range(len(ALL_KEYS)), ids=list(ALL_KEYS))
def test_each_key_sounds_its_two_frequencies(index: int) -> None:
    tone = measured()[index]
    low, high = NOMINAL[tone.key]
    assert abs(tone.low_hz - low) <= low * FREQUENCY_TOLERANCE, tone
    assert abs(tone.high_hz - high) <= high * FREQUENCY_TOLERANCE, tone


@pytest.mark.parametrize("index", range(len(ALL_KEYS)), ids=list(ALL_KEYS))
def test_each_tone_and_pause_lasts_long_enough(index: int) -> None:
    tone = measured()[index]
    assert TONE_MS_RANGE[0] <= tone.duration_ms <= TONE_MS_RANGE[1], tone
    assert tone.gap_after_ms >= MIN_GAP_MS, tone


@pytest.mark.parametrize("index", range(len(ALL_KEYS)), ids=list(ALL_KEYS))
def test_each_tone_is_near_minus_10_dbm0_with_the_high_one_louder(index: int) -> None:
    tone = measured()[index]
    assert abs(tone.low_dbm0 - TARGET_DBM0) <= LEVEL_TOLERANCE_DB, tone
    assert abs(tone.high_dbm0 - TARGET_DBM0) <= LEVEL_TOLERANCE_DB, tone
    assert TWIST_RANGE_DB[0] <= tone.high_dbm0 - tone.low_dbm0 <= TWIST_RANGE_DB[1], tone


@pytest.mark.parametrize("keys", ["1", "12", "123", "0123456789*#ABCD", "#" * MAX_DIGITS])
def test_the_audio_is_whole_frames_one_tone_per_key(keys: str) -> None:
    audio = dtmf_ulaw(keys)
    assert len(audio) % FRAME == 0
    assert len(bursts(decode(audio))) == len(keys)
    assert audio.endswith(b"\xff" * (RATE * int(MIN_GAP_MS) // 1000))


def test_the_same_key_gives_the_same_audio_each_time() -> None:
    one = dtmf_ulaw("5")
    assert dtmf_ulaw("555") == one * 3


def test_the_encoder_is_g711_mu_law() -> None:
    """Same bytes as audioop's encoder wherever its 14-bit input loses nothing (multiples of 4)."""
    values = range(-32768, 32768, 4)
    ours = bytes(linear_to_ulaw(v) for v in values)
    assert ours == audioop.lin2ulaw(np.array(values, dtype="<i2").tobytes(), 2)


@pytest.mark.parametrize("keys", ["1", "0123456789*#ABCD", "9" * MAX_DIGITS])
def test_valid_keys_pass(keys: str) -> None:
    assert check_digits(keys) is None


@pytest.mark.parametrize("keys", ["", "1" * (MAX_DIGITS + 1), "12x", "12a", "1 2", "+1"])
def test_invalid_keys_are_refused_with_a_reason(keys: str) -> None:
    reason = check_digits(keys)
    assert reason
    with pytest.raises(ValueError, match=re.escape(reason)):
        dtmf_ulaw(keys)


def test_the_alphabet_is_the_keypad() -> None:
    assert sorted(DIGITS) == sorted(NOMINAL)


# --- the receiver -------------------------------------------------------------------------


def sines(*tones: tuple[float, float], ms: int = 200) -> Samples:
    """The sum of (frequency, dBm0) sines."""
    n = np.arange(RATE * ms // 1000)
    peak = ZERO_DBM0_RMS * math.sqrt(2)
    total: Samples = sum(
        (peak * 10 ** (level / 20) * np.sin(2 * np.pi * freq * n / RATE + k) for k, (freq, level) in enumerate(tones)),
        start=np.zeros(len(n)),
    )
    return total


def pair(low: float, high: float, low_dbm0: float, high_dbm0: float, ms: int = 80) -> bytes:
    """A key's two sines at the given levels, without ramps, as mu-law."""
    return encode(sines((low, low_dbm0), (high, high_dbm0), ms=ms))


SILENCE_100MS = b"\xff" * (RATE // 10)


def test_the_receiver_hears_every_key() -> None:
    assert detect_digits(dtmf_ulaw(ALL_KEYS)) == ALL_KEYS


def test_frame_by_frame_feeding_hears_the_same_keys() -> None:
    audio = dtmf_ulaw("1*#")
    detector = DtmfDetector()
    heard = [key for start in range(0, len(audio), FRAME) for key in detector.feed(audio[start : start + FRAME])]
    assert heard == ["1", "*", "#"]


def test_any_chunking_hears_the_same_keys() -> None:
    audio = dtmf_ulaw("159D")
    chunks = random.Random(7)
    detector = DtmfDetector()
    heard: list[str] = []
    start = 0
    while start < len(audio):
        size = chunks.randint(1, 300)
        heard += detector.feed(audio[start : start + size])
        start += size
    assert "".join(heard) == "159D"


@pytest.mark.parametrize("keys", ["11", "0000", "#*#*"])
def test_a_repeated_key_is_heard_once_per_press(keys: str) -> None:
    assert detect_digits(dtmf_ulaw(keys)) == keys


def test_a_held_key_is_one_press_and_a_change_of_key_is_another() -> None:
    one, two = NOMINAL["1"], NOMINAL["2"]
    assert detect_digits(pair(*one, -10.75, -9.25, ms=400)) == "1"
    assert detect_digits(pair(*one, -10.75, -9.25) + pair(*two, -10.75, -9.25)) == "12"


@pytest.mark.parametrize("offset", [1 - FREQUENCY_TOLERANCE, 1 + FREQUENCY_TOLERANCE])
def test_tones_off_nominal_by_the_tolerance_are_heard(offset: float) -> None:
    audio = b"".join(pair(low * offset, high * offset, -10.75, -9.25) + SILENCE_100MS for low, high in NOMINAL.values())
    assert detect_digits(audio) == "".join(NOMINAL)


# The receiver measures twist to about +-1.5 dB per block, so each case is 2 dB from a limit.
@pytest.mark.parametrize(
    ("low_dbm0", "high_dbm0", "heard"),
    [
        (-11.0, -9.0, True),  # high 2 dB above low: within the 4 dB allowed
        (-13.0, -7.0, False),  # 6 dB
        (-7.0, -13.0, True),  # low 6 dB above high: within the 8 dB allowed
        (-5.0, -15.0, False),  # 10 dB
        (-27.0, -27.0, True),  # quiet but above the -30 dBm0 floor
        (-33.0, -33.0, False),
    ],
)
def test_twist_and_level_limits(low_dbm0: float, high_dbm0: float, heard: bool) -> None:
    audio = b"".join(pair(low, high, low_dbm0, high_dbm0) + SILENCE_100MS for low, high in NOMINAL.values())
    assert detect_digits(audio) == ("".join(NOMINAL) if heard else "")


@pytest.mark.parametrize(("low_dbm0", "high_dbm0"), [(-12.0, -8.0), (-6.0, -14.0)])
def test_a_key_at_a_limit_is_heard_at_most_once(low_dbm0: float, high_dbm0: float) -> None:
    """At exactly 4 dB or 8 dB twist blocks flip between accepted and not: still one press."""
    for lead in range(0, 105, 15):
        audio = b"\xff" * lead
        audio += b"".join(
            pair(low, high, low_dbm0, high_dbm0, ms=200) + SILENCE_100MS for low, high in NOMINAL.values()
        )
        heard = detect_digits(audio)
        assert len(set(heard)) == len(heard), heard


@pytest.mark.parametrize("lead", range(0, 105, 7))
def test_a_40_ms_tone_is_heard_a_10_ms_one_is_not(lead: int) -> None:
    """Whatever the alignment with the receiver's blocks."""
    silence = b"\xff" * lead
    assert detect_digits(silence + pair(*NOMINAL["5"], -10.75, -9.25, ms=40) + SILENCE_100MS) == "5"
    assert detect_digits(silence + pair(*NOMINAL["5"], -10.75, -9.25, ms=10) + SILENCE_100MS) == ""


@pytest.mark.parametrize(
    "tones",
    [
        ((697, -10.0), (770, -10.0), (1209, -10.0)),  # two keys of one column at once
        ((852, -10.0), (1336, -10.0), (1477, -10.0)),  # two keys of one row at once
        ((941, -10.0), (852, -13.0), (1633, -10.0)),  # the second row tone only 3 dB down
    ],
)
def test_a_third_keypad_tone_is_no_key(tones: tuple[tuple[float, float], ...]) -> None:
    """Each group's tone must stand clear of the rest of its group."""
    assert detect_digits(encode(sines(*tones))) == ""


@pytest.mark.parametrize(("noise_dbm0", "heard"), [(-30.0, True), (-3.0, False)])
def test_a_key_must_carry_most_of_the_energy(noise_dbm0: float, heard: bool) -> None:
    """A key 20 dB above the noise is heard; one buried under it (its tones would still stand out
    of their groups) is not."""
    key = sines((770, -10.75), (1477, -9.25), ms=400)
    noise = np.random.default_rng(5).normal(0.0, ZERO_DBM0_RMS * 10 ** (noise_dbm0 / 20), len(key))
    assert detect_digits(encode(key + noise)) == ("6" if heard else "")


def test_silence_is_no_key() -> None:
    assert detect_digits(b"\xff" * RATE * 2) == ""


@pytest.mark.parametrize("level_dbm0", [-20.0, -10.0, 0.0])
def test_a_single_tone_is_no_key(level_dbm0: float) -> None:
    n = np.arange(RATE * 2)
    samples = ZERO_DBM0_RMS * math.sqrt(2) * 10 ** (level_dbm0 / 20) * np.sin(2 * np.pi * 1000 * n / RATE)
    assert detect_digits(encode(samples)) == ""


@pytest.mark.parametrize("level_dbm0", [-30.0, -15.0, -5.0])
def test_noise_is_no_key(level_dbm0: float) -> None:
    noise = np.random.default_rng(20240611).normal(0.0, ZERO_DBM0_RMS * 10 ** (level_dbm0 / 20), RATE * 10)
    assert detect_digits(encode(noise)) == ""


def test_speech_is_no_key() -> None:
    text = "Hello, thanks for calling. Press one for sales, two for support, or stay on the line for an operator."
    audio = synth.encode(synth.speech_like(text), TWILIO_FORMAT)
    assert len(audio) > RATE * 5
    assert detect_digits(audio) == ""
