"""What the three OpenAI providers share: the `[providers.openai]` table, its environment
variables, the API key check, the SDK's error mapping, their first-byte deadline and the
token estimate.

Speech-to-text (stt_openai.py), the agent (llm_openai.py) and text-to-speech
(tts_openai.py) each register under the name "openai" with this one settings model, so
config.toml has one OpenAI table whatever the chains use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr

from engine.providers.base import ProviderError, ProviderKind
from engine.providers.first_byte import FirstByteDeadline
from engine.providers.registry import ProviderSettings, lazy_import, require_secret

if TYPE_CHECKING:
    import httpx2
    import openai
else:  # the SDK loads when a provider first uses it, not when discovery imports the three
    # openai 3.x's HTTP client: raw byte streams raise its errors unmapped
    httpx2 = lazy_import("httpx2")
    openai = lazy_import("openai")

PROVIDER = "openai"  # the registry name, the table, and Usage.provider
ENV = {"OPENAI_API_KEY": "api_key", "OPENAI_BASE_URL": "base_url"}
# The SDK's reasoning efforts (types/shared/reasoning_effort.py); "" = not sent.
ReasoningEffort = Literal["", "none", "minimal", "low", "medium", "high", "xhigh", "max"]


class OpenAISettings(ProviderSettings):
    api_key: SecretStr = SecretStr("")  # env OPENAI_API_KEY
    base_url: str = "https://api.openai.com/v1"  # any OpenAI-compatible server
    timeout_s: float = 8.0
    max_retries: int = 0  # a phone turn cannot wait for retries; fallbacks handle failure
    llm_model: str = "gpt-5.4-mini"
    # The lowest effort for voice (first-token latency); "" sends no `reasoning_effort`
    # (a model that does not reason, or a compatible server that rejects it).
    llm_reasoning_effort: ReasoningEffort = "none"
    llm_temperature: float = 0.3
    llm_max_tokens: int = 200
    stt_model: str = "gpt-transcribe"
    stt_base_url: str = ""  # e.g. a self-hosted faster-whisper server; empty = base_url
    stt_language: str = ""  # ISO-639-1 hint; empty = let the model detect
    tts_model: str = "gpt-4o-mini-tts"
    tts_voice: str = "alloy"
    tts_base_url: str = ""
    tts_instructions: str = ""
    # Audio tokens per minute of speech, to estimate the voice's token bill (it reports none).
    tts_audio_tokens_per_minute: float = Field(default=1250.0, gt=0, allow_inf_nan=False)


# Transcription models that return token logprobs when asked (`include=["logprobs"]`):
# the transcript's confidence then comes from them (both transcribers, batch and realtime).
LOGPROB_MODELS = ("gpt-4o-transcribe", "gpt-4o-mini-transcribe")


def estimate_tokens(text: str) -> int:
    """About four characters per token: used only when the server reports no usage."""
    return math.ceil(len(text) / 4) if text else 0


def api_key(settings: OpenAISettings) -> str:
    """The key, or ProviderUnavailable when OPENAI_API_KEY is not set."""
    return require_secret(settings.api_key, "OPENAI_API_KEY")


def first_byte_deadline(kind: ProviderKind, timeout_s: float) -> FirstByteDeadline:
    """The deadline of an OpenAI request's first byte, with the SDK's errors: its own and
    its HTTP client's (raw byte streams raise those unmapped)."""
    return FirstByteDeadline(PROVIDER, kind, timeout_s, (openai.OpenAIError, httpx2.HTTPError),
                             map_openai_error)


def map_openai_error(exc: BaseException, provider: str = PROVIDER) -> ProviderError:
    """An SDK exception as a ProviderError with its status and whether a retry may help."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        # 408/409/429 and 5xx are transient; other 4xx (bad key, bad request) are not.
        retryable = status in (408, 409, 429) or status >= 500
        message = _error_message(exc)
        return ProviderError(provider, f"HTTP {status}: {message}", status=status,
                             retryable=retryable)
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(provider, "request timed out", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return ProviderError(provider, f"connection failed: {cause!r}", retryable=True)
    if isinstance(exc, httpx2.TimeoutException):
        return ProviderError(provider, "request timed out", retryable=True)
    if isinstance(exc, httpx2.HTTPError):
        return ProviderError(provider, f"connection failed: {exc!r}", retryable=True)
    return ProviderError(provider, f"{type(exc).__name__}: {exc}", retryable=True)


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(exc.message)
