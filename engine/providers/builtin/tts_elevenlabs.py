"""Text-to-speech through ElevenLabs, straight in Twilio's format.

Whole sentences (`synthesize`, and the audio cache) go over the HTTP streaming endpoint:
`output_format="ulaw_8000"` is exactly what Twilio plays, so bytes pass through as they
arrive. The raw-response form of the SDK call is used so the response headers (the
billed character count) are readable; it sends the same request as
`client.text_to_speech.stream(...)`. Text still being written (`synthesize_stream`) goes
over the input-streaming WebSocket (`engine.providers.builtin.elevenlabs_stream_input`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import aiohttp
from pydantic import Field, SecretStr

from engine.config import Config
from engine.log import get_logger
from engine.providers.base import (
    AudioChunk,
    ProviderError,
    StreamedSynthesisEvent,
    SynthesisDone,
    SynthesisEvent,
    Usage,
)
from engine.providers.builtin.elevenlabs_stream_input import StreamInput, StreamInputSynthesis
from engine.providers.builtin.elevenlabs_stream_wire import (
    StreamInputError,
    StreamInputOptions,
    map_stream_input_error,
)
from engine.providers.first_byte import FirstByteDeadline
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
    # Input streaming (the WebSocket): characters the server waits for before each
    # generation, the first small for latency (config.toml says why).
    chunk_length_schedule: list[Annotated[int, Field(ge=50, le=500)]] = Field(
        default_factory=lambda: [50, 120, 160, 250], min_length=1)
    auto_mode: bool = False
    flush_first_sentence: bool = True
    # ...or after this many words, when the first sentence is longer (0: never).
    first_flush_words: int = Field(default=4, ge=0)


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
                 timeout_s: float = 5.0, first_audio_timeout_s: float = 1.0,
                 stream_options: StreamInputOptions | None = None) -> None:
        self.voice = voice_id
        self.model = model_id
        self.optimize_streaming_latency = optimize_streaming_latency
        # Covers connecting, the response headers and the first bytes.
        self._first_audio = FirstByteDeadline(PROVIDER, "tts", first_audio_timeout_s,
                                              (api_error.ApiError, httpx.HTTPError),
                                              map_elevenlabs_error)
        # Input streaming: from the text that makes the server generate to the first audio.
        self._stream_first_audio = FirstByteDeadline(
            PROVIDER, "tts", first_audio_timeout_s,
            (StreamInputError, aiohttp.ClientError, ConnectionError), map_stream_input_error)
        self._stream_options = stream_options or StreamInputOptions(
            api_key=api_key, voice_id=voice_id, model_id=model_id, base_url=base_url,
            stall_timeout_s=timeout_s)
        self._ws_session: aiohttp.ClientSession | None = None
        # Our own httpx client, so aclose() can release its connections (the SDK has no close).
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._client = elevenlabs_client.AsyncElevenLabs(
            api_key=api_key, base_url=base_url, timeout=timeout_s, httpx_client=self._http)

    async def synthesize(self, text: str) -> AsyncGenerator[SynthesisEvent, None]:
        if not text.strip():
            log.warning("tts_empty_text", provider=PROVIDER)
            raise ProviderError(PROVIDER, "nothing to synthesize: empty text", retryable=False)
        request = self._first_audio.request(self.model)
        # Not awaited: the SDK call is an async context manager around a streamed response.
        manager = self._client.text_to_speech.with_raw_response.stream(
            self.voice, text=text, model_id=self.model, output_format=OUTPUT_FORMAT,
            optimize_streaming_latency=self.optimize_streaming_latency,
            request_options={"chunk_size": STREAM_CHUNK_BYTES})
        characters = len(text)
        async with contextlib.AsyncExitStack() as stack:
            async with request.first_byte():
                response = await stack.enter_async_context(manager)
                header = response.headers.get(CHARACTER_COUNT_HEADER, "")
                if header.isdigit():
                    characters = int(header)
                chunks = response.data.__aiter__()
                first = await anext(chunks, b"")
            if first:
                yield AudioChunk(first)
            try:
                async for data in chunks:
                    if data:
                        yield AudioChunk(data)
            except self._first_audio.errors as exc:
                request.cut(exc)  # audio went out: end the clip; the characters are billed
        usage = Usage(provider=PROVIDER, kind="tts", model=self.model, characters=characters)
        yield SynthesisDone(usage=usage, timing=request.timing())

    def synthesize_stream(self, text: AsyncIterator[str]
                          ) -> AsyncGenerator[StreamedSynthesisEvent, None]:
        """Audio for text still being written, over the input-streaming WebSocket (it
        connects now, before the first text and before anything reads); `TextSpoken` at
        each sentence's end. `text` is read in a task of the stream's own (a pending read is
        cancelled when the stream closes); closing the stream closes the socket."""
        if self._ws_session is None or self._ws_session.closed:
            # No connection limit: each call's reply holds its socket (aiohttp's default
            # limit of 100 would queue the 101st call's voice).
            self._ws_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return StreamInput(StreamInputSynthesis(self._stream_options, self._stream_first_audio,
                                                self._ws_session, text))

    def estimate_usage(self, text: str) -> Usage:
        """Billed by characters (a cut sentence's, when nothing reported them)."""
        return Usage(provider=self.name, kind="tts", model=self.model, characters=len(text),
                     estimated=True)

    async def warm_up(self) -> None:
        """Nothing to load; the first request opens the connection."""

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._ws_session is not None:
            await self._ws_session.close()


def build(settings: ElevenLabsSettings, config: Config) -> ElevenLabsTTS:
    api_key = require_secret(settings.api_key, "ELEVENLABS_API_KEY")
    stream_options = StreamInputOptions(
        api_key=api_key, voice_id=settings.voice_id, model_id=settings.model_id,
        base_url=settings.base_url,
        chunk_length_schedule=tuple(settings.chunk_length_schedule),
        auto_mode=settings.auto_mode, flush_first_sentence=settings.flush_first_sentence,
        first_flush_words=settings.first_flush_words, stall_timeout_s=settings.timeout_s)
    return ElevenLabsTTS(api_key, settings.voice_id, base_url=settings.base_url,
                         model_id=settings.model_id,
                         optimize_streaming_latency=settings.optimize_streaming_latency,
                         timeout_s=settings.timeout_s,
                         first_audio_timeout_s=config.providers.request_deadline_s("tts"),
                         stream_options=stream_options)


SPEC = register(ProviderSpec(name=PROVIDER, kind="tts", settings=ElevenLabsSettings,
                             build=build, env={"ELEVENLABS_API_KEY": "api_key"},
                             billing=(Billing(BillingUnit.CHARACTERS),)))
