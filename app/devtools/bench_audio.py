"""``callbridge bench-audio``: what each agent audio format costs and how well it is converted.

For every conversion the bridge can be configured for (Twilio's mu-law 8 kHz to each agent
input format, each agent output format back to it), it measures on synthetic tones:

- passband: the level of telephone-band tones after conversion (0 dB is unchanged);
- rejection: for a rate change, the worst level of what the target rate cannot carry (tones
  above 4 kHz going down to 8 kHz; the images above 4 kHz going up from it);
- held back: how much audio the resampler keeps until more comes (or ``flush``), fed 20 ms
  frames, worst case and on average;
- cost: microseconds of ``Transcoder.convert`` per 20 ms frame, against passthrough, and the
  calls one core could convert at that rate (the conversion alone, one direction).

The quality tests (tests/unit/test_audio_quality.py) assert on these same functions, so the
figures docs/audio.md quotes come from the method the tests check.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from app.codecs import (
    AGENT_INPUT_ENCODINGS,
    AGENT_OUTPUT_ENCODINGS,
    FRAME_MS,
    TWILIO_FORMAT,
    TWILIO_SAMPLE_RATE,
    AudioFormat,
    Transcoder,
    agent_sample_rates,
    from_linear16,
    to_linear16,
)

Samples = npt.NDArray[np.float64]

AMPLITUDE = 16000  # a test tone's peak: -6 dBFS, loud speech, well clear of clipping
TELEPHONE_BAND_HZ = (300, 1000, 2000, 3000, 3400)  # the passband tones
TELEPHONE_TOP_HZ = TWILIO_SAMPLE_RATE // 2  # 4 kHz: what Twilio's 8 kHz can carry
EDGE_S = 0.05  # left out at both ends of a measurement: the filter's start and end transients
TONE_S = 1.0  # each test tone's length: 1 Hz FFT bins
SILENT_DB = -200.0  # below this a measured level is digital silence (db() floors at -240)


class Direction(StrEnum):
    """Which way a conversion goes (closed set: the bridge has two)."""

    TO_AGENT = "caller -> agent"
    TO_CALLER = "agent -> caller"


@dataclass(frozen=True, slots=True)
class AudioPath:
    direction: Direction
    src: AudioFormat
    dst: AudioFormat

    @property
    def agent_format(self) -> AudioFormat:
        return self.dst if self.direction is Direction.TO_AGENT else self.src

    @property
    def resamples(self) -> bool:
        return self.src.sample_rate != self.dst.sample_rate

    @property
    def name(self) -> str:
        fmt = self.agent_format
        return f"{self.direction.value}: agent {fmt.encoding}/{fmt.sample_rate}"


def agent_paths() -> list[AudioPath]:
    """Every conversion a valid profile can ask for, passthrough first."""
    paths = [AudioPath(Direction.TO_AGENT, TWILIO_FORMAT, TWILIO_FORMAT)]
    for encoding in AGENT_INPUT_ENCODINGS:
        for rate in agent_sample_rates(encoding):
            fmt = AudioFormat(encoding, rate)  # type: ignore[arg-type]
            if fmt != TWILIO_FORMAT:
                paths.append(AudioPath(Direction.TO_AGENT, TWILIO_FORMAT, fmt))
    for encoding in AGENT_OUTPUT_ENCODINGS:
        for rate in agent_sample_rates(encoding):
            fmt = AudioFormat(encoding, rate)  # type: ignore[arg-type]
            if fmt != TWILIO_FORMAT:
                paths.append(AudioPath(Direction.TO_CALLER, fmt, TWILIO_FORMAT))
    return paths


# --- signals -------------------------------------------------------------------------------


def tone(freq: float, rate: int, seconds: float = TONE_S, amplitude: float = AMPLITUDE) -> Samples:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


def sweep(low: float, high: float, rate: int, seconds: float, amplitude: float = AMPLITUDE) -> Samples:
    """A linear sine sweep from ``low`` to ``high`` Hz, at any rate the same continuous signal."""
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * (low * t + (high - low) * t * t / (2 * seconds)))


def encode(samples: Samples, fmt: AudioFormat) -> bytes:
    pcm = np.clip(np.rint(samples), -32768, 32767).astype(np.int16).tobytes()
    return from_linear16(pcm, fmt.encoding)


def decode(data: bytes, fmt: AudioFormat) -> Samples:
    pcm = to_linear16(data[: len(data) - len(data) % fmt.bytes_per_sample], fmt.encoding)
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float64)


def convert(path: AudioPath, data: bytes, pieces: Iterable[int] | None = None) -> bytes:
    """``data`` through a fresh Transcoder, whole or cut at the byte offsets ``pieces``, flushed."""
    transcoder = Transcoder(path.src, path.dst)
    if pieces is None:
        return transcoder.convert(data) + transcoder.flush()
    out, last = [], 0
    for cut in [*pieces, len(data)]:
        out.append(transcoder.convert(data[last:cut]))
        last = cut
    out.append(transcoder.flush())
    return b"".join(out)


# --- measurements --------------------------------------------------------------------------


def db(ratio: float) -> float:
    return float(20 * np.log10(max(ratio, 1e-12)))


def rms(samples: Samples) -> float:
    return float(np.sqrt(np.mean(samples * samples))) if samples.size else 0.0


def middle(samples: Samples, rate: int) -> Samples:
    edge = int(EDGE_S * rate)
    return samples[edge : samples.size - edge]


def gain_db(path: AudioPath, freq: float) -> float:
    """The level of a ``freq`` tone after ``path``, relative to the tone (0 dB: unchanged)."""
    out = decode(convert(path, encode(tone(freq, path.src.sample_rate), path.src)), path.dst)
    return db(rms(middle(out, path.dst.sample_rate)) / (AMPLITUDE / np.sqrt(2)))


def above_band_db(samples: Samples, rate: int, band_hz: float) -> float:
    """The power above ``band_hz`` in ``samples`` relative to a full test tone, from a
    Blackman-windowed spectrum (its leakage is below -100 dB a few bins from the tone)."""
    window = np.blackman(samples.size)
    spectrum = np.abs(np.fft.rfft(samples * window)) ** 2
    freqs = np.fft.rfftfreq(samples.size, 1 / rate)
    reference = np.abs(np.fft.rfft(tone(rate / 8, rate, samples.size / rate) * window)) ** 2
    above = float(spectrum[freqs > band_hz].sum())
    return float(10 * np.log10(max(above, 1e-30) / float(reference.sum())))


def stopband_tones(path: AudioPath) -> list[float]:
    """Tones the target cannot carry that a resampling ``path`` must remove: above 4 kHz up to
    the source's Nyquist frequency going down. Going up, the source has none (it is 8 kHz):
    ``rejection_db`` measures the images of telephone-band tones instead."""
    if not path.resamples or path.src.sample_rate < path.dst.sample_rate:
        return []
    nyquist = path.src.sample_rate / 2
    fixed = [4100.0, 4500.0, 5000.0, 6000.0, 7000.0]
    spread = np.linspace(TELEPHONE_TOP_HZ + 500, nyquist - 100, 8).tolist()
    return sorted(f for f in {*fixed, *spread} if f < nyquist)


def alias_db(path: AudioPath, freq: float) -> float:
    """Going down: what is left of a ``freq`` tone above the target's Nyquist frequency
    (anything left is an alias folded into the telephone band)."""
    out = decode(convert(path, encode(tone(freq, path.src.sample_rate), path.src)), path.dst)
    return db(rms(middle(out, path.dst.sample_rate)) / (AMPLITUDE / np.sqrt(2)))


def image_db(path: AudioPath, freq: float) -> float:
    """Going up: the images of a telephone-band ``freq`` tone above 4 kHz."""
    out = decode(convert(path, encode(tone(freq, path.src.sample_rate), path.src)), path.dst)
    return above_band_db(middle(out, path.dst.sample_rate), path.dst.sample_rate, TELEPHONE_TOP_HZ)


def sixteen_bit(path: AudioPath) -> AudioPath:
    """``path`` with a linear16 target: the resampler's own rejection, which a mu-law target
    hides (below mu-law's smallest step, what is left of a removed tone encodes as silence)."""
    return AudioPath(path.direction, path.src, AudioFormat("linear16", path.dst.sample_rate))


def rejection_db(path: AudioPath) -> float | None:
    """The worst (highest) alias or image level of a resampling ``path``; None without one."""
    if not path.resamples:
        return None
    if path.src.sample_rate > path.dst.sample_rate:
        return max(alias_db(path, f) for f in stopband_tones(path))
    return max(image_db(path, f) for f in TELEPHONE_BAND_HZ)


def held_back_ms(path: AudioPath, seconds: float = 3.0) -> tuple[float, float]:
    """Fed 20 ms frames of a tone: the audio the Transcoder has taken but not yet given back,
    in ms of output, worst case and on average over the frames."""
    transcoder = Transcoder(path.src, path.dst)
    data = encode(tone(440, path.src.sample_rate, seconds), path.src)
    frame = path.src.bytes_for(FRAME_MS / 1000)
    out_rate = path.dst.sample_rate
    given = produced = 0
    held: list[float] = []
    for offset in range(0, len(data) - frame + 1, frame):
        produced += len(transcoder.convert(data[offset : offset + frame])) // path.dst.bytes_per_sample
        given += frame // path.src.bytes_per_sample
        held.append(given * out_rate / path.src.sample_rate - produced)
    return max(held) * 1000 / out_rate, sum(held) / len(held) * 1000 / out_rate


def cost_us(path: AudioPath, frames: int = 2000) -> float:
    """Microseconds of ``convert`` per 20 ms frame of speech-level audio (the best of 3 runs)."""
    frame = path.src.bytes_for(FRAME_MS / 1000)
    data = encode(tone(440, path.src.sample_rate, frames * FRAME_MS / 1000), path.src)
    chunks = [data[i : i + frame] for i in range(0, len(data), frame)]
    best = float("inf")
    for _ in range(3):
        transcoder = Transcoder(path.src, path.dst)
        start = time.perf_counter()
        for chunk in chunks:
            transcoder.convert(chunk)
        best = min(best, (time.perf_counter() - start) / len(chunks))
    return best * 1e6


@dataclass(frozen=True, slots=True)
class PathReport:
    path: AudioPath
    passband_db: tuple[float, float]  # the lowest and highest tone level
    rejection_db: float | None  # at the path's own target
    filter_rejection_db: float | None  # at a 16-bit target
    held_ms: tuple[float, float]  # worst, average
    cost_us: float


def measure(path: AudioPath, frames: int = 2000) -> PathReport:
    gains = [gain_db(path, f) for f in TELEPHONE_BAND_HZ]
    return PathReport(
        path,
        (min(gains), max(gains)),
        rejection_db(path),
        rejection_db(sixteen_bit(path)),
        held_back_ms(path),
        cost_us(path, frames),
    )


def _level(value: float | None) -> str:
    if value is None:
        return "-"
    return "silent" if value < SILENT_DB else f"{value:.0f} dB"


def table(reports: Sequence[PathReport]) -> str:
    """The figures, one line per path: docs/audio.md is a copy of this."""
    base = next(r.cost_us for r in reports if r.path.src == r.path.dst)
    frame_us = FRAME_MS * 1000
    lines = [
        "| path | passband 300-3400 Hz | alias/image (16-bit) | held back (worst / mean) | µs per 20 ms "
        "| vs passthrough | calls per core |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in reports:
        passthrough = r.path.src == r.path.dst
        lo, hi = r.passband_db
        rejection = _level(r.rejection_db)
        if r.filter_rejection_db is not None and r.filter_rejection_db != r.rejection_db:
            rejection += f" ({_level(r.filter_rejection_db)})"
        held = "0" if not r.path.resamples else f"{r.held_ms[0]:.0f} / {r.held_ms[1]:.0f} ms"
        name = f"{r.path.name} (passthrough)" if passthrough else r.path.name
        lines.append(
            f"| {name} | {lo:+.2f} .. {hi:+.2f} dB | {rejection} | {held} | {r.cost_us:.2f} "
            f"| {r.cost_us / base:.0f}x | {frame_us / r.cost_us:,.0f} |"
        )
    return "\n".join(lines)


def run(frames: int = 2000) -> str:
    return table([measure(path, frames) for path in agent_paths()])
