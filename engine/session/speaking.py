"""Speaking: what the agent says, and what the caller heard of it.

Where the frame goes: `session/replying.py` hands each whole sentence to
`Speaking.say_sentence`, which synthesizes it straight into the outbound queue through
the call's `Voice`; the `Voice` puts audio and marks on the stream's `AudioOut` port,
played by `telephony/outbound.py`. Marks come back (`CallSession.on_mark`) once the
caller has heard the audio before them, so after a barge-in the marks tell how much of
the answer was heard.

- `Voice`, one per call (the session owns it): the outbound queue, marks, `clear`, and
  whole lines in the session's own voice (placeholder greeting, goodbye, supervisor).
- `Speaking`, one per conversation: the agent's speech in flight (the task a barge-in
  cuts), sentences with progress marks, what the caller heard, Twilio's own <Say>
  when every voice has failed, and winding down after the sentence being spoken (the
  cost cap).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
                    line.audio_bytes += len(event.ulaw)
                    self.queue_audio(event.ulaw)
                    if progress_marks:
                        last = line.progress[-1][1] if line.progress else 0
                        if line.audio_bytes - last >= PROGRESS_MARK_BYTES:
                            line.progress.append((self.queue_progress_mark(),
                                                  line.audio_bytes))
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


class Speaking:
    """The agent's speech in one conversation: replies and lines, sentence by sentence."""

    def __init__(self, session: CallSession, tts: TextToSpeech) -> None:
        self.session = session
        self.voice = session.voice
        self.tts = tts
        self.log = log.bind(call_sid=session.call_sid)
        # The task speaking for the agent now (a reply, a greeting, a "pardon?").
        self._task: asyncio.Task[Any] | None = None
        self.interrupted = False  # that speech was cut already: a barge-in cuts once
        self._lines: list[Spoken] = []  # that speech's sentences queued so far
        self._synthesizing = False  # a sentence of it is being synthesized now
        self.closing = False  # winding down: no new sentence starts

    # -- the speech in flight -------------------------------------------------------------

    def agent_speaking(self) -> bool:
        task = self._task
        return (task is not None and not task.done()) or self.voice.is_playing()

    def speak_in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        self.interrupted = False
        self._lines = []
        self._task = self.session.spawn(coro, "reply")

    def speak_in_this_task(self) -> None:
        """The running task (a caller turn's) goes on to speak the answer."""
        self.interrupted = False
        self._lines = []
        self._task = asyncio.current_task()

    def stop(self) -> None:
        """Stop generation and synthesis (what is queued still plays)."""
        task = self._task
        # Never the running task: a reply that ends in a handoff must finish the handoff.
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def interrupt(self, reason: str) -> None:
        """Stop generation and synthesis, and cut what the caller hears now."""
        self.interrupted = True
        self.log.info("turn.barge_in", reason=reason)
        self.stop()
        self.session.spawn(self.voice.clear(), "clear")

    def finish_sentence(self) -> None:
        """Say nothing after the sentence being spoken (`wind_down` then stops)."""
        self.closing = True

    async def wind_down(self, timeout_s: float) -> None:
        """Let the caller hear the sentence being spoken to its end (return at once when
        the agent is idle or still thinking), then stop the speech in flight and drop
        what is queued after that sentence. New lines may be said afterwards."""
        self.closing = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._sentence_heard()
        except TimeoutError:
            self.log.warning("turn.wind_down_timeout", timeout_s=timeout_s)
        self.stop()
        await self.voice.clear()
        self.closing = False

    async def _sentence_heard(self) -> None:
        voice = self.voice
        while True:
            playing = next((s for s in self._lines if not voice.mark_heard(s.mark)), None)
            if playing is not None:
                await voice.wait_mark(playing.mark)
                return
            if not self._synthesizing and not voice.is_playing():
                return
            # Its first sentence is still being synthesized: its mark follows its audio.
            await asyncio.sleep(0.02)

    # -- sentences ----------------------------------------------------------------------

    async def say_lines(self, lines: list[str], speaker: str) -> None:
        """Say fixed lines (greeting, "pardon?", handoff line) and wait until heard."""
        spoken: list[Spoken] = []
        unsaid: list[str] = []
        line_id = f"{self.session.call_sid}-{speaker[0]}{time.monotonic_ns()}"
        try:
            for line in lines:
                await self.say_sentence(line, spoken, None, unsaid)
            if unsaid:
                await self.say_via_twilio(unsaid)
            if spoken:
                await self.voice.wait_mark(spoken[-1].mark, timeout=30.0)
        finally:
            heard = self.heard(spoken)
            obs = self.session.observer
            if obs is not None and spoken:
                full = " ".join(s.text for s in spoken)
                obs.transcript(self.session, speaker, full, True, line_id=line_id,
                               interrupted=heard != full, heard_text=heard)

    async def say_sentence(self, text: str, spoken: list[Spoken],
                           first_audio: list[float] | None, unsaid: list[str]) -> None:
        """Synthesize one sentence straight into the outbound queue, then a mark.

        When every voice has failed (nothing synthesized yet), the sentence goes to
        `unsaid`, for Twilio's own <Say>; so do the sentences after it.
        """
        if self.closing:  # winding down: the sentence being spoken was the last
            return
        if unsaid:
            unsaid.append(text)
            return
        line = Spoken(text)
        self._lines = spoken
        self._synthesizing = True
        try:
            await self.voice.synthesize(line, self.tts, first_audio, progress_marks=True)
        except ProviderError as exc:
            if line.audio_bytes:
                raise
            self.log.error("turn.tts_unavailable", error=str(exc))
            unsaid.append(text)
            return
        finally:
            self._synthesizing = False
        line.mark = self.voice.queue_mark("s")
        spoken.append(line)

    async def say_via_twilio(self, unsaid: list[str]) -> None:
        """Every voice failed: let Twilio say it (<Say>), and the call goes on."""
        obs = self.session.observer
        if obs is not None:
            obs.alert(self.session, "provider_down", "critical",
                      "no text-to-speech provider works: Twilio <Say> used", {})
        await self.session.say_via_twilio(" ".join(unsaid))

    def heard(self, spoken: list[Spoken]) -> str:
        """What the caller heard, from the marks that came back before any clear: whole
        sentences, then the share of the cut sentence its progress marks vouch for."""
        heard: list[str] = []
        voice = self.voice
        for s in spoken:
            if voice.mark_heard(s.mark):
                heard.append(s.text)
                continue
            played = max((n for m, n in s.progress if voice.mark_heard(m)), default=0)
            words = s.text.split()
            count = int(len(words) * played / s.audio_bytes) if s.audio_bytes else 0
            if count:
                heard.append(" ".join(words[:count]) + "…")
            break
        return " ".join(heard)
