"""Hearing: what the caller said in a turn, ready when the turn ends, and whether the
words so far make a finished turn (semantic endpointing).

Where a frame goes: `session/turn_taking.py` runs the endpointer on every inbound frame
and tells `Hearing` about each frame of a turn in progress (`frame`, the hot path: a few
attribute reads unless something happens).

A turn's audio is cut into segments at the caller's pauses (`turns.pause_ms` of silence
after speech for a streaming recognizer, `local_pause_ms` for a local one), and each
segment is transcribed as soon as it is cut: heard as it was
spoken by a streaming recognizer (a stream opened when the segment starts, fed every
100 ms), or, when the first recognizer runs locally, transcribed at the cut. So when
the turn ends its transcript is mostly there. At each pause the words so far are judged
(`completeness.py`): a finished question or answer ends the turn after
`turns.complete_silence_ms`, words that trail off ("and…", "my number is 4 1 5") wait
`turns.trailing_silence_ms`, anything else the usual `endpoint_silence_ms`.

Without either (a cloud recognizer that takes whole requests, or
`turns.semantic_endpointing = false`) there is one segment, transcribed at the turn's end
(streamed while spoken when the recognizer streams). Every request goes through the STT
chain, which books it and falls back to the next recognizer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.audio.vad import Endpointer, SpeechEnded
from engine.config import TurnConfig
from engine.log import get_logger
from engine.providers.base import (
    ProviderError,
    SpeechStream,
    SpeechToText,
    Transcript,
)
from engine.providers.fallback import FallbackSTT
from engine.session.completeness import completeness

if TYPE_CHECKING:
    from engine.session.call_session import CallSession

log = get_logger(__name__)

SAMPLE_RATE = 8000
# A streaming recognizer is sent the turn's audio this often (5 frames = 100 ms): fewer,
# larger messages than one per 20 ms frame.
_STREAM_EVERY_FRAMES = 5


@dataclass(slots=True)
class _Segment:
    """A stretch of one turn's utterance between two pauses (PCM16 byte offsets)."""

    start: int
    stream: SpeechStream | None
    sent: int = 0  # bytes of it sent to the stream
    voiced: bool = False  # any speech in it (a segment of silence is not transcribed)
    end: int | None = None
    # Its transcript, or the chain's error (kept as a value: not a crash of the call).
    task: asyncio.Task[Transcript | ProviderError] | None = None


@dataclass(slots=True)
class HeardTurn:
    """One turn's segments, handed over when the turn ends."""

    segments: list[_Segment] = field(default_factory=list)
    ended_at: float = 0.0  # monotonic time the turn ended

    async def transcript(self) -> Transcript:
        """The turn's transcript: its segments' joined (ProviderError when one failed)."""
        results = [await s.task for s in self.segments if s.task is not None]
        if not results:
            raise ValueError("a heard turn has at least one transcribed segment")
        for result in results:
            if isinstance(result, ProviderError):
                raise result
        parts = [r for r in results if isinstance(r, Transcript)]
        if len(parts) == 1:
            return parts[0]
        longest = max(parts, key=lambda t: len(t.text))
        return Transcript(text=_joined(parts),
                          confidence=longest.confidence, usage=parts[-1].usage,
                          timing=parts[-1].timing)


class Hearing:
    """Segments, streams and the endpoint's silence for one conversation's turns."""

    def __init__(self, session: CallSession, turns: TurnConfig, endpointer: Endpointer,
                 on_complete: Callable[[SpeechEnded], None],
                 on_pause: Callable[[str], None] | None = None,
                 on_resume: Callable[[], None] | None = None) -> None:
        self.session = session
        self.endpointer = endpointer
        self._on_complete = on_complete  # the turn ends now: its words are complete
        # The words at a pause that does not end the turn at once may be the whole turn:
        # `on_pause` gets them; `on_resume`: the caller went on after a pause.
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._semantic = turns.semantic_endpointing
        self._stream_pause_ms = turns.pause_ms
        self._local_pause_ms = turns.local_pause_ms
        self._pause_ms = turns.pause_ms  # the turn's: by its recognizer
        self._complete_ms = turns.complete_silence_ms
        self._trailing_ms = turns.trailing_silence_ms
        self._endpoint_ms = turns.endpoint_silence_ms
        self._stt: FallbackSTT | None = None  # the turn's recognizer chain
        self._streams = False
        self._cut_at_pauses = False
        self._turn = HeardTurn()
        self._open: _Segment | None = None  # the segment being spoken
        self._turn_id = 0
        self._frames = 0
        self.log = log.bind(call_sid=session.call_sid)

    # -- a turn in progress -------------------------------------------------------------

    def started(self, stt: SpeechToText) -> None:
        """A turn starts (the endpointer heard speech); `stt` is the turn's chain."""
        self._turn_id += 1
        self._turn = HeardTurn()
        self._open = None
        self._stt = stt if isinstance(stt, FallbackSTT) else None
        first = self._stt.first if self._stt is not None else None
        self._streams = self._stt is not None and self._stt.streams_audio
        self._cut_at_pauses = self._semantic and first is not None and (
            self._streams or first.runs_locally)
        self._pause_ms = self._stream_pause_ms if self._streams else self._local_pause_ms
        if self._stt is not None:
            self._open_segment(0)

    def frame(self) -> None:
        """One more frame of the turn in progress (the endpointer fed it)."""
        ep = self.endpointer
        silence = ep.silence_ms_so_far
        segment = self._open
        if silence == 0:  # speaking
            if segment is None:
                segment = self._open_segment(self._cut_end())
                ep.set_endpoint_silence(None)  # a judgement of the last pause is void
                if self._on_resume is not None:
                    self._on_resume()
            segment.voiced = True
        elif (self._cut_at_pauses and segment is not None and segment.voiced
              and silence >= self._pause_ms):
            self._cut(segment, ep.utterance_bytes, None)
            # The words are being read: the turn does not end before they are judged.
            ep.set_endpoint_silence(self._trailing_ms)
            return
        self._frames += 1
        if segment is not None and segment.stream is not None \
                and self._frames % _STREAM_EVERY_FRAMES == 0:
            self._send(segment, None)

    def ended(self, ended: SpeechEnded) -> HeardTurn | None:
        """The turn ended: its segments (None: transcribe `ended`'s audio whole)."""
        turn, segment = self._turn, self._open
        self._turn, self._open = HeardTurn(), None
        self._turn_id += 1  # a late judgement of this turn's pauses is void
        if self._stt is None:
            return None
        pcm = ended.utterance_pcm16
        if segment is not None:
            if segment.voiced or len(turn.segments) == 1:
                self._cut(segment, len(pcm), pcm, turn)
            else:  # silence after the last pause: nothing more was said
                turn.segments.remove(segment)
                if segment.stream is not None:
                    self.session.spawn(segment.stream.aclose(), "stt_stream_close")
        turn.ended_at = time.monotonic()
        return turn

    async def aclose(self) -> None:
        """Listening stops: a turn in progress is not transcribed."""
        segment, self._open = self._open, None
        self._turn_id += 1
        if segment is not None and segment.stream is not None:
            await segment.stream.aclose()

    # -- segments -----------------------------------------------------------------------

    def _open_segment(self, start: int) -> _Segment:
        stt = self._stt
        stream = stt.open_stream(SAMPLE_RATE) if stt is not None and self._streams else None
        segment = self._open = _Segment(start, stream)
        self._turn.segments.append(segment)
        if stream is not None:
            self._send(segment, None)
        return segment

    def _cut_end(self) -> int:
        ends = [s.end for s in self._turn.segments if s.end is not None]
        return max(ends, default=0)

    def _send(self, segment: _Segment, pcm: bytes | None) -> None:
        """Send the segment's new audio to its stream (from `pcm`, the whole utterance,
        when the endpointer no longer holds it)."""
        assert segment.stream is not None
        offset = segment.start + segment.sent
        limit = segment.end
        audio = (pcm[offset:limit] if pcm is not None
                 else self.endpointer.utterance_since(offset))
        if limit is not None and pcm is None:
            audio = audio[:max(limit - offset, 0)]
        if audio:
            segment.stream.push(audio)
            segment.sent += len(audio)

    def _cut(self, segment: _Segment, end: int, pcm: bytes | None,
             turn: HeardTurn | None = None) -> None:
        """End `segment` at byte `end` and transcribe it."""
        stt = self._stt
        assert stt is not None
        segment.end = end
        self._open = None
        audio = (pcm[segment.start:end] if pcm is not None
                 else self.endpointer.utterance_since(segment.start)[:end - segment.start])
        if segment.stream is not None:
            self._send(segment, pcm)
            work = stt.transcribe_streamed(segment.stream, audio, SAMPLE_RATE)
        else:
            work = stt.transcribe(audio, SAMPLE_RATE)
        segment.task = self.session.spawn(_settled(work), "stt_segment")
        if turn is None:  # a pause: judge the words so far when they are in
            turn_id = self._turn_id
            segment.task.add_done_callback(lambda _: self._judge(turn_id))

    def _judge(self, turn_id: int) -> None:
        """A pause's transcript is in: choose how much silence ends the turn."""
        if turn_id != self._turn_id or self._open is not None:
            return  # the turn ended, or the caller went on speaking
        tasks = [s.task for s in self._turn.segments if s.task is not None]
        if not all(t.done() and not t.cancelled() for t in tasks):
            return  # an earlier segment is still being read: its own judgement follows
        results = [t.result() for t in tasks]
        if any(isinstance(r, ProviderError) for r in results):
            self._end_after(None)  # no words to judge: the usual silence
            return
        words = _joined([r for r in results if isinstance(r, Transcript)])
        verdict = completeness(words)
        if verdict == "complete":
            self._end_after(self._complete_ms)
            return
        if words and self._on_pause is not None:  # the turn may end on these words
            self._on_pause(words)
        if verdict == "unknown":
            self._end_after(None)
        # trailing: the long wait set at the pause holds

    def _end_after(self, silence_ms: int | None) -> None:
        """The turn ends after `silence_ms` of silence (None: the configured endpoint
        silence): now, if the caller has been silent that long already."""
        ep = self.endpointer
        ep.set_endpoint_silence(silence_ms)
        if ep.silence_ms_so_far >= (silence_ms or self._endpoint_ms):
            ended = ep.end_now()
            if ended is not None:
                self._on_complete(ended)


async def _settled(work: Coroutine[Any, Any, Transcript]) -> Transcript | ProviderError:
    try:
        return await work
    except ProviderError as exc:
        return exc


def _joined(parts: list[Transcript]) -> str:
    """Segments' words as one turn's: what the turn's transcript and a pause's judgement
    read alike (a speculation is used only when they are the same words)."""
    return " ".join(t.text.strip() for t in parts if t.text.strip())
