"""Speech-to-text through OpenAI's transcription endpoint (or a compatible server).

The request shape depends on the model: `whisper-1` gives per-segment confidence with
`verbose_json`; `gpt-4o(-mini)-transcribe` accept only `json` and give token logprobs with
`include=["logprobs"]`; `gpt-transcribe` takes `json` without logprobs.
"""

from __future__ import annotations

from typing import Any

from engine.audio.wav import pcm16_to_wav_bytes
from engine.config import Config
from engine.log import get_logger
from engine.providers.base import (
    ProviderError,
    Transcript,
    TranscriptConfidence,
    Usage,
)
from engine.providers.builtin.openai_common import (
    ENV,
    LOGPROB_MODELS,
    PROVIDER,
    OpenAISettings,
    api_key,
    first_byte_deadline,
    openai,
)
from engine.providers.registry import Billing, BillingUnit, ProviderSpec, register

log = get_logger(__name__)



class OpenAITranscriber:
    """SpeechToText over `POST /audio/transcriptions`."""

    name = PROVIDER  # the registry name: Usage, estimates and prices all say "openai"
    runs_locally = False  # a cut request is read on for its usage (engine.providers.drains)

    def __init__(self, api_key: str, base_url: str, model: str = "gpt-transcribe",
                 timeout_s: float = 4.0, max_retries: int = 0,
                 language: str | None = None) -> None:
        self.model = model
        self.language = language
        # The transcript is the first byte: the whole request is bounded, not just a read.
        self._transcript = first_byte_deadline("stt", timeout_s)
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url,
                                          timeout=timeout_s, max_retries=max_retries)

    def _request_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.model.startswith("whisper"):
            options["response_format"] = "verbose_json"
        else:
            options["response_format"] = "json"
            if self.model.startswith(LOGPROB_MODELS):
                options["include"] = ["logprobs"]
        if self.language:
            options["language"] = self.language
        return options

    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        if not pcm16 or len(pcm16) % 2 or sample_rate <= 0:
            log.warning("stt_bad_input", provider=PROVIDER, bytes=len(pcm16),
                        sample_rate=sample_rate)
            raise ProviderError(PROVIDER, f"bad audio: {len(pcm16)} bytes of PCM16 at "
                                f"{sample_rate} Hz", retryable=False)
        audio_seconds = len(pcm16) / 2 / sample_rate
        wav_bytes = pcm16_to_wav_bytes(pcm16, sample_rate)
        request = self._transcript.request(self.model)
        async with request.first_byte():
            result: Any = await self._client.audio.transcriptions.create(
                model=self.model, file=("utterance.wav", wav_bytes, "audio/wav"),
                **self._request_options())
        timing = request.timing()  # the whole transcript arrives at once
        text = str(getattr(result, "text", "") or "").strip()
        usage = Usage(provider=PROVIDER, kind="stt", model=self.model,
                      audio_seconds=audio_seconds)
        reported = getattr(result, "usage", None)
        if reported is not None and getattr(reported, "type", None) == "duration":
            usage.audio_seconds = float(reported.seconds)
        elif reported is not None and getattr(reported, "type", None) == "tokens":
            usage.input_tokens = int(reported.input_tokens)
            usage.output_tokens = int(reported.output_tokens)
        if self.model.startswith("whisper"):
            confidence = TranscriptConfidence.from_whisper_segments(
                list(getattr(result, "segments", None) or []))
        else:
            logprobs = [lp.logprob for lp in (getattr(result, "logprobs", None) or [])
                        if lp.logprob is not None]
            confidence = TranscriptConfidence(
                token_logprob_mean=sum(logprobs) / len(logprobs) if logprobs else None)
        return Transcript(text=text, confidence=confidence, usage=usage, timing=timing)

    async def warm_up(self) -> None:
        """Nothing to load; the first request opens the connection."""

    async def aclose(self) -> None:
        await self._client.close()


def build(settings: OpenAISettings, config: Config) -> OpenAITranscriber:
    return OpenAITranscriber(api_key(settings), settings.stt_base_url or settings.base_url,
                             model=settings.stt_model,
                             timeout_s=config.providers.request_deadline_s("stt"),
                             max_retries=settings.max_retries,
                             language=settings.stt_language or None)


# The gpt-4o transcribers are billed per token (and report them), gpt-transcribe and
# whisper-1 per minute of audio: each model's catalog entry names its unit.
SPEC = register(ProviderSpec(name=PROVIDER, kind="stt", settings=OpenAISettings, build=build,
                             env=ENV, billing=(Billing(BillingUnit.AUDIO_TOKENS),
                                               Billing(BillingUnit.AUDIO_MINUTE))))
