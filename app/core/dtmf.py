"""Keypad tones (DTMF) as mu-law audio, for pressing keys on the far end's phone menu.

Why in-band: once a call is up, the only thing the bridge can put on the line is the mu-law of
the Twilio media stream. An automated menu on the other side listens to that audio for key
presses, so the keys have to be sounds: for each key the two sine tones a telephone keypad
makes, one from a low group (the keypad's row) and one from a high group (its column). The
result here is ordinary outbound audio, sent like any other.

Where the numbers come from:
- the eight frequencies and the 4 x 4 keypad layout are those of ITU-T Q.23 (the same table
  every telephone keypad uses);
- durations: ITU-T Q.24 lists, network by network, what keypad receivers must accept; tones
  and pauses of 40 ms are typical minimums. 80 ms of tone and 80 ms of pause leave a wide
  margin and are still quick (0.16 s per key); a menu never hears a key held down, nor two
  keys run together;
- level: around -10 dBm0 per tone is the usual sending level. The high tone goes slightly
  louder than the low one (the "twist") because lines lose more of the higher frequencies.
  Here the pair sits either side of -10 dBm0, 1.5 dB apart;
- ramps: a tone switched on or off abruptly clicks, which spreads energy across the band; a
  3 ms raised-cosine fade at each end keeps the spectrum to the two tones.

The tones of each key are computed once at import and encoded to G.711 mu-law here, so this
module needs only ``math``: it belongs to the sans-I/O core.
"""

from __future__ import annotations

import math

# The keys: A-D are the keypad's fourth column, which most handsets lack but the standard
# defines. Upper-case only: a caller taking keys from a person or a model normalises with
# ``str.upper()`` before checking.
DIGITS = "0123456789*#ABCD"
# Most keys one request may send: a phone number with an extension and a PIN fits, and the
# audio stays short (32 keys are 5.12 s).
MAX_DIGITS = 32

SAMPLE_RATE = 8000  # Twilio media streams: mu-law at 8 kHz
FRAME_BYTES = 160  # one 20 ms Twilio media frame; the output is a whole number of them

# ITU-T Q.23: the row tones (low group) and the column tones (high group), in Hz.
LOW_GROUP_HZ: tuple[int, ...] = (697, 770, 852, 941)
HIGH_GROUP_HZ: tuple[int, ...] = (1209, 1336, 1477, 1633)
# The keypad: KEYPAD[row][column] is the key sounding LOW_GROUP_HZ[row] + HIGH_GROUP_HZ[column].
KEYPAD: tuple[str, ...] = ("123A", "456B", "789C", "*0#D")

TONE_MS = 80  # each key's tone, ramps included (receivers typically need 40 ms; 70-100 ms is usual)
GAP_MS = 80  # silence after each key (receivers typically need 40 ms; at least 60 ms here)
RAMP_MS = 3  # raised-cosine fade in and out, inside TONE_MS: no click, no spectral splatter

# Levels in dBm0 per tone. The pair averages -10 dBm0 with the high tone 1.5 dB above the low
# one (the "twist"), both within 0.75 dB of -10 dBm0.
LOW_TONE_DBM0 = -10.75
HIGH_TONE_DBM0 = -9.25
# G.711: the largest sine mu-law can carry (peak at the top of its range) is +3.17 dBm0. In
# 16-bit linear that peak is full scale, 32767 (mu-law's own top, 8159 in its 14-bit units,
# is 32636: 0.03 dB lower, immaterial).
MULAW_FULL_SCALE_DBM0 = 3.17
PCM_FULL_SCALE = 32767
# So a tone at L dBm0 has peak amplitude 32767 * 10 ** ((L - 3.17) / 20), i.e. it sits at
# L - 3.17 dBFS (full-scale sine = 0 dBFS): -10 dBm0 is -13.17 dBFS, a peak of about 7193 and
# an RMS of about 5087. Note the RMS is the peak / sqrt(2): a sine whose RMS were
# 32767 * 10 ** (-13.17 / 20) would be 3 dB too loud.
#   low tone  -10.75 dBm0 = -13.92 dBFS: peak 6598, RMS 4666
#   high tone  -9.25 dBm0 = -12.42 dBFS: peak 7842, RMS 5545
# The two together peak at 14440, far from mu-law's clipping point (32635).

# G.711 mu-law encoding (16-bit input): add a bias so every segment starts on a power of two,
# then keep the segment number (exponent) and the four bits after the leading one (mantissa).
MULAW_BIAS = 0x84
MULAW_CLIP = 32635  # largest magnitude before the bias; 32635 + 0x84 = 32767
MULAW_SILENCE = 0xFF  # the mu-law byte for 0

_TONE_SAMPLES = SAMPLE_RATE * TONE_MS // 1000
_GAP_SAMPLES = SAMPLE_RATE * GAP_MS // 1000
_RAMP_SAMPLES = SAMPLE_RATE * RAMP_MS // 1000


def check_digits(digits: str) -> str | None:
    """None when ``digits`` can be sent as keypad tones, else why not (a short sentence).

    Valid: 1 to ``MAX_DIGITS`` characters, each one of ``DIGITS`` (A-D upper-case only).
    """
    if not digits:
        return "no digits given"
    if len(digits) > MAX_DIGITS:
        return f"{len(digits)} digits given, at most {MAX_DIGITS} are allowed"
    for char in digits:
        if char not in DIGITS:
            return f"{char!r} is not a keypad key (0-9, *, #, A-D in upper case)"
    return None


def tone_pair(digit: str) -> tuple[int, int]:
    """The (low, high) frequencies in Hz of one key."""
    for row, keys in enumerate(KEYPAD):
        column = keys.find(digit)
        if column >= 0 and len(digit) == 1:
            return LOW_GROUP_HZ[row], HIGH_GROUP_HZ[column]
    raise ValueError(f"{digit!r} is not a keypad key")


def amplitude(level_dbm0: float) -> float:
    """Peak 16-bit amplitude of a sine at ``level_dbm0``."""
    return PCM_FULL_SCALE * 10 ** ((level_dbm0 - MULAW_FULL_SCALE_DBM0) / 20)


def linear_to_ulaw(sample: int) -> int:
    """One 16-bit sample as a G.711 mu-law byte."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sample < 0 else sample, MULAW_CLIP) + MULAW_BIAS
    exponent = (magnitude >> 7).bit_length() - 1  # magnitude >> 7 is 1..255: exponent 0..7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _envelope(i: int) -> float:
    """Gain of sample ``i`` of a tone: a raised-cosine rise and fall, 1 in between."""
    edge = min(i, _TONE_SAMPLES - 1 - i)
    if edge >= _RAMP_SAMPLES:
        return 1.0
    # sampled at half-sample offsets, so neither end of the ramp is exactly 0 or 1
    return 0.5 - 0.5 * math.cos(math.pi * (edge + 0.5) / _RAMP_SAMPLES)


def _tone_ulaw(digit: str) -> bytes:
    low, high = tone_pair(digit)
    low_peak, high_peak = amplitude(LOW_TONE_DBM0), amplitude(HIGH_TONE_DBM0)
    step_low, step_high = 2 * math.pi * low / SAMPLE_RATE, 2 * math.pi * high / SAMPLE_RATE
    return bytes(
        linear_to_ulaw(round(_envelope(i) * (low_peak * math.sin(step_low * i) + high_peak * math.sin(step_high * i))))
        for i in range(_TONE_SAMPLES)
    )


# Each key's tone followed by its gap, computed once (16 x 1280 bytes).
_KEY_AUDIO: dict[str, bytes] = {digit: _tone_ulaw(digit) + bytes([MULAW_SILENCE]) * _GAP_SAMPLES for digit in DIGITS}


def dtmf_ulaw(digits: str) -> bytes:
    """mu-law 8 kHz audio of ``digits``: per key a tone then a pause, padded with silence to
    whole 20 ms frames. Raises ``ValueError`` (with ``check_digits``'s reason) if invalid."""
    problem = check_digits(digits)
    if problem is not None:
        raise ValueError(problem)
    audio = b"".join(_KEY_AUDIO[digit] for digit in digits)
    short = -len(audio) % FRAME_BYTES
    return audio + bytes([MULAW_SILENCE]) * short
