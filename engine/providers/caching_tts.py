"""A TextToSpeech in front of another that replays audio from the response cache.

A repeated sentence (the greeting, FAQ answers) then costs no TTS characters and starts
playing at once; replayed audio reports a free `Usage` with `cached` set.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from engine.providers.base import (
    AudioChunk,
    SynthesisDone,
    SynthesisEvent,
    TextToSpeech,
    Timing,
    Usage,
)
from engine.providers.response_cache import ResponseCache

# 100 ms of mu-law 8 kHz: cached audio is replayed in chunks like a live stream.
CACHED_CHUNK_BYTES = 800


class CachingTTS:
    """A TextToSpeech that replays cached audio and stores what `inner` synthesizes.

    Wrap each provider inside a fallback chain (not the chain itself), so audio is keyed
    by the provider that really produced it. The key includes the provider's `model`
    when it names one, so changing the model does not replay the old one's audio.
    Only complete streams are stored: a barge-in, an error or a truncated end is not.
    """

    def __init__(self, inner: TextToSpeech, cache: ResponseCache) -> None:
        self.inner = inner
        self.cache = cache
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

    def estimate_usage(self, text: str) -> Usage:
        return self.inner.estimate_usage(text)

    async def warm_up(self) -> None:
        await self.inner.warm_up()

    async def aclose(self) -> None:
        await self.inner.aclose()
