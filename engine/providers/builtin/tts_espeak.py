"""Offline text-to-speech with espeak-ng: mu-law 8 kHz chunks, free, instant.

espeak speaks a sentence in a few milliseconds (real-time factor ~0.001), so the whole
sentence is synthesized at once and then handed out in small chunks; pacing to real
time is the telephony side's job.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from engine.audio.codec import SAMPLE_RATE as ULAW_RATE
from engine.config import Config
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
from engine.providers.registry import Billing, BillingUnit, ProviderSettings, ProviderSpec, register

log = get_logger(__name__)

MODEL = "espeak-ng"


class EspeakSettings(ProviderSettings):
    voice: str = "en-us"
    rate_wpm: int = 175
    # The simulated caller speaks with another voice, so the two are told apart.
    caller_voice: str = "en-us+m3"


class EspeakTTS:
    """TextToSpeech over the process-wide espeak engine."""

    name = "espeak"
    model = MODEL
    runs_locally = True  # a cut sentence is closed, not read on (engine.providers.base)

    def __init__(self, voice: str = "en-us", rate_wpm: int = 175, chunk_ms: int = 100,
                 engine: EspeakEngine | None = None) -> None:
        if chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        self.voice = voice
        self.rate_wpm = rate_wpm
        self._chunk_bytes = ULAW_RATE * chunk_ms // 1000  # mu-law: one byte per sample
        self._engine = engine or get_espeak()

    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
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
            usage=Usage(provider=self.name, kind="tts", model=self.model,
                        characters=len(text)),
            timing=Timing(first_byte_s=first_byte_s, total_s=time.perf_counter() - started),
        )

    def estimate_usage(self, text: str) -> Usage:
        """Billed by characters (a cut sentence's, when nothing reported them)."""
        return Usage(provider=self.name, kind="tts", model=self.model, characters=len(text),
                     estimated=True)

    async def warm_up(self) -> None:
        """Nothing to load: the library initializes on the first sentence (milliseconds)."""

    async def aclose(self) -> None:
        # The engine is shared by the whole process; nothing of ours to release.
        return None


def espeak_settings(config: Config) -> EspeakSettings:
    """The `[providers.espeak]` table: the engine's voice, and the simulated caller's."""
    return config.providers.settings("espeak", EspeakSettings)


def build(settings: EspeakSettings, config: Config) -> EspeakTTS:
    return EspeakTTS(voice=settings.voice, rate_wpm=settings.rate_wpm)


# Free on our own CPU, unless a [[prices.models]] entry prices it per 1K characters.
SPEC = register(ProviderSpec(name="espeak", kind="tts", settings=EspeakSettings, build=build,
                             billing=(Billing(BillingUnit.CHARACTERS),
                                      Billing(BillingUnit.FREE))))
