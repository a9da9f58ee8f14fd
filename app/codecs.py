"""Audio conversion between Twilio's mu-law 8 kHz and the agent's configured formats.

The default agent format is mu-law 8 kHz both ways, and then nothing here runs on the hot
path: the bridge moves bytes untouched. Any other format goes through a stateful
:class:`Transcoder`, which keeps resampler state and odd trailing bytes between chunks so a
stream split at arbitrary byte boundaries converts exactly like the unsplit stream.

Rate changes go through libsoxr (the ``soxr`` package), a band-limited resampler: unlike
``audioop.ratecv``, which has no anti-aliasing filter, it removes what the target rate cannot
carry instead of folding it back into the telephone band. The figures are in
docs/audio.md and come from ``callbridge bench-audio``.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import soxr

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

# What an agent profile may ask for (checked at start-up by app.config). mu-law and A-law are
# telephone codecs, 8 kHz only; linear16 at the rates Deepgram's own examples use, each an
# integer multiple of Twilio's 8 kHz. Deepgram takes A-law input too, but the bridge does not
# offer it: nothing gains from turning the caller's mu-law into A-law.
AGENT_INPUT_ENCODINGS: tuple[str, ...] = ("mulaw", "linear16")
AGENT_OUTPUT_ENCODINGS: tuple[str, ...] = ("mulaw", "alaw", "linear16")
AGENT_SAMPLE_RATES: tuple[int, ...] = (8000, 16000, 24000, 48000)

# libsoxr's "medium quality" recipe, chosen by measurement (callbridge bench-audio,
# docs/audio.md): flat to 3.6 kHz (the whole telephone band) and more than 100 dB of alias rejection,
# far beyond what mu-law carries, with the least held-back audio of the recipes that keep the
# telephone band: HQ and VHQ add rejection nobody can hear and hold back up to 175 ms against
# 118 ms; LQ cuts 3.4 kHz by 8 dB.
RESAMPLER_QUALITY = "MQ"


def agent_sample_rates(encoding: str) -> tuple[int, ...]:
    """The sample rates an agent profile may pair with ``encoding``."""
    return AGENT_SAMPLE_RATES if encoding == "linear16" else (TWILIO_SAMPLE_RATE,)


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


class _Stream(Protocol):
    """The part of ``soxr.ResampleStream`` used here (the package ships no type hints)."""

    def resample_chunk(self, x: npt.NDArray[np.float32], last: bool = False) -> npt.NDArray[np.float32]: ...

    def clear(self) -> None: ...


_NO_SAMPLES: npt.NDArray[np.float32] = np.zeros(0, dtype=np.float32)


def _samples(pcm: bytes) -> npt.NDArray[np.float32]:
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float32)


def _pcm(samples: npt.NDArray[np.float32]) -> bytes:
    """Round to 16 bits, clipping what the filter's ripple pushed past full scale."""
    return bytes(np.clip(np.rint(samples), -32768, 32767).astype(np.int16).tobytes())


class Transcoder:
    """Stateful one-direction converter: ``src`` bytes in, ``dst`` bytes out.

    Chunks may end mid-sample; the remainder is carried into the next call, never dropped.
    mu-law 8 kHz to mu-law 8 kHz is passthrough: ``convert`` returns its argument, no copy.

    When the rates differ, a libsoxr stream (one per Transcoder, so per call and per
    direction) filters and resamples. It works on float32, where splitting the input anywhere
    gives the same output samples as the unsplit stream (its int16 mode dithers, which does
    not). It holds back the end of what it was given until more comes or ``flush`` is called;
    measured with 20 ms frames (``callbridge bench-audio``), the audio held back, worst case /
    on average:

    ======================  ===================
    8 kHz -> 16 kHz         118 ms / 63 ms
    8 kHz -> 24 kHz         75 ms / 43 ms
    8 kHz -> 48 kHz         92 ms / 53 ms
    16 kHz -> 8 kHz         118 ms / 63 ms
    24 kHz -> 8 kHz         75 ms / 43 ms
    48 kHz -> 8 kHz         75 ms / 43 ms
    codec only (8 kHz)      0 ms
    ======================  ===================

    libsoxr filters in blocks, so the output comes in bursts of about 100 ms rather than
    frame by frame. Agent speech arrives faster than real time and is flushed at the end of
    each utterance, so only its first burst waits; the caller's audio to a 16-48 kHz agent
    reaches it up to the worst-case figure late.
    """

    __slots__ = ("_carry", "_dst", "_fed", "_passthrough", "_resampler", "_src")

    def __init__(self, src: AudioFormat, dst: AudioFormat) -> None:
        if src.encoding not in SUPPORTED_ENCODINGS or dst.encoding not in SUPPORTED_ENCODINGS:
            raise ValueError(f"cannot convert {src} to {dst}")
        self._src = src
        self._dst = dst
        self._passthrough = src == dst
        self._carry = b""
        self._fed = False  # samples went into the resampler since it was last emptied
        self._resampler: _Stream | None = None
        if src.sample_rate != dst.sample_rate:
            stream: Any = soxr.ResampleStream(
                src.sample_rate, dst.sample_rate, 1, dtype="float32", quality=RESAMPLER_QUALITY
            )
            self._resampler = stream

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
        if self._resampler is not None:
            self._fed = True
            out = self._resampler.resample_chunk(_samples(pcm))
            if not out.size:
                return b""
            pcm = _pcm(out)
        return from_linear16(pcm, self._dst.encoding)

    def flush(self) -> bytes:
        """The end of an utterance: what the resampler still holds, converted; afterwards the
        next utterance starts from silence, as a fresh Transcoder would (no click, no tail of
        this one). A trailing half sample (an odd byte of linear16) cannot be played: dropped."""
        self._carry = b""
        if self._resampler is None or not self._fed:
            return b""
        tail = self._resampler.resample_chunk(_NO_SAMPLES, last=True)
        self._resampler.clear()
        self._fed = False
        return from_linear16(_pcm(tail), self._dst.encoding) if tail.size else b""

    def reset(self) -> None:
        """Forget what is held without producing it (barge-in: that speech is not to be heard)."""
        self._carry = b""
        if self._resampler is not None and self._fed:
            self._resampler.clear()
            self._fed = False

    @property
    def pending_bytes(self) -> int:
        return len(self._carry)


def frames(data: bytes, frame_bytes: int = TWILIO_FRAME_BYTES) -> list[bytes]:
    """Split ``data`` into ``frame_bytes`` pieces; the last one may be shorter."""
    return [data[i : i + frame_bytes] for i in range(0, len(data), frame_bytes)]
