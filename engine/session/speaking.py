"""Speaking: what the agent says, and what the caller heard of it.

Where the frame goes: `session/replying.py` hands each whole sentence to
`Speaking.say_sentence`, which synthesizes it straight into the outbound queue through
the call's `Voice`; the `Voice` puts audio and marks on the stream's `AudioOut` port,
played by `telephony/outbound.py`. Marks come back (`CallSession.on_mark`) once the
caller has heard the audio before them, so after a barge-in the marks tell how much of
the answer was heard.

- `Voice` (`voice.py`), one per call: the outbound queue, marks, `clear`, whole lines in
  the session's own voice.
- `Speaking`, one per conversation: the agent's speech in flight (the task a barge-in
  cuts), sentences with progress marks, what the caller heard, Twilio's own <Say>
  when every voice has failed, and winding down after the sentence being spoken (the
  cost cap).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from engine.log import get_logger
from engine.providers.base import (
    AudioChunk,
    ProviderError,
    TextSpoken,
    TextToSpeech,
)
from engine.providers.fallback_tts import FallbackTTS
from engine.providers.text_feed import TextFeed
from engine.session.voice import Spoken, count_audio

if TYPE_CHECKING:
    from engine.session.call_session import CallSession

log = get_logger(__name__)

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

    async def say_streamed(self, feed: TextFeed, tts: FallbackTTS, spoken: list[Spoken],
                           first_audio: list[float], on_line: Callable[[], None]) -> None:
        """Speak the text `feed` is given as it is written, through a voice that takes it
        so: audio is queued as it comes (with progress marks), and each `TextSpoken`
        closes a line with its mark (`on_line` then). Raises ProviderError when no voice
        works; `spoken` then says whether any audio left."""
        voice = self.voice
        self._lines = spoken
        self._synthesizing = True
        line = Spoken("")
        said = 0  # characters of the feed the lines so far speak
        try:
            async with aclosing(tts.synthesize_stream(feed)) as events:
                async for event in events:
                    if isinstance(event, AudioChunk):
                        if not first_audio and feed.first_at is not None:
                            now = time.monotonic()
                            first_audio.extend((now, now - feed.first_at))
                        count_audio(voice, line, event.ulaw)
                    elif isinstance(event, TextSpoken):
                        said += len(event.text)
                        line.text = event.text.strip()
                        line.mark = voice.queue_mark("s")
                        spoken.append(line)
                        on_line()
                        line = Spoken("")
        finally:
            self._synthesizing = False
        if line.audio_bytes:  # audio after the last TextSpoken: the rest of the text
            line.text = feed.text[said:].strip()
            line.mark = voice.queue_mark("s")
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
