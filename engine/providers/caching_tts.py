"""A TextToSpeech in front of another that replays audio from the response cache.

A repeated sentence (the greeting, FAQ answers) then costs no TTS characters and starts
playing at once; replayed audio reports a free `Usage` with `cached` set.

Fed text as it is written (`synthesize_stream`), a voice that streams its input is passed
the text and its audio is stored per whole sentence (the audio between two `TextSpoken`
events); a voice that needs whole requests is read sentence by sentence, each through
the cache (`sentence_voice.py`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

from engine.providers.base import (
    AudioChunk,
    ReportsUsage,
    StreamedSynthesisEvent,
    StreamingTextToSpeech,
    SynthesisDone,
    SynthesisEvent,
    TextSpoken,
    TextToSpeech,
    Timing,
    Usage,
)
from engine.providers.event_stream import EventStream
from engine.providers.response_cache import ResponseCache
from engine.providers.sentence_voice import by_sentence

# Text that ends a sentence: only such audio is stored from a streamed voice.
_SENTENCE_END = (".", "!", "?", "…")

# 100 ms of mu-law 8 kHz: cached audio is replayed in chunks like a live stream.
CACHED_CHUNK_BYTES = 800


class CachingTTS:
    """A TextToSpeech that replays cached audio and stores what `inner` synthesizes.

    Wrap each provider inside a fallback chain (not the chain itself), so audio is keyed
    by the provider that really produced it. The key includes the provider's `model`
    when it names one, so changing the model does not replay the old one's audio.
    Only complete streams are stored: a barge-in, an error or a truncated end is not.
    """

    def __init__(self, inner: TextToSpeech, cache: ResponseCache,
                 first_clause_words: int = 0) -> None:
        self.inner = inner
        self.cache = cache
        # The voice starts before the text is complete (else: sentence by sentence).
        self.streams_text = isinstance(inner, StreamingTextToSpeech)
        self.first_clause_words = first_clause_words
        self.name = inner.name
        self.voice = inner.voice
        self.runs_locally = inner.runs_locally  # as the voice it caches
        self._cache_provider = f"{inner.name}/{inner.model}" if inner.model else inner.name

    @property
    def model(self) -> str:
        return self.inner.model

    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        cacheable = bool(text.strip())
        started = time.monotonic()
        cached = (await self.cache.get_audio(self._cache_provider, self.voice, text)
                  if cacheable else None)
        if cached:
            elapsed = time.monotonic() - started
            for offset in range(0, len(cached), CACHED_CHUNK_BYTES):
                yield AudioChunk(cached[offset:offset + CACHED_CHUNK_BYTES])
            usage = Usage(provider=self.inner.name, kind="tts",
                          model=self.inner.model or "cache", cached=True)
            yield SynthesisDone(usage=usage, timing=Timing(elapsed,
                                                           time.monotonic() - started))
            return
        parts: list[bytes] = []
        stream = self.inner.synthesize(text)
        try:
            async for event in stream:
                if isinstance(event, AudioChunk):
                    parts.append(event.ulaw)
                elif cacheable and parts and not event.truncated:
                    # Store before handing over the end: a consumer may stop right after it.
                    await self.cache.put_audio(self._cache_provider, self.voice, text,
                                               b"".join(parts))
                yield event
        finally:
            await stream.aclose()

    def synthesize_stream(
            self, text: AsyncIterator[str]) -> AsyncGenerator[StreamedSynthesisEvent, None]:
        inner = self.inner
        if isinstance(inner, StreamingTextToSpeech):
            # Started here, not at the first read: the voice connects before the text.
            return _StoredBySentence(self, inner.synthesize_stream(text))
        return by_sentence(self, text, self.first_clause_words)

    async def store(self, sentence: str, ulaw: bytes) -> None:
        await self.cache.put_audio(self._cache_provider, self.voice, sentence, ulaw)

    def estimate_usage(self, text: str) -> Usage:
        return self.inner.estimate_usage(text)

    async def warm_up(self) -> None:
        await self.inner.warm_up()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _StoredBySentence(EventStream):
    """A streaming voice's events, each whole sentence's audio (the audio before a
    `TextSpoken` that ends a sentence) stored in the cache on the way; its `usage` is the
    voice stream's own, when it keeps one."""

    def __init__(self, owner: CachingTTS,
                 stream: AsyncGenerator[StreamedSynthesisEvent, None]) -> None:
        self._owner = owner
        self._stream = stream
        super().__init__(self._run())

    @property
    def usage(self) -> Usage | None:
        stream = self._stream
        return stream.usage if isinstance(stream, ReportsUsage) else None

    async def _run(self) -> AsyncGenerator[StreamedSynthesisEvent, None]:
        parts: list[bytes] = []
        async for event in self._stream:
            if isinstance(event, AudioChunk):
                parts.append(event.ulaw)
            elif isinstance(event, TextSpoken):
                sentence = event.text.strip()
                if parts and sentence.endswith(_SENTENCE_END):
                    await self._owner.store(sentence, b"".join(parts))
                parts = []
            yield event

    async def after_close(self) -> None:
        await self._stream.aclose()
