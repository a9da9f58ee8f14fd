"""Deterministic stand-in "speech": tone bursts shaped like words.

The local agent speaks its greeting with it and the simulated caller talks with it when no
WAV file is given. Being deterministic, tests can check what the caller heard byte for byte.
"""

from __future__ import annotations

import math
import struct
import zlib

from app.codecs import AudioFormat, Transcoder

SAMPLE_RATE = 8000


def tone(freq: float, seconds: float, amplitude: int = 8000, rate: int = SAMPLE_RATE) -> bytes:
    n = int(seconds * rate)
    fade = max(1, int(0.005 * rate))
    samples = []
    for i in range(n):
        env = min(1.0, i / fade, (n - 1 - i) / fade) if n > 1 else 1.0
        samples.append(int(amplitude * env * math.sin(2 * math.pi * freq * i / rate)))
    return struct.pack(f"<{n}h", *samples)


def silence(seconds: float, rate: int = SAMPLE_RATE) -> bytes:
    return b"\x00\x00" * int(seconds * rate)


def speech_like(text: str, rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM: one tone burst per word (length from the word), short gaps between."""
    out = bytearray()
    for word in text.split() or ["..."]:
        freq = 220 + zlib.crc32(word.encode()) % 600
        out += tone(freq, 0.12 + 0.04 * min(len(word), 10), rate=rate)
        out += silence(0.06, rate)
    return bytes(out)


def encode(pcm16: bytes, fmt: AudioFormat, rate: int = SAMPLE_RATE) -> bytes:
    """A whole recording in ``fmt``: flushed, so it ends where the recording ends."""
    transcoder = Transcoder(AudioFormat("linear16", rate), fmt)
    return transcoder.convert(pcm16) + transcoder.flush()
