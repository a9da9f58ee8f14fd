"""The agent's speech on its way to the caller: Twilio media frames, a mark after each
utterance, and barge-in (``Playback.barge_in``), which is where Twilio is told to ``clear``.

Its state (``PlaybackState`` in ``states.py``) tells whether the caller was hearing the agent
when they started to speak; the marks tell which utterances Twilio actually played.
"""

from __future__ import annotations

from app.codecs import TWILIO_FORMAT, Transcoder, frames
from app.core.actions import Action, ClearTwilio, Log, Measure, SendMark, SendMedia
from app.core.heard import HeardAudio, Utterance
from app.core.options import MAX_HELD_DURING_TONES, MAX_OUTSTANDING_MARKS, CallOptions
from app.core.states import PLAYBACK_TRANSITIONS, PlaybackInput, PlaybackState
from app.core.stats import CallStats
from app.core.vocabulary import InvalidKind, LogLevel, MetricName
from app.twilio import messages as twilio_msg


class Playback:
    __slots__ = (
        "_cleared_marks",
        "_held",
        "_held_done",
        "_mark_seq",
        "_outstanding_marks",
        "_stats",
        "_to_twilio",
        "first_audio_at",
        "heard",
        "state",
        "stream_sid",
        "stream_started_at",
        "tones_mark",
    )

    def __init__(self, options: CallOptions, stats: CallStats) -> None:
        self._stats = stats
        self.heard = HeardAudio()  # how much of each utterance the caller got to hear
        self.configure(options)
        self.stream_sid = ""
        self.stream_started_at = 0.0
        self.state = PlaybackState.QUIET
        self.first_audio_at: float | None = None
        self._mark_seq = 0
        # insertion-ordered, so the oldest is forgotten first when a bound is reached
        self._outstanding_marks: dict[str, float] = {}
        self._cleared_marks: dict[str, None] = {}
        self.tones_mark: str | None = None  # keypad tones are playing until this mark returns
        self._held: list[bytes] = []  # agent audio meanwhile (bounded: MAX_HELD_DURING_TONES)
        self._held_done = 0  # utterances that ended meanwhile: their marks follow the held audio

    def configure(self, options: CallOptions) -> None:
        """The call's profile is known (before any agent audio): its output format, and
        whether each utterance is kept for a posted call record."""
        self.heard.keep = options.record_utterances
        self._to_twilio = (
            None if options.agent_output == TWILIO_FORMAT else Transcoder(options.agent_output, TWILIO_FORMAT)
        )

    def _go(self, event: PlaybackInput) -> None:
        self.state = PLAYBACK_TRANSITIONS[self.state][event]

    def audio(self, data: bytes, now: float) -> list[Action]:
        """A chunk of agent speech: one Twilio media frame (in mu-law 8 kHz)."""
        if self._to_twilio is not None:
            data = self._to_twilio.convert(data)
            if not data:
                return []
        if self.tones_mark is not None:  # keypad tones are playing: held (bounded) until they are done
            self._held.append(data)
            while len(self._held) > 1 and sum(map(len, self._held)) > MAX_HELD_DURING_TONES:
                self._held.pop(0)
            return []
        return self._send(data, now)

    def _send(self, data: bytes, now: float) -> list[Action]:
        if self.state is not PlaybackState.SPEAKING:
            self._go(PlaybackInput.AGENT_SPEAKS)
        stats = self._stats
        stats.agent_frames += 1
        stats.agent_bytes += len(data)
        self.heard.sent(len(data), now)
        send = SendMedia(twilio_msg.media(self.stream_sid, data), len(data))
        if self.first_audio_at is None:
            self.first_audio_at = now
            return [send, Measure(MetricName.FIRST_AGENT_AUDIO, now - self.stream_started_at)]
        return [send]

    def clear(self, now: float) -> tuple[list[Action], Utterance | None]:
        """``clear``, and everything the bridge knew of what Twilio was playing forgotten: for a
        barge-in (which also counts it), keypad tones, and a machine's late verdict."""
        if self._to_twilio is not None:
            self._to_twilio.reset()  # the cut-off speech must not open the next utterance
        cut = self.heard.cleared(now)
        heard = next((u for u in cut if u.heard_ms), cut[0] if cut else None)  # the one playing
        self._go(PlaybackInput.BARGE_IN)
        stats = self._stats
        stats.marks_cleared += len(self._outstanding_marks)
        self._cleared_marks.update(dict.fromkeys(self._outstanding_marks))
        self._outstanding_marks.clear()
        while len(self._cleared_marks) > MAX_OUTSTANDING_MARKS:
            del self._cleared_marks[next(iter(self._cleared_marks))]
        return [ClearTwilio(twilio_msg.clear(self.stream_sid))], heard

    def tones(self, audio: bytes, now: float) -> list[Action]:
        """Keypad tones (``send_dtmf``, mu-law 8 kHz) as ordinary media, after a ``clear`` (the
        keys must not wait behind a sentence), then a mark; agent audio that arrives meanwhile
        is held until the mark comes back, so nothing is said over the tones."""
        actions, _ = self.clear(now)
        sid = self.stream_sid
        for frame in frames(audio):
            self.heard.sent(len(frame), now, agent=False)
            actions.append(SendMedia(twilio_msg.media(sid, frame), len(frame)))
        self._mark_seq += 1
        self.tones_mark = f"dtmf-{self._mark_seq}"
        actions.append(SendMark(twilio_msg.mark(sid, self.tones_mark), self.tones_mark))
        return actions

    def _tones_played(self, now: float) -> list[Action]:
        """The tones' mark came back: the agent's held audio goes out, in order, with its marks."""
        self.tones_mark = None
        actions: list[Action] = []
        held, self._held = self._held, []
        done, self._held_done = self._held_done, 0
        for chunk in held:
            actions += self._send(chunk, now)
        for _ in range(done):
            actions += self.audio_done(now)
        return actions

    def session_lost(self) -> None:
        """The agent session dropped: its cut-off speech is not replayed, nor its resampler tail."""
        if self._to_twilio is not None:
            self._to_twilio.reset()
        self.heard.session_lost()

    def hold(self, audio: bytes, now: float) -> list[Action]:
        """The bridge's own "one moment" (mu-law 8 kHz), in 20 ms frames, while the agent is
        away. Not an agent utterance: no mark, no playback state; a barge-in clears it."""
        heard, sid = self.heard, self.stream_sid
        out: list[Action] = []
        for frame in frames(audio):
            heard.sent(len(frame), now, agent=False)
            out.append(SendMedia(twilio_msg.media(sid, frame), len(frame)))
        return out

    def agent_started_speaking(self) -> None:
        self._go(PlaybackInput.AGENT_SPEAKS)

    def audio_done(self, now: float) -> list[Action]:
        """The utterance is complete: what the resampler still holds goes out, then a mark
        after it tells us when Twilio has played it all."""
        if self.tones_mark is not None:
            self._held_done += 1  # its mark follows the held audio, once the tones are done
            return []
        tail: list[Action] = []
        if self._to_twilio is not None:
            held = self._to_twilio.flush()
            if held:
                tail = self._send(held, now)
        self._go(PlaybackInput.AUDIO_DONE)
        self._mark_seq += 1
        name = f"agent-audio-{self._mark_seq}"
        self._outstanding_marks[name] = now
        self.heard.done(name)
        if len(self._outstanding_marks) > MAX_OUTSTANDING_MARKS:
            del self._outstanding_marks[next(iter(self._outstanding_marks))]
        return [*tail, SendMark(twilio_msg.mark(self.stream_sid, name), name)]

    def mark_returned(self, name: str, now: float) -> list[Action]:
        if name == self.tones_mark:
            return self._tones_played(now)
        sent_at = self._outstanding_marks.pop(name, None)
        if sent_at is not None:
            self._stats.marks_played += 1
            self.heard.mark_returned(name, now)
            if not self._outstanding_marks:
                self._go(PlaybackInput.LAST_MARK_PLAYED)
            return [Log(LogLevel.DEBUG, "agent_audio_played", {"mark": name, "after_s": round(now - sent_at, 3)})]
        if name in self._cleared_marks:
            del self._cleared_marks[name]
            return []  # returned by Twilio because of a clear: that audio was never heard
        if self._stats.count_invalid(InvalidKind.UNKNOWN_MARK):
            return [Log(LogLevel.WARNING, "twilio_unknown_mark", {"mark": name[:64]})]
        return []

    def barge_in(self, now: float) -> tuple[list[Action], Utterance | None]:
        """The caller talks over the agent: Twilio must stop playing at once, so ``clear`` is
        the first action; the pump also drops agent audio it still holds for Twilio. Also
        returns the utterance the caller cut short, if they did. Keypad tones being played
        are not cleared (a phone menu talks while it listens): the agent's held reply is dropped."""
        interrupted = self.state is not PlaybackState.QUIET
        if self.tones_mark is not None:
            self._held.clear()
            self._held_done = 0
            self._go(PlaybackInput.BARGE_IN)
            return [], None
        actions, heard = self.clear(now)
        stats = self._stats
        if interrupted:
            stats.barge_ins += 1
            fields: dict[str, object] = {"turn": stats.turns}
            if heard is not None:
                got, full = round(heard.heard_ms or 0), round(heard.full_ms)
                fields.update(heard_ms=got, full_ms=full, heard=f"heard {got} ms of {full} ms")
            actions.append(Log(LogLevel.INFO, "barge_in", fields))
            actions.append(Measure(MetricName.BARGE_INS))
        return actions, heard
