"""Offline text-to-speech with espeak-ng: mu-law 8 kHz chunks, free, instant.

espeak speaks a sentence in a few milliseconds (real-time factor ~0.001), so the whole
sentence is synthesized at once and then handed out in small chunks; pacing to real
time is the telephony side's job.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from engine.audio.codec import SAMPLE_RATE as ULAW_RATE
from engine.log import get_logger
from engine.providers.base import (
    AudioChunk,
    ProviderError,
    SynthesisDone,
    SynthesisEvent,
    Timing,
    Usage,
)
from engine.providers.builtin.espeak_engine import EspeakEngine, get_espeak

log = get_logger(__name__)

MODEL = "espeak-ng"


class EspeakTTS:
    """TextToSpeech over the process-wide espeak engine."""

    name = "espeak"

    def __init__(self, voice: str = "en-us", rate_wpm: int = 175, chunk_ms: int = 100,
                 engine: EspeakEngine | None = None) -> None:
        if chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        self.voice = voice
        self.rate_wpm = rate_wpm
        self._chunk_bytes = ULAW_RATE * chunk_ms // 1000  # mu-law: one byte per sample
        self._engine = engine or get_espeak()

    async def synthesize(self, text: str) -> AsyncIterator[SynthesisEvent]:
        started = time.perf_counter()
        try:
            audio = await self._engine.synthesize_ulaw8k(text, self.voice, self.rate_wpm)
        except ProviderError as exc:
            log.warning("espeak_synthesis_failed", voice=self.voice, error=str(exc))
            raise
        except Exception as exc:  # ctypes/numpy surprises become provider failures
            log.error("espeak_synthesis_crashed", voice=self.voice, error=repr(exc))
            raise ProviderError(self.name, f"synthesis failed: {exc!r}") from exc
        first_byte_s: float | None = None
        for offset in range(0, len(audio), self._chunk_bytes):
            if first_byte_s is None:
                first_byte_s = time.perf_counter() - started
            yield AudioChunk(ulaw=audio[offset:offset + self._chunk_bytes])
        yield SynthesisDone(
            usage=Usage(provider=self.name, kind="tts", model=MODEL, characters=len(text)),
            timing=Timing(first_byte_s=first_byte_s, total_s=time.perf_counter() - started),
        )

    async def aclose(self) -> None:
        # The engine is shared by the whole process; nothing of ours to release.
        return None
