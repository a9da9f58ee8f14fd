"""Read caller audio from WAV or raw mu-law files, write what the caller heard as WAV."""

from __future__ import annotations

import wave
from pathlib import Path

from app.codecs import TWILIO_SAMPLE_RATE, to_linear16


def write_mulaw_as_wav(path: Path, mulaw: bytes) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(TWILIO_SAMPLE_RATE)
        wav.writeframes(to_linear16(mulaw, "mulaw"))
