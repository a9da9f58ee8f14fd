"""The one speech detector of the test peers: an energy gate with an onset delay and a hangover.

The local agent uses it to decide when the caller starts and stops talking (it sends
``UserStartedSpeaking`` at the onset and replies after the offset), and the simulated caller
uses the same detector, with the same settings, on the audio it sends. Because both sides run
the same detector on the same audio, the caller's "starts speaking" is the instant the agent
reacts to, and the load test can time a barge-in from that instant to the ``clear`` it
receives back.

It is fed 20 ms frames of 16-bit little-endian PCM (any sample rate; a short last frame is
fine) and answers, per frame, whether speech started, ended, or neither.
"""

from __future__ import annotations

import enum

from app.codecs import FRAME_MS, rms_linear16

# RMS of 16-bit PCM at and above which a frame counts as speech: about -38 dBFS. Digital
# silence (and mu-law's 0xff) is 0 and line noise in phone recordings stays well below it,
# while speech is in the thousands (the synthetic speech in ``synth`` is about 5700), so quiet
# talkers are still caught.
SPEECH_RMS = 400
# Loud audio must last this long before it counts as speech: three frames, so a click or a
# single loud frame is not an utterance, yet a barge-in is detected within 60 ms.
ONSET_MS = 60
# Speech ends after this much quiet: longer than the pauses between words (60 ms in ``synth``,
# a few hundred ms in natural speech), so a phrase is one utterance, and shorter than the
# pauses between phrases in the caller scripts (1.2 s and more), so each phrase is answered.
HANGOVER_MS = 400


class SpeechEvent(enum.Enum):
    ONSET = "onset"
    OFFSET = "offset"


class SpeechDetector:
    """Stateful: call :meth:`feed` with consecutive 20 ms frames of one audio stream.

    Speech starts on the ``onset_frames``-th loud frame in a row (that frame returns
    ``ONSET``) and ends on the ``hangover_frames``-th quiet frame in a row after it (that
    frame returns ``OFFSET``); the hangover frames are part of the utterance as fed, so a
    caller keeping the audio should drop the last ``hangover_frames`` frames.
    """

    def __init__(
        self,
        threshold: int = SPEECH_RMS,
        onset_ms: int = ONSET_MS,
        hangover_ms: int = HANGOVER_MS,
        frame_ms: int = FRAME_MS,
    ) -> None:
        self.threshold = threshold
        self.onset_frames = max(1, onset_ms // frame_ms)
        self.hangover_frames = max(1, hangover_ms // frame_ms)
        self.in_speech = False
        self._loud = 0  # loud frames in a row while not in speech
        self._quiet = 0  # quiet frames in a row while in speech

    def feed(self, pcm: bytes) -> SpeechEvent | None:
        loud = rms_linear16(pcm) >= self.threshold
        if not self.in_speech:
            self._loud = self._loud + 1 if loud else 0
            if self._loud >= self.onset_frames:
                self.in_speech = True
                self._loud = 0
                self._quiet = 0
                return SpeechEvent.ONSET
            return None
        self._quiet = 0 if loud else self._quiet + 1
        if self._quiet >= self.hangover_frames:
            self.in_speech = False
            self._quiet = 0
            return SpeechEvent.OFFSET
        return None
