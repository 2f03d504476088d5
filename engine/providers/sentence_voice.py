"""A voice that needs whole requests, fed text as it is written: one request per sentence.

An HTTP voice (OpenAI, Piper, espeak, ElevenLabs' HTTP endpoint) cannot take text before
it is complete, so the text is cut into sentences (`sentences.py`; the first piece at its
first clause when `first_clause_words` is set) and each is synthesized as soon as it is
whole, followed by `TextSpoken`. The usage of the sentences is reported as one, at the end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from engine.providers.base import (
    AudioChunk,
    StreamedSynthesisEvent,
    SynthesisDone,
    TextSpoken,
    TextToSpeech,
    Timing,
    Usage,
)
from engine.providers.sentences import SentenceAggregator


async def by_sentence(tts: TextToSpeech, text: AsyncIterator[str],
                      first_clause_words: int = 0
                      ) -> AsyncGenerator[StreamedSynthesisEvent, None]:
    """`tts` over `text`, sentence by sentence (see the module's docstring)."""
    started = time.monotonic()
    first_byte: float | None = None
    usage: Usage | None = None
    async with aclosing(_sentences(text, first_clause_words)) as sentences:
        async for sentence in sentences:
            done: SynthesisDone | None = None
            async with aclosing(tts.synthesize(sentence)) as events:
                async for event in events:
                    if isinstance(event, AudioChunk):
                        if first_byte is None:
                            first_byte = time.monotonic() - started
                        yield event
                    else:
                        done = event
            if done is not None:
                usage = done.usage if usage is None else merged(usage, done.usage)
                if done.truncated:  # the voice failed mid-sentence: the stream ends here
                    yield SynthesisDone(usage, Timing(first_byte, time.monotonic() - started),
                                        truncated=True)
                    return
            yield TextSpoken(sentence)
    if usage is None:  # no text at all
        usage = Usage(provider=tts.name, kind="tts", model=tts.model)
    yield SynthesisDone(usage, Timing(first_byte, time.monotonic() - started))


async def _sentences(text: AsyncIterator[str], first_clause_words: int
                     ) -> AsyncGenerator[str, None]:
    aggregator = SentenceAggregator(first_clause_words)
    async for piece in text:
        for sentence in aggregator.push(piece):
            yield sentence
    rest = aggregator.flush()
    if rest:
        yield rest


def merged(a: Usage, b: Usage) -> Usage:
    """Two requests of one voice as one: the amounts added; cached only when both were
    (a cache hit consumed nothing, so its amounts are zero), estimated when either was."""
    return Usage(provider=a.provider, kind=a.kind, model=a.model or b.model,
                 audio_seconds=a.audio_seconds + b.audio_seconds,
                 input_tokens=a.input_tokens + b.input_tokens,
                 cached_input_tokens=a.cached_input_tokens + b.cached_input_tokens,
                 output_tokens=a.output_tokens + b.output_tokens,
                 characters=a.characters + b.characters,
                 cpu_seconds=a.cpu_seconds + b.cpu_seconds,
                 estimated=a.estimated or b.estimated, cached=a.cached and b.cached)
