"""What the caller heard of each agent utterance, in milliseconds.

Twilio plays the media we send in order, in real time (mu-law 8 kHz: 8 bytes per ms), and
throws away what it has not played yet when it gets ``clear``. So the bridge can follow the
play-out position without asking Twilio: everything sent is queued behind what is still
playing, and the position moves at real time whenever something is queued. A returned mark
proves its utterance was played by then, which corrects an estimate that ran behind.

The figure is an estimate: audio is stamped when the core hands it to the pump, so the pump's
queue and the network delay to Twilio (tens of ms on a healthy line) make it read slightly
high on barge-in. It is for the operator's record ("heard 1200 ms of 3400 ms"), not for the
agent: Deepgram's own history keeps the full text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from app.codecs import TWILIO_SAMPLE_RATE
from app.core.options import MAX_OUTSTANDING_MARKS, MAX_UTTERANCES_RECORDED

MS_PER_TWILIO_BYTE = 1000 / TWILIO_SAMPLE_RATE  # one mu-law byte is one sample


class HeardRecord(TypedDict):
    heard_ms: int
    full_ms: int
    interrupted: bool


class HeardTotals(TypedDict):
    utterances: int
    interrupted: int
    heard_ms: int
    full_ms: int


def _count(totals: HeardTotals, record: HeardRecord) -> None:
    """Add one utterance's record to whole-call totals."""
    totals["utterances"] += 1
    totals["interrupted"] += record["interrupted"]
    totals["heard_ms"] += record["heard_ms"]
    totals["full_ms"] += record["full_ms"]


@dataclass(slots=True)
class Utterance:
    """One agent utterance as the caller got it: ``heard_ms`` of ``full_ms``."""

    offset_ms: float  # where it starts in everything sent to Twilio this call
    full_ms: float = 0.0
    heard_ms: float | None = None  # known once its mark returns or the caller cuts in
    mark: str = ""  # the mark sent after it (empty until AgentAudioDone)

    @property
    def interrupted(self) -> bool:
        return self.heard_ms is not None and self.heard_ms < self.full_ms

    def as_record(self) -> HeardRecord:
        heard = round(self.full_ms if self.heard_ms is None else self.heard_ms)
        full = round(self.full_ms)
        return {"heard_ms": heard, "full_ms": full, "interrupted": heard < full}


class HeardAudio:
    """The play-out position of one call's Twilio stream, and each utterance's share of it."""

    __slots__ = ("_current", "_pending", "_play_end", "_sent_ms", "finished", "first", "keep", "totals")

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep  # each finished utterance kept for the posted call record (CALL_EVENTS_URL)
        # the finished utterances' figures, for the whole call however long
        self.totals: HeardTotals = {"utterances": 0, "interrupted": 0, "heard_ms": 0, "full_ms": 0}
        self._sent_ms = 0.0  # everything sent (and not cleared), in ms of audio
        self._play_end = 0.0  # when Twilio will have played all of it (clock seconds)
        self._current: Utterance | None = None  # being sent now (no AgentAudioDone yet)
        self._pending: dict[str, Utterance] = {}  # sent whole, mark not back yet (by mark)
        self.finished: list[Utterance] = []  # heard in full or cut off, oldest first (bounded)
        self.first: Utterance | None = None  # the greeting, when the agent has one

    def position_ms(self, now: float) -> float:
        """How much of what was sent Twilio has played by ``now``."""
        unplayed_ms = max(0.0, self._play_end - now) * 1000
        return max(0.0, self._sent_ms - unplayed_ms)  # never below zero from float rounding

    def sent(self, nbytes: int, now: float, agent: bool = True) -> None:
        """``nbytes`` of mu-law went to Twilio: cheap, it runs for every agent frame. Audio
        that is not the agent's (the bridge's own "one moment") moves the play-out only."""
        ms = nbytes * MS_PER_TWILIO_BYTE
        if agent:
            current = self._current
            if current is None:
                current = self._current = Utterance(offset_ms=self._sent_ms)
                if self.first is None:
                    self.first = current
            current.full_ms += ms
        self._sent_ms += ms
        self._play_end = max(self._play_end, now) + ms / 1000

    def done(self, mark: str) -> None:
        """The utterance is complete and ``mark`` follows it."""
        current, self._current = self._current, None
        if current is not None:
            current.mark = mark
            self._pending[mark] = current
            if len(self._pending) > MAX_OUTSTANDING_MARKS:  # a Twilio that returns no marks
                self._finish(self._pending.pop(next(iter(self._pending))))  # heard: unknown

    def session_lost(self) -> None:
        """The agent session is gone mid-utterance: no AgentAudioDone (and no mark) will
        follow it, and the next session's speech is another utterance. What of it was heard
        is known from the play-out when the caller cuts in or the call ends."""
        current, self._current = self._current, None
        if current is not None:
            self._pending[f"lost-{len(self.finished)}-{len(self._pending)}"] = current

    def mark_returned(self, mark: str, now: float) -> None:
        """Twilio played the utterance through: heard in full, and the position is at least its end."""
        utterance = self._pending.pop(mark, None)
        if utterance is None:
            return
        end_ms = utterance.offset_ms + utterance.full_ms
        if self.position_ms(now) < end_ms:  # we ran behind Twilio: catch up
            self._play_end = now + (self._sent_ms - end_ms) / 1000
        utterance.heard_ms = utterance.full_ms
        self._finish(utterance)

    def cleared(self, now: float) -> list[Utterance]:
        """Twilio was told to ``clear``: what was not played is gone. Returns the utterances
        cut short or never heard at all (an utterance already played through, whose mark is
        still on its way, counts as heard in full)."""
        position = self.position_ms(now)
        cut: list[Utterance] = []
        for utterance, heard in self._unsettled(position):
            utterance.heard_ms = heard
            self._finish(utterance)
            if utterance.interrupted:
                cut.append(utterance)
        self._pending.clear()
        self._current = None
        self._sent_ms = min(self._sent_ms, position)
        self._play_end = now
        return cut

    def records(self, now: float) -> list[HeardRecord]:
        """Every utterance as the call record shows it. One still playing, or whose mark had
        not come back when the call ended, counts what had been played by ``now``."""
        return [u.as_record() for u in self.finished] + self._unsettled_records(now)

    def _unsettled_records(self, now: float) -> list[HeardRecord]:
        """The records of the utterances still unsettled, as heard by ``now``."""
        return [
            Utterance(u.offset_ms, u.full_ms, heard).as_record() for u, heard in self._unsettled(self.position_ms(now))
        ]

    def _unsettled(self, position_ms: float) -> list[tuple[Utterance, float]]:
        """The utterances whose mark has not come back (and the one being sent), oldest first,
        each with how much of it had been played at ``position_ms``."""
        waiting = list(self._pending.values())
        if self._current is not None:
            waiting.append(self._current)
        return [(u, min(u.full_ms, max(0.0, position_ms - u.offset_ms))) for u in waiting]

    def summary(self, now: float) -> HeardTotals:
        """The whole call's figures (the finished utterances' totals, and those still playing)."""
        totals = self.totals.copy()
        for record in self._unsettled_records(now):
            _count(totals, record)
        return totals

    def _finish(self, utterance: Utterance) -> None:
        _count(self.totals, utterance.as_record())
        if not self.keep:
            return
        self.finished.append(utterance)
        if len(self.finished) > MAX_UTTERANCES_RECORDED:
            del self.finished[0]
