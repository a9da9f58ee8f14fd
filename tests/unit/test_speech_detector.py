"""The test peers' shared speech detector: onset after a run of loud frames, offset after a
run of quiet ones, nothing from clicks or pauses between words."""

from __future__ import annotations

import struct

import pytest

from app.codecs import TWILIO_FORMAT, frames, rms_linear16, to_linear16
from app.devtools import synth
from app.devtools.speech import HANGOVER_MS, ONSET_MS, SPEECH_RMS, SpeechDetector, SpeechEvent

FRAME = 160  # 20 ms of 8 kHz samples


def frame_with_rms(level: int, samples: int = FRAME) -> bytes:
    """A square wave: its RMS is exactly ``level``."""
    return struct.pack(f"<{samples}h", *(level if i % 2 else -level for i in range(samples)))


LOUD = frame_with_rms(SPEECH_RMS)
QUIET = frame_with_rms(SPEECH_RMS - 1)


def feed_all(detector: SpeechDetector, chunks: list[bytes]) -> list[tuple[int, SpeechEvent]]:
    events = []
    for i, chunk in enumerate(chunks):
        event = detector.feed(chunk)
        if event is not None:
            events.append((i, event))
    return events


def test_frame_levels_sit_either_side_of_the_threshold() -> None:
    assert rms_linear16(LOUD) == SPEECH_RMS and rms_linear16(QUIET) == SPEECH_RMS - 1


def test_defaults_are_three_frames_to_start_and_twenty_to_end() -> None:
    detector = SpeechDetector()
    assert (ONSET_MS, HANGOVER_MS) == (60, 400)
    assert (detector.onset_frames, detector.hangover_frames) == (3, 20)


def test_onset_on_the_third_loud_frame_and_offset_on_the_twentieth_quiet_one() -> None:
    detector = SpeechDetector()
    chunks = [QUIET] * 5 + [LOUD] * 10 + [QUIET] * 25
    assert feed_all(detector, chunks) == [(5 + 2, SpeechEvent.ONSET), (15 + 19, SpeechEvent.OFFSET)]
    assert not detector.in_speech


def test_short_bursts_and_short_pauses_do_not_count() -> None:
    detector = SpeechDetector()
    # two loud frames (a click) never start speech
    assert feed_all(detector, ([LOUD] * 2 + [QUIET]) * 10) == []
    # once speaking, pauses shorter than the hangover do not end it
    assert feed_all(detector, [LOUD] * 3) == [(2, SpeechEvent.ONSET)]
    assert feed_all(detector, ([QUIET] * 19 + [LOUD]) * 5) == []
    assert detector.in_speech


def test_a_second_utterance_needs_a_fresh_onset() -> None:
    detector = SpeechDetector()
    utterance = [LOUD] * 4 + [QUIET] * 20
    events = feed_all(detector, utterance * 2)
    assert events == [
        (2, SpeechEvent.ONSET),
        (23, SpeechEvent.OFFSET),
        (24 + 2, SpeechEvent.ONSET),
        (24 + 23, SpeechEvent.OFFSET),
    ]


def test_settings_are_in_milliseconds_of_frames() -> None:
    detector = SpeechDetector(threshold=1000, onset_ms=20, hangover_ms=100)
    assert (detector.onset_frames, detector.hangover_frames) == (1, 5)
    assert detector.feed(LOUD) is None  # below this threshold
    assert detector.feed(frame_with_rms(1000)) is SpeechEvent.ONSET
    assert feed_all(detector, [QUIET] * 5) == [(4, SpeechEvent.OFFSET)]
    # shorter than a frame still means one frame
    assert SpeechDetector(onset_ms=5, hangover_ms=5).onset_frames == 1


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_any_sample_rate_and_a_short_last_frame(rate: int) -> None:
    detector = SpeechDetector()
    n = rate // 50
    chunks = [frame_with_rms(2000, n)] * 3 + [frame_with_rms(0, n)] * 19 + [frame_with_rms(0, n // 3)]
    assert feed_all(detector, chunks) == [(2, SpeechEvent.ONSET), (22, SpeechEvent.OFFSET)]


def test_synthetic_speech_through_mu_law_is_one_utterance_per_phrase() -> None:
    """What the simulated caller sends: each phrase is one utterance, the gaps between words
    (60 ms) do not split it, and the pause between phrases ends it."""
    pcm = (
        synth.silence(0.5)
        + synth.speech_like("hello I would like to check on my order please")
        + synth.silence(1.2)
        + synth.speech_like("thank you very much")
        + synth.silence(0.6)
    )
    detector = SpeechDetector()
    events = feed_all(detector, [to_linear16(f, "mulaw") for f in frames(synth.encode(pcm, TWILIO_FORMAT))])
    assert [e for _, e in events] == [SpeechEvent.ONSET, SpeechEvent.OFFSET] * 2
    onset = events[0][0] * 0.02
    assert 0.5 <= onset <= 0.5 + ONSET_MS / 1000 + 0.02  # within the onset delay of the first word
