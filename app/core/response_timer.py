"""How long the caller waits for an answer, measured by the bridge: from the end of the
caller's speech to the first audio of the agent's reply leaving for Twilio.

The agent says when the caller starts speaking (``UserStartedSpeaking``), never when they
stop, so the end of speech comes from a detector of our own on the mu-law the bridge relays.
It is as cheap as a detector can be: a frame is speech when at least ``LOUD_SAMPLES`` of its
samples are louder than ``LOUD_LEVEL``, counted in C by deleting the quiet byte values
(``bytes.translate``), with no decoding and no per-frame allocation beyond that one copy.

What it misses, said plainly (docs/console.md repeats it): a caller whose speech is quieter than
the threshold (a whisper, a bad line) is not seen, so no figure for that turn; loud noise
(a television, a busy street) counts as speech, so the end of speech is the end of the noise
and the figure is too short or the turn merges with the next; replies that follow no caller
speech (the greeting, a check-in, an operator's "say") are not turns and get no figure.
"""

from __future__ import annotations

LOUD_LEVEL = 1000
"""A sample this loud (16-bit linear, about -30 dBFS) or louder counts as sound: speech on a
phone line peaks at several thousand; Twilio's silence and line hiss stay well below."""
LOUD_SAMPLES = 24
"""Loud samples (of a 20 ms frame's 160) that make a frame speech: 3 ms of it, so a click or a
single pop is not speech, and the quiet part of a syllable still is."""
TURN_MIN_FRAMES = 5
"""Speech frames (100 ms) since the last reply began that make a caller turn: a cough or a
"mm" alone does not start a measurement."""
TURN_GAP_SECONDS = 1.0
"""Speech frames further apart than this are not one turn: sparse noise never adds up to one."""
RESPONSE_WINDOW_SECONDS = 10.0
"""A reply more than this after the caller's speech answers nothing they said (a check-in)."""
MAX_RESPONSES_RECORDED = 500
"""Response times the call record keeps (``response_ms``): the latest ones, a turn every few
seconds for half an hour; the histogram has them all."""


def _mulaw_magnitude(byte: int) -> int:
    """G.711 mu-law byte to the magnitude of its 16-bit linear sample."""
    inverted = ~byte & 0xFF
    exponent = (inverted >> 4) & 0x07
    mantissa = inverted & 0x0F
    return (((mantissa << 3) + 0x84) << exponent) - 0x84


QUIET_BYTES = bytes(b for b in range(256) if _mulaw_magnitude(b) < LOUD_LEVEL)
"""The mu-law byte values quieter than ``LOUD_LEVEL``: deleted from a frame, the rest is loud."""


class ResponseTimer:
    """Per call: caller frames in, the first audio of each reply out, a response time when
    that reply answers a caller turn."""

    __slots__ = ("_armed", "_speech_at", "_speech_frames", "latest_ms", "responses_ms")

    def __init__(self) -> None:
        self._speech_frames = 0  # speech frames of the caller's turn so far (none further apart than TURN_GAP)
        self._speech_at = -TURN_GAP_SECONDS  # when the latest speech frame arrived: the end of speech so far
        self._armed = False  # the agent started a reply (AgentStartedSpeaking) whose first audio is still to come
        self.latest_ms: int | None = None
        self.responses_ms: list[int] = []  # a list, not a deque: empty, it costs a tenth

    def caller_frame(self, payload: bytes, now: float) -> None:
        """Every caller frame (the hot path: one C-level translate and a comparison)."""
        if len(payload.translate(None, QUIET_BYTES)) >= LOUD_SAMPLES:
            self._speech_frames = self._speech_frames + 1 if now - self._speech_at <= TURN_GAP_SECONDS else 1
            self._speech_at = now

    def reply_started(self) -> None:
        """AgentStartedSpeaking: the next agent audio opens a reply."""
        self._armed = True

    def agent_audio(self, now: float) -> int | None:
        """Agent audio is leaving for Twilio: the response time in ms if this is the first
        audio of a reply to a caller turn, else None. Whatever the caller said before a reply
        began is answered by it (measured or not): the next turn starts afresh."""
        if not self._armed:
            return None
        self._armed = False
        turn = self._speech_frames >= TURN_MIN_FRAMES and now - self._speech_at <= RESPONSE_WINDOW_SECONDS
        self._speech_frames = 0
        if not turn:
            return None
        response_ms = max(0, round((now - self._speech_at) * 1000))
        self.latest_ms = response_ms
        self.responses_ms.append(response_ms)
        if len(self.responses_ms) > MAX_RESPONSES_RECORDED:
            del self.responses_ms[0]  # once a turn at most: the cost of a shift is nothing here
        return response_ms

    def cut_short(self) -> None:
        """A barge-in: what still arrives of the interrupted reply is no answer to anything."""
        self._armed = False
