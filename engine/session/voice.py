"""The call's voice: what goes out to the caller on the current media stream, and which
of it the caller heard.

`Voice`, one per call (the session owns it): the outbound queue, marks, `clear`, and
whole lines in the session's own voice (placeholder greeting, goodbye, supervisor). It
puts audio and marks on the stream's `AudioOut` port, played by `telephony/outbound.py`;
marks come back (`CallSession.on_mark`) once the caller has heard the audio before them.
`Spoken` is one line queued, with its marks. The agent's replies are `speaking.py`'s.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.log import get_logger
from engine.providers.base import AudioChunk, ProviderError, SynthesisDone, TextToSpeech
from engine.session.ports import AudioOut

if TYPE_CHECKING:
    from engine.session.call_session import CallSession

log = get_logger(__name__)

# A progress mark every this many bytes of a sentence (400 ms of audio): after a
# barge-in, the part of the sentence the caller heard is known to within 400 ms.
PROGRESS_MARK_BYTES = 3200


@dataclass(slots=True)
class Spoken:
    """One line queued for the caller."""

    text: str
    mark: str = ""  # queued after the line's audio: echoed once all of it was heard
    audio_bytes: int = 0
    from_cache: bool = False  # replayed from the response cache: no TTS call
    progress: list[tuple[str, int]] = field(default_factory=list)  # (mark, bytes before it)


class Voice:
    """The call's outbound voice: audio and marks queued on the current stream's
    `AudioOut`, and which marks came back heard."""

    def __init__(self, session: CallSession) -> None:
        self.session = session
        self.player: AudioOut | None = None
        self.log = log.bind(call_sid=session.call_sid)
        self._mark_ids = itertools.count(1)
        self._mark_waiters: dict[str, asyncio.Future[bool]] = {}
        self._cleared_marks: set[str] = set()
        self._heard_marks: set[str] = set()
        self._line_lock = asyncio.Lock()  # whole lines in the session's voice, one at a time

    # -- the stream ---------------------------------------------------------------------

    def attach(self, player: AudioOut) -> None:
        """A media stream (the first, or the one Twilio opened after a <Say>): marks
        cleared on an older stream never come back on this one."""
        self.player = player
        self._cleared_marks.clear()

    def detach(self) -> None:
        """The stream is gone and another may follow: pending marks were not heard."""
        self.player = None
        self._forget_pending_marks()

    def close(self) -> None:
        self._forget_pending_marks()
        if self.player is not None:
            self.player.close()

    def _forget_pending_marks(self) -> None:
        for fut in self._mark_waiters.values():
            if not fut.done():
                fut.set_result(False)
        self._mark_waiters.clear()

    def _live_player(self) -> AudioOut:
        player = self.player
        if player is None or player.closed:
            raise ConnectionError("no live media stream")
        return player

    # -- marks --------------------------------------------------------------------------

    def on_mark(self, name: str) -> None:
        # A mark echoed after we sent `clear` was flushed, not played.
        heard = name not in self._cleared_marks
        self._cleared_marks.discard(name)
        if heard:
            self._heard_marks.add(name)
        fut = self._mark_waiters.pop(name, None)
        if fut is not None and not fut.done():
            fut.set_result(heard)

    def mark_heard(self, name: str) -> bool:
        """True once the edge reported the audio up to mark `name` as played."""
        return name in self._heard_marks

    async def wait_mark(self, name: str, timeout: float | None = None) -> bool:
        """True once the caller has heard everything up to mark `name`."""
        fut = self._mark_waiters.get(name)
        if fut is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            return False

    # -- the outbound queue -------------------------------------------------------------

    def queue_audio(self, ulaw: bytes) -> None:
        """Queue mu-law audio for the caller (sent paced, in whole frames)."""
        self._live_player().enqueue_audio(ulaw)

    def queue_mark(self, prefix: str = "u") -> str:
        """Queue a mark after the audio queued so far; returns its name."""
        player = self._live_player()
        name = f"{prefix}{next(self._mark_ids)}"
        self._mark_waiters[name] = asyncio.get_running_loop().create_future()
        player.enqueue_mark(name)
        return name

    def queue_progress_mark(self, prefix: str = "p") -> str:
        """A mark inside a sentence (no padding, nobody waits on it): how far playback got
        when the caller cut the agent off."""
        name = f"{prefix}{next(self._mark_ids)}"
        self._live_player().enqueue_mark(name, pad=False)
        return name

    async def play_ulaw(self, ulaw: bytes, prefix: str = "u") -> str:
        """Queue audio followed by a mark; returns the mark name."""
        self.queue_audio(ulaw)
        return self.queue_mark(prefix)

    async def clear(self) -> None:
        """Cut playback now (barge-in): drop queued audio, `clear` the edge's buffer."""
        player = self.player
        if player is None:
            return
        pending = [name for name, fut in self._mark_waiters.items() if not fut.done()]
        dropped = set(await player.clear())
        for name in pending:
            if name in dropped:  # never sent: certainly not heard
                fut = self._mark_waiters.pop(name)
                fut.set_result(False)
            else:  # sent: the edge echoes it after the clear
                self._cleared_marks.add(name)

    def is_playing(self) -> bool:
        player = self.player
        return player is not None and player.is_playing(asyncio.get_running_loop().time())

    # -- synthesis ----------------------------------------------------------------------

    async def synthesize(self, line: Spoken, tts: TextToSpeech,
                         first_audio: list[float] | None = None,
                         progress_marks: bool = False) -> None:
        """Stream `line.text` through `tts` straight into the outbound queue, counting
        into `line` as it goes (a caller catching ProviderError sees whether any audio
        left). `first_audio`, when empty, receives (when, seconds to the first audio).
        The line's own end mark is the caller's to queue. The chain books the usage."""
        started = time.monotonic()
        async with aclosing(tts.synthesize(line.text)) as events:
            async for event in events:
                if isinstance(event, AudioChunk):
                    if not line.audio_bytes and first_audio is not None and not first_audio:
                        now = time.monotonic()
                        first_audio.extend((now, now - started))
                    if progress_marks:
                        count_audio(self, line, event.ulaw)
                    else:
                        line.audio_bytes += len(event.ulaw)
                        self.queue_audio(event.ulaw)
                elif isinstance(event, SynthesisDone):
                    line.from_cache = event.usage.cached

    async def say(self, text: str, speaker: str) -> Spoken:
        """One whole line in the session's voice, queued with its mark; it shows in the
        transcript once queued, not once heard."""
        session = self.session
        tts = session.tts
        self._live_player()
        async with self._line_lock:
            line = Spoken(text)
            try:
                await self.synthesize(line, tts)
            except ProviderError as exc:
                self.log.warning("call.tts_failed", provider=tts.name, error=str(exc))
                raise
            line.mark = self.queue_mark()
        if session.observer is not None:
            session.observer.transcript(session, speaker, text, True,
                                        line_id=f"{session.call_sid}-{line.mark}")
        return line

    async def speak(self, text: str, speaker: str = "agent") -> bool:
        """Say one line in the session's voice; True once heard, False if cut."""
        line = await self.say(text, speaker)
        return await self.wait_mark(line.mark, timeout=line.audio_bytes / 8000 + 10.0)


def count_audio(voice: Voice, line: Spoken, ulaw: bytes) -> None:
    """Queue `ulaw` for `line`, with a progress mark every PROGRESS_MARK_BYTES."""
    line.audio_bytes += len(ulaw)
    voice.queue_audio(ulaw)
    last = line.progress[-1][1] if line.progress else 0
    if line.audio_bytes - last >= PROGRESS_MARK_BYTES:
        line.progress.append((voice.queue_progress_mark(), line.audio_bytes))
