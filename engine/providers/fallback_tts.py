"""The text-to-speech fallback chain: a voice over several providers, for whole
sentences (`synthesize`) and for text fed as it is written (`synthesize_stream`). The
chains' common ground is `fallback.py`'s.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import replace

from engine.providers.base import (
    AudioChunk,
    ProviderError,
    ReportsUsage,
    StreamedSynthesisEvent,
    StreamingTextToSpeech,
    SynthesisDone,
    SynthesisEvent,
    TextToSpeech,
    Timing,
    Usage,
)
from engine.providers.caching_tts import CachingTTS
from engine.providers.chain import FallbackEventHandler, UsageNames
from engine.providers.fallback import DRAIN_TIMEOUT_S, FallbackChain, TruncatedSynthesisDone
from engine.providers.sentence_voice import by_sentence
from engine.providers.streamed import Streamed, stream_first_served
from engine.providers.text_feed import TextFeed

# --- text-to-speech ------------------------------------------------------------------


class _Synthesis(Streamed[TextToSpeech, SynthesisEvent]):
    done_type = SynthesisDone
    nothing_error = "stream ended without audio"

    def __init__(self, text: str) -> None:
        self.text = text

    def open(self, provider: TextToSpeech) -> AsyncIterator[SynthesisEvent]:
        return provider.synthesize(self.text)

    def has_output(self, event: SynthesisEvent) -> bool:
        return isinstance(event, AudioChunk) and bool(event.ulaw)

    def check_first(self, provider: TextToSpeech, first: SynthesisEvent) -> None:
        if isinstance(first, SynthesisDone) and self.text.strip():
            # Silence for real text: the caller would hear nothing.
            raise ProviderError(provider.name, "no audio for non-empty text")

    def estimate(self, provider: TextToSpeech, names: UsageNames,
                 emitted: list[SynthesisEvent]) -> Usage:
        # Vendors bill the request whether or not the audio arrived; the provider knows its
        # unit (characters, or tokens for a voice billed per token).
        return replace(provider.estimate_usage(self.text), provider=names[0], model=names[1],
                       estimated=True)

    def truncated(self, usage: Usage, first_byte_s: float, total_s: float) -> SynthesisEvent:
        return TruncatedSynthesisDone(usage=usage, timing=Timing(first_byte_s, total_s))


class _StreamedSynthesis(Streamed[TextToSpeech, StreamedSynthesisEvent]):
    """Audio for text fed as it is written; a voice taking over reads the text from the
    start. The first-audio clock starts at the first text (`ready`)."""

    done_type = SynthesisDone
    nothing_error = "stream ended without audio"

    def __init__(self, feed: TextFeed) -> None:
        self.feed = feed
        self._opened: dict[str, AsyncIterator[StreamedSynthesisEvent]] = {}

    async def ready(self) -> None:
        await self.feed.wait_first()

    def open(self, provider: TextToSpeech) -> AsyncIterator[StreamedSynthesisEvent]:
        if isinstance(provider, StreamingTextToSpeech):
            stream = provider.synthesize_stream(self.feed.reader())
        else:
            stream = by_sentence(provider, self.feed.reader())
        self._opened[provider.name] = stream
        return stream

    def has_output(self, event: StreamedSynthesisEvent) -> bool:
        return isinstance(event, AudioChunk) and bool(event.ulaw)

    def check_first(self, provider: TextToSpeech, first: StreamedSynthesisEvent) -> None:
        if isinstance(first, SynthesisDone) and self.feed.text.strip():
            raise ProviderError(provider.name, "no audio for non-empty text")

    def estimate(self, provider: TextToSpeech, names: UsageNames,
                 emitted: list[StreamedSynthesisEvent]) -> Usage:
        # The stream's own count of what it sent, when it keeps one; else all the text.
        stream = self._opened.get(provider.name)
        reported = stream.usage if isinstance(stream, ReportsUsage) else None
        usage = reported or provider.estimate_usage(self.feed.text)
        return replace(usage, provider=names[0], model=names[1], estimated=True)

    def truncated(self, usage: Usage, first_byte_s: float,
                  total_s: float) -> StreamedSynthesisEvent:
        return TruncatedSynthesisDone(usage=usage, timing=Timing(first_byte_s, total_s))


class FallbackTTS(FallbackChain[TextToSpeech]):
    """TextToSpeech over several providers; `first_audio_timeout_s` bounds the first chunk.

    `voice` and `model` are those of the provider that served last (the first one's until
    then).
    """

    def __init__(self, providers: Sequence[TextToSpeech], *, first_audio_timeout_s: float,
                 breaker_failures: int = 3, breaker_reset_s: float = 30.0,
                 on_event: FallbackEventHandler | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        super().__init__("tts", providers, breaker_failures, breaker_reset_s, on_event, clock,
                         drain_timeout_s)
        self.first_audio_timeout_s = first_audio_timeout_s

    @property
    def voice(self) -> str:
        return self._chain.current.voice

    def estimate_usage(self, text: str) -> Usage:
        return self._chain.current.estimate_usage(text)

    def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        return stream_first_served(self._chain, self.first_audio_timeout_s,
                                    _Synthesis(text))

    @property
    def streams_text(self) -> bool:
        """Whether the first voice starts before the text is complete (input streaming);
        else text fed as it is written is spoken sentence by sentence."""
        first = self._chain.providers[0]
        if isinstance(first, CachingTTS):
            return first.streams_text
        return isinstance(first, StreamingTextToSpeech)

    def synthesize_stream(self, feed: TextFeed
                          ) -> AsyncGenerator[StreamedSynthesisEvent, None]:
        """Audio for the text `feed` is given as it is written; `TextSpoken` events say
        what the audio so far speaks."""
        return stream_first_served(self._chain, self.first_audio_timeout_s,
                                    _StreamedSynthesis(feed))
