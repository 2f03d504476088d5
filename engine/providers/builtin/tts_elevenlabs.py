"""Text-to-speech through ElevenLabs' streaming endpoint, straight in Twilio's format.

`output_format="ulaw_8000"` is exactly what Twilio plays, so bytes pass through as they
arrive. The raw-response form of the SDK call is used so the response headers (the
billed character count) are readable; it sends the same request as
`client.text_to_speech.stream(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

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
from engine.providers.registry import (
    Billing,
    BillingUnit,
    ProviderSettings,
    ProviderSpec,
    lazy_import,
    register,
    require_secret,
)

if TYPE_CHECKING:
    import httpx
    from elevenlabs import client as elevenlabs_client
    from elevenlabs.core import api_error
else:  # the SDK loads when the provider is built, not when discovery imports this module
    httpx = lazy_import("httpx")
    elevenlabs_client = lazy_import("elevenlabs.client")
    api_error = lazy_import("elevenlabs.core.api_error")

log = get_logger(__name__)

PROVIDER = "elevenlabs"
OUTPUT_FORMAT = "ulaw_8000"
# The billed character count, when the server reports it. [U: header name not verified]
CHARACTER_COUNT_HEADER = "x-character-count"
# The SDK re-chunks the body (1024 bytes by default = 128 ms); one Twilio frame (20 ms)
# keeps the first audio prompt and loses at most a frame when a stream is cut.
STREAM_CHUNK_BYTES = 160


class ElevenLabsSettings(ProviderSettings):
    api_key: SecretStr = SecretStr("")  # env ELEVENLABS_API_KEY
    base_url: str = "https://api.elevenlabs.io"
    voice_id: str = "21m00Tcm4TlvDq8ikWAM"
    model_id: str = "eleven_flash_v2_5"
    optimize_streaming_latency: int = 3
    timeout_s: float = 5.0


def map_elevenlabs_error(exc: BaseException) -> ProviderError:
    """An SDK/httpx exception as a ProviderError with status and retryability."""
    if isinstance(exc, api_error.ApiError):
        status = exc.status_code
        retryable = status is None or status in (408, 409, 429) or status >= 500
        return ProviderError(PROVIDER, f"HTTP {status}: {_detail_message(exc.body)}",
                             status=status, retryable=retryable)
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError(PROVIDER, "request timed out", retryable=True)
    if isinstance(exc, httpx.HTTPError):
        return ProviderError(PROVIDER, f"connection failed: {exc!r}", retryable=True)
    return ProviderError(PROVIDER, f"{type(exc).__name__}: {exc}", retryable=True)


def _detail_message(body: Any) -> str:
    # {"detail": {"status": ..., "message": ...}} or FastAPI's {"detail": [{"msg": ...}]}
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, dict) and detail.get("message"):
        return f"{detail.get('status', '')}: {detail['message']}".lstrip(": ")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}"
                         for d in detail if isinstance(d, dict))
    return str(body)[:300]


class ElevenLabsTTS:
    """TextToSpeech over `POST /v1/text-to-speech/{voice_id}/stream`."""

    name = "elevenlabs"
    runs_locally = False  # a cut request is read on for its usage (engine.providers.drains)

    def __init__(self, api_key: str, voice_id: str, base_url: str = "https://api.elevenlabs.io",
                 model_id: str = "eleven_flash_v2_5", optimize_streaming_latency: int = 3,
                 timeout_s: float = 5.0, first_audio_timeout_s: float = 2.0) -> None:
        self.voice = voice_id
        self.model = model_id
        self.optimize_streaming_latency = optimize_streaming_latency
        self.first_audio_timeout_s = first_audio_timeout_s
        # Our own httpx client, so aclose() can release its connections (the SDK has no close).
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._client = elevenlabs_client.AsyncElevenLabs(
            api_key=api_key, base_url=base_url, timeout=timeout_s, httpx_client=self._http)

    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        if not text.strip():
            log.warning("tts_empty_text", provider=PROVIDER)
            raise ProviderError(PROVIDER, "nothing to synthesize: empty text", retryable=False)
        started = time.monotonic()
        # Not awaited: the SDK call is an async context manager around a streamed response.
        manager = self._client.text_to_speech.with_raw_response.stream(
            self.voice, text=text, model_id=self.model, output_format=OUTPUT_FORMAT,
            optimize_streaming_latency=self.optimize_streaming_latency,
            request_options={"chunk_size": STREAM_CHUNK_BYTES})
        characters = len(text)
        async with contextlib.AsyncExitStack() as stack:
            # The first-audio bound covers connecting, the response headers and first bytes.
            try:
                async with asyncio.timeout(self.first_audio_timeout_s):
                    response = await stack.enter_async_context(manager)
                    header = response.headers.get(CHARACTER_COUNT_HEADER, "")
                    if header.isdigit():
                        characters = int(header)
                    chunks = response.data.__aiter__()
                    first = await anext(chunks, b"")
            except TimeoutError as exc:
                log.warning("tts_first_audio_timeout", provider=PROVIDER, model=self.model,
                            timeout_s=self.first_audio_timeout_s)
                raise ProviderError(PROVIDER, f"no audio within "
                                    f"{self.first_audio_timeout_s:.2f}s",
                                    retryable=True) from exc
            except (api_error.ApiError, httpx.HTTPError) as exc:
                err = map_elevenlabs_error(exc)
                log.warning("tts_request_failed", provider=PROVIDER, model=self.model,
                            status=err.status, retryable=err.retryable, error=str(err))
                raise err from exc
            first_audio_s = time.monotonic() - started
            if first:
                yield AudioChunk(first)
            try:
                async for data in chunks:
                    if data:
                        yield AudioChunk(data)
            except httpx.HTTPError as exc:
                # Audio already went out: end the clip here; the characters are billed anyway.
                log.warning("tts_stream_cut", provider=PROVIDER, model=self.model,
                            error=str(map_elevenlabs_error(exc)))
        usage = Usage(provider=PROVIDER, kind="tts", model=self.model, characters=characters)
        yield SynthesisDone(usage=usage, timing=Timing(first_byte_s=first_audio_s,
                                                       total_s=time.monotonic() - started))

    def estimate_usage(self, text: str) -> Usage:
        """Billed by characters (a cut sentence's, when nothing reported them)."""
        return Usage(provider=self.name, kind="tts", model=self.model, characters=len(text),
                     estimated=True)

    async def warm_up(self) -> None:
        """Nothing to load; the first request opens the connection."""

    async def aclose(self) -> None:
        await self._http.aclose()


def build(settings: ElevenLabsSettings, config: Config) -> ElevenLabsTTS:
    return ElevenLabsTTS(require_secret(settings.api_key, "ELEVENLABS_API_KEY"),
                         settings.voice_id, base_url=settings.base_url,
                         model_id=settings.model_id,
                         optimize_streaming_latency=settings.optimize_streaming_latency,
                         timeout_s=settings.timeout_s,
                         # The chain's first-audio timeout, then reading on for the usage.
                         first_audio_timeout_s=(config.providers.tts_first_audio_timeout_s
                                                + config.providers.drain_timeout_s))


SPEC = register(ProviderSpec(name=PROVIDER, kind="tts", settings=ElevenLabsSettings,
                             build=build, env={"ELEVENLABS_API_KEY": "api_key"},
                             billing=(Billing(BillingUnit.CHARACTERS),)))
