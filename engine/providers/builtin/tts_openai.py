"""Text-to-speech through OpenAI's speech endpoint, converted to Twilio's mu-law 8 kHz.

OpenAI streams `pcm` as raw 24 kHz 16-bit mono; each network chunk is resampled to
8 kHz and mu-law encoded as it arrives, so the first audio goes out without waiting for
the whole clip.

`gpt-4o-mini-tts` is billed per token, text in and audio out, and the endpoint reports
neither: the usage carries estimates, flagged as such (text tokens from the characters,
audio tokens from the length of the audio received at `audio_tokens_per_minute`), and the
characters, for a model billed per character (tts-1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncGenerator

import numpy as np

from engine.audio.codec import int16_to_ulaw
from engine.audio.resample import StreamResampler
from engine.config import Config
from engine.log import get_logger
from engine.providers.base import (
    AudioChunk,
    ProviderError,
    SynthesisDone,
    SynthesisEvent,
    Usage,
)
from engine.providers.builtin.openai_common import (
    ENV,
    PROVIDER,
    OpenAISettings,
    api_key,
    estimate_tokens,
    first_byte_deadline,
    openai,
)
from engine.providers.registry import Billing, BillingUnit, ProviderSpec, register

log = get_logger(__name__)

SOURCE_RATE = 24000  # OpenAI `pcm`: 24 kHz, 16-bit little-endian, mono
SOURCE_BYTES_PER_MINUTE = SOURCE_RATE * 2 * 60
# Ordinary speech, for estimating the audio of a request that never reported it.
SPOKEN_CHARACTERS_PER_SECOND = 15.0
TARGET_RATE = 8000


class Pcm24kToUlaw:
    """Incremental 24 kHz PCM16 bytes -> 8 kHz mu-law, across arbitrary chunk boundaries."""

    def __init__(self) -> None:
        self._resampler = StreamResampler(SOURCE_RATE, TARGET_RATE)
        self._odd = b""  # a sample split between two network chunks

    def feed(self, data: bytes) -> bytes:
        data = self._odd + data
        usable = len(data) - (len(data) % 2)
        self._odd = data[usable:]
        if not usable:
            return b""
        samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.int16, copy=False)
        out = self._resampler.process(samples)
        return int16_to_ulaw(np.ascontiguousarray(out, dtype=np.int16)) if out.size else b""

    def flush(self) -> bytes:
        out = self._resampler.flush()
        return int16_to_ulaw(np.ascontiguousarray(out, dtype=np.int16)) if out.size else b""


class OpenAITTS:
    """TextToSpeech over `POST /audio/speech` with `response_format="pcm"`."""

    name = PROVIDER  # the registry name: Usage, estimates and prices all say "openai"
    runs_locally = False  # a cut request is read on for its usage (engine.providers.drains)

    def __init__(self, api_key: str, base_url: str, model: str = "gpt-4o-mini-tts",
                 voice: str = "alloy", timeout_s: float = 8.0,
                 first_audio_timeout_s: float = 1.0, max_retries: int = 0,
                 instructions: str | None = None,
                 audio_tokens_per_minute: float = 1250.0) -> None:
        self.model = model
        self.voice = voice
        # Covers connecting, the response headers and the first bytes.
        self._first_audio = first_byte_deadline("tts", first_audio_timeout_s)
        self.instructions = instructions
        self.audio_tokens_per_minute = audio_tokens_per_minute
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url,
                                          timeout=timeout_s, max_retries=max_retries)

    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        if not text.strip():
            log.warning("tts_empty_text", provider=PROVIDER)
            raise ProviderError(PROVIDER, "nothing to synthesize: empty text", retryable=False)
        request = self._first_audio.request(self.model)
        converter = Pcm24kToUlaw()
        manager = self._client.audio.speech.with_streaming_response.create(
            model=self.model, voice=self.voice, input=text, response_format="pcm",
            instructions=self.instructions or openai.omit)
        async with contextlib.AsyncExitStack() as stack:
            async with request.first_byte():
                response = await stack.enter_async_context(manager)
                chunks = response.iter_bytes().__aiter__()
                first = await anext(chunks, b"")
            received = len(first)
            ulaw = converter.feed(first)
            if ulaw:
                yield AudioChunk(ulaw)
            try:
                async for data in chunks:
                    received += len(data)
                    ulaw = converter.feed(data)
                    if ulaw:
                        yield AudioChunk(ulaw)
            except self._first_audio.errors as exc:
                request.cut(exc)  # audio went out: end the clip; the request is billed
            tail = converter.flush()
            if tail:
                yield AudioChunk(tail)
        yield SynthesisDone(usage=self._usage(text, received), timing=request.timing())

    def _usage(self, text: str, pcm_bytes: int) -> Usage:
        """What the request is billed for, estimated (see the module doc)."""
        minutes = pcm_bytes / SOURCE_BYTES_PER_MINUTE
        return Usage(provider=PROVIDER, kind="tts", model=self.model, characters=len(text),
                     input_tokens=estimate_tokens(text),
                     output_tokens=math.ceil(minutes * self.audio_tokens_per_minute),
                     estimated=True)

    def estimate_usage(self, text: str) -> Usage:
        """Tokens, as billed: the text's, and the audio's at a speaking rate of
        ~15 characters a second (the audio never arrived to be measured)."""
        seconds = len(text) / SPOKEN_CHARACTERS_PER_SECOND
        return self._usage(text, round(seconds * SOURCE_BYTES_PER_MINUTE / 60))

    async def warm_up(self) -> None:
        """Nothing to load; the first request opens the connection."""

    async def aclose(self) -> None:
        await self._client.close()


def build(settings: OpenAISettings, config: Config) -> OpenAITTS:
    return OpenAITTS(api_key(settings), settings.tts_base_url or settings.base_url,
                     model=settings.tts_model, voice=settings.tts_voice,
                     timeout_s=settings.timeout_s,
                     first_audio_timeout_s=config.providers.request_deadline_s("tts"),
                     max_retries=settings.max_retries,
                     instructions=settings.tts_instructions or None,
                     audio_tokens_per_minute=settings.tts_audio_tokens_per_minute)


# gpt-4o-mini-tts per token (text in, audio out); tts-1 and tts-1-hd per character.
SPEC = register(ProviderSpec(name=PROVIDER, kind="tts", settings=OpenAISettings, build=build,
                             env=ENV, billing=(Billing(BillingUnit.AUDIO_TOKENS),
                                               Billing(BillingUnit.CHARACTERS))))
