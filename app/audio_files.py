"""Caller audio and hold audio read from files: a WAV of any rate and width, or raw mu-law,
brought to Twilio's mu-law 8 kHz. Kept out of ``app.codecs`` because reading files is I/O,
and the sans-I/O core imports the codecs."""

from __future__ import annotations

import wave
from pathlib import Path

from app.codecs import TWILIO_SAMPLE_RATE, AudioFormat, Transcoder, audioop

RAW_MULAW_SUFFIXES = {".ulaw", ".mulaw", ".raw", ".ul"}


def load_audio_file(path: Path) -> bytes:
    """Any 16-bit PCM WAV (mono or stereo, any rate), or raw mu-law 8 kHz -> mu-law 8 kHz."""
    if path.suffix.lower() in RAW_MULAW_SUFFIXES:
        return path.read_bytes()
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            pcm = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc}); raw mu-law files need a .ulaw suffix") from exc
    if width != 2:
        pcm = audioop.lin2lin(pcm, width, 2)
    if channels == 2:
        pcm = audioop.tomono(pcm, 2, 0.5, 0.5)
    elif channels != 1:
        raise ValueError(f"{path}: {channels} channels; use mono or stereo")
    transcoder = Transcoder(AudioFormat("linear16", rate), AudioFormat("mulaw", TWILIO_SAMPLE_RATE))
    return transcoder.convert(pcm) + transcoder.flush()
