"""A keypad-tone (DTMF) receiver for the test peers: a simulated phone menu "hears" keys.

It listens the way a network's receiver does, so a key counts only if the audio really is a
keypad tone: the audio is cut into blocks of 105 samples (13.1 ms at 8 kHz) and the Goertzel
algorithm measures, per block, the energy at each of the eight keypad frequencies. A block
holds a key when the strongest low-group and high-group tones each clearly beat the other
three of their group, are both loud enough, are within the allowed level difference (twist)
of each other, and together carry most of the block's energy; speech, noise and single tones
fail at least one of these.
A key is reported once per press: it must hold for two blocks in a row, and the same key
counts again only after a block in which it no longer sounds.

105 samples is the classic block at 8 kHz: its resolution is 76 Hz, so a tone's nearest
neighbour in its group (73 to 156 Hz away) falls near or beyond the first null of the block's
response, and a 40 ms tone, the shortest receivers are built for, always contains two whole
blocks (320 samples >= 3 x 105 - 1), enough for the two-block rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.core.dtmf import HIGH_GROUP_HZ, KEYPAD, LOW_GROUP_HZ, SAMPLE_RATE, amplitude

BLOCK_SAMPLES = 105  # one analysis block: 13.1 ms at 8 kHz, 76 Hz resolution
# Each group's strongest tone must carry this many dB more than the other three of its group.
# Measured on 105-sample blocks: a clean key pair wins by 12 dB, tones 1.5% off nominal by
# about 10 dB (a rectangular block leaks into the neighbours), while a second tone in a group
# (two keys at once) brings it near 0 dB; 6 dB sits between with room on both sides.
MIN_MARGIN_DB = 6.0
# Level difference allowed between the two tones: the high tone up to 4 dB above the low one,
# the low tone up to 8 dB above the high one (lines lose more of the high frequencies). A block
# measures it to about +-1.5 dB (the louder tone leaks into the other's bin: worst for the
# closest pair, 941 and 1209 Hz), so a pair within 1.5 dB of a limit may go either way.
MAX_HIGH_OVER_LOW_DB = 4.0
MAX_LOW_OVER_HIGH_DB = 8.0
# Weakest tone accepted, in dBm0 per tone: 20 dB below the usual sending level, far above
# mu-law's idle-channel noise.
MIN_TONE_DBM0 = -30.0
# Share of the block's energy the two tones must carry together: about 1 for a clean key,
# 0.75 for tones 1.5% off nominal, a few percent for noise; speech and music rarely put
# most of their energy on one row and one column tone at once.
MIN_TONE_SHARE = 0.5
PRESENT_BLOCKS = 2  # blocks in a row a key must hold before it counts (a click or glitch does not)
RELEASE_BLOCKS = 1  # blocks without the key before it counts again (two presses, not one held key)

_MULAW_BIAS = 0x84


def _ulaw_to_linear(byte: int) -> int:
    """G.711 mu-law decoding: the byte's inverted bits are sign, exponent, mantissa."""
    bits = ~byte & 0xFF
    exponent = (bits >> 4) & 0x07
    magnitude = ((((bits & 0x0F) << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return -magnitude if bits & 0x80 else magnitude


_ULAW_TABLE: tuple[int, ...] = tuple(_ulaw_to_linear(byte) for byte in range(256))
_FREQUENCIES: tuple[int, ...] = LOW_GROUP_HZ + HIGH_GROUP_HZ
_COEFFICIENTS: tuple[float, ...] = tuple(2 * math.cos(2 * math.pi * f / SAMPLE_RATE) for f in _FREQUENCIES)
# Goertzel power of a sine with peak amplitude A, evaluated at its own frequency: (A * N / 2) ** 2.
_MIN_TONE_POWER = (amplitude(MIN_TONE_DBM0) * BLOCK_SAMPLES / 2) ** 2
_MARGIN = 10 ** (MIN_MARGIN_DB / 10)
_MAX_HIGH_OVER_LOW = 10 ** (MAX_HIGH_OVER_LOW_DB / 10)
_MAX_LOW_OVER_HIGH = 10 ** (MAX_LOW_OVER_HIGH_DB / 10)


def _powers(block: list[int]) -> list[float]:
    """Goertzel power at each keypad frequency (low group first)."""
    powers = []
    for coeff in _COEFFICIENTS:
        s1 = s2 = 0.0
        for x in block:
            s1, s2 = x + coeff * s1 - s2, s1
        powers.append(s1 * s1 + s2 * s2 - coeff * s1 * s2)
    return powers


@dataclass(frozen=True, slots=True)
class BlockVerdict:
    """What one block holds. ``sounding``: the key whose row and column tones are the strongest
    of their groups, both above the level floor (None if either is below it). ``accepted``: the
    block also passes the twist, margin and energy-share tests, so it may start a press."""

    sounding: str | None
    accepted: bool


def classify_block(block: list[int]) -> BlockVerdict:
    """Judge one block of linear samples."""
    powers = _powers(block)
    groups = len(LOW_GROUP_HZ)
    row = max(range(groups), key=lambda i: powers[i])
    column = max(range(groups), key=lambda i: powers[groups + i])
    low, high = powers[row], powers[groups + column]
    if min(low, high) < _MIN_TONE_POWER:
        return BlockVerdict(None, False)
    key = KEYPAD[row][column]
    if high > low * _MAX_HIGH_OVER_LOW or low > high * _MAX_LOW_OVER_HIGH:
        return BlockVerdict(key, False)
    next_low = max(p for i, p in enumerate(powers[:groups]) if i != row)
    next_high = max(p for i, p in enumerate(powers[groups:]) if i != column)
    if next_low * _MARGIN > low or next_high * _MARGIN > high:
        return BlockVerdict(key, False)
    energy = sum(x * x for x in block)
    # a sine's Goertzel power is (A N / 2)^2 and its energy A^2 N / 2: the share is 1 for a clean pair
    return BlockVerdict(key, 2 * (low + high) >= MIN_TONE_SHARE * len(block) * energy)


class DtmfDetector:
    """Stateful: feed consecutive mu-law chunks of one stream, of any size; each call returns
    the keys whose press completed in that chunk. Splitting the stream differently gives the
    same keys.

    A press starts after ``PRESENT_BLOCKS`` accepted blocks of one key in a row and ends after
    ``RELEASE_BLOCKS`` blocks in which that key no longer sounds (silence, noise, another key).
    Ending on "no longer sounds" rather than "not accepted" is the hysteresis: a tone near a
    limit, accepted in one block and not the next, stays one press instead of several.
    """

    def __init__(self) -> None:
        self._pending: list[int] = []  # samples not yet making a whole block
        self._candidate: str | None = None  # key accepted in the last block
        self._run = 0  # blocks in a row accepting _candidate
        self._held: str | None = None  # key reported and not yet released
        self._gone = 0  # blocks in a row in which _held does not sound

    def feed(self, ulaw: bytes) -> list[str]:
        self._pending.extend(_ULAW_TABLE[byte] for byte in ulaw)
        keys = []
        whole = len(self._pending) - len(self._pending) % BLOCK_SAMPLES
        for start in range(0, whole, BLOCK_SAMPLES):
            key = self._step(classify_block(self._pending[start : start + BLOCK_SAMPLES]))
            if key is not None:
                keys.append(key)
        del self._pending[:whole]
        return keys

    def _step(self, verdict: BlockVerdict) -> str | None:
        """Debounce one block's verdict; the key if a press starts here."""
        if verdict.sounding == self._held:
            self._gone = 0
        else:
            self._gone += 1
            if self._gone >= RELEASE_BLOCKS:
                self._held = None
        key = verdict.sounding if verdict.accepted else None
        self._run = self._run + 1 if key is not None and key == self._candidate else int(key is not None)
        self._candidate = key
        if key is not None and key != self._held and self._run >= PRESENT_BLOCKS:
            self._held = key
            self._gone = 0
            return key
        return None


def detect_digits(ulaw: bytes) -> str:
    """Every key pressed in a whole mu-law 8 kHz recording, in order."""
    return "".join(DtmfDetector().feed(ulaw))
