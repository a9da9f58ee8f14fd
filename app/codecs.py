"""Audio conversion between Twilio's mu-law 8 kHz and the agent's configured formats.

The default agent format is mu-law 8 kHz both ways, and then nothing here runs on the hot
path: the bridge moves bytes untouched. Any other format goes through a stateful
:class:`Transcoder`, which keeps resampler state and odd trailing bytes between chunks so a
stream split at arbitrary byte boundaries converts exactly like the unsplit stream.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Literal

if sys.version_info >= (3, 13):  # audioop left the stdlib; audioop-lts provides it
    import audioop as audioop  # re-exported: the one place that picks the module
else:  # pragma: no cover - exercised on 3.11/3.12 only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop as audioop

Encoding = Literal["mulaw", "alaw", "linear16"]
SUPPORTED_ENCODINGS: tuple[str, ...] = ("mulaw", "alaw", "linear16")

TWILIO_SAMPLE_RATE = 8000
FRAME_MS = 20
TWILIO_FRAME_BYTES = TWILIO_SAMPLE_RATE * FRAME_MS // 1000  # 160 bytes of mu-law


@dataclass(frozen=True, slots=True)
class AudioFormat:
    encoding: Encoding
    sample_rate: int

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == "linear16" else 1

    def bytes_for(self, seconds: float) -> int:
        return int(seconds * self.sample_rate) * self.bytes_per_sample


TWILIO_FORMAT = AudioFormat("mulaw", TWILIO_SAMPLE_RATE)


def to_linear16(data: bytes, encoding: str) -> bytes:
    if encoding == "mulaw":
        return audioop.ulaw2lin(data, 2)
    if encoding == "alaw":
        return audioop.alaw2lin(data, 2)
    if encoding == "linear16":
        return data
    raise ValueError(f"unsupported encoding {encoding!r}")


def from_linear16(data: bytes, encoding: str) -> bytes:
    if encoding == "mulaw":
        return audioop.lin2ulaw(data, 2)
    if encoding == "alaw":
        return audioop.lin2alaw(data, 2)
    if encoding == "linear16":
        return data
    raise ValueError(f"unsupported encoding {encoding!r}")


def rms_linear16(data: bytes) -> int:
    """Root-mean-square level of 16-bit little-endian PCM (0..32767)."""
    usable = len(data) - (len(data) % 2)
    return audioop.rms(data[:usable], 2) if usable else 0


class Transcoder:
    """Stateful one-direction converter: ``src`` bytes in, ``dst`` bytes out.

    Chunks may end mid-sample; the remainder is carried into the next call, never dropped.
    """

    __slots__ = ("_carry", "_dst", "_passthrough", "_rate_state", "_src")

    def __init__(self, src: AudioFormat, dst: AudioFormat) -> None:
        if src.encoding not in SUPPORTED_ENCODINGS or dst.encoding not in SUPPORTED_ENCODINGS:
            raise ValueError(f"cannot convert {src} to {dst}")
        self._src = src
        self._dst = dst
        self._passthrough = src == dst
        self._carry = b""
        self._rate_state: Any = None

    def convert(self, data: bytes) -> bytes:
        if self._passthrough:
            return data
        if self._carry:
            data = self._carry + data
            self._carry = b""
        width = self._src.bytes_per_sample
        extra = len(data) % width
        if extra:
            self._carry = data[-extra:]
            data = data[:-extra]
        if not data:
            return b""
        pcm = to_linear16(data, self._src.encoding)
        if self._src.sample_rate != self._dst.sample_rate:
            pcm, self._rate_state = audioop.ratecv(
                pcm, 2, 1, self._src.sample_rate, self._dst.sample_rate, self._rate_state
            )
        return from_linear16(pcm, self._dst.encoding)

    @property
    def pending_bytes(self) -> int:
        return len(self._carry)


def frames(data: bytes, frame_bytes: int = TWILIO_FRAME_BYTES) -> list[bytes]:
    """Split ``data`` into ``frame_bytes`` pieces; the last one may be shorter."""
    return [data[i : i + frame_bytes] for i in range(0, len(data), frame_bytes)]
