"""The input-streaming WebSocket's wire format: the options that make its URL and first
message, the server's messages as items, and its errors as ProviderErrors
(`engine.providers.builtin.elevenlabs_stream_input` has the protocol's sources)."""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from engine.providers.base import ProviderError

PROVIDER = "elevenlabs"
OUTPUT_FORMAT = "ulaw_8000"
# Codes after which a new attempt fails the same way (401/403: key or model refused; 1008:
# policy violation, the code ElevenLabs closes with for a bad key or an idle socket).
_FINAL_CODES = frozenset({400, 401, 403, 404, 422, 1008})
NORMAL_CLOSE = 1000
ABNORMAL_CLOSE = 1006


@dataclass(frozen=True, slots=True)
class StreamInputOptions:
    api_key: str = field(repr=False)
    voice_id: str
    model_id: str
    base_url: str = "https://api.elevenlabs.io"
    # Characters the server waits for before each generation (each in 50..500).
    chunk_length_schedule: tuple[int, ...] = (50, 120, 160, 250)
    auto_mode: bool = False
    flush_first_sentence: bool = True
    first_flush_words: int = 0  # the first flush also after this many words (0: never)
    # Timing data on every audio chunk (else only on some; cuts then wait for the audio).
    sync_alignment: bool = True
    # Once all text is sent, the longest wait for the next message (then the audio is cut).
    stall_timeout_s: float = 5.0
    close_timeout_s: float = 1.0

    def url(self) -> URL:
        """The handshake URL: the base URL's host, as ws:// or wss://."""
        base = URL(self.base_url)
        scheme = {"https": "wss", "http": "ws"}.get(base.scheme, base.scheme)
        path = f"{base.path.rstrip('/')}/v1/text-to-speech/{self.voice_id}/stream-input"
        return base.with_scheme(scheme).with_path(path).with_query(
            model_id=self.model_id, output_format=OUTPUT_FORMAT,
            sync_alignment=_flag(self.sync_alignment), auto_mode=_flag(self.auto_mode))

    def init_message(self) -> dict[str, Any]:
        return {"text": " ",
                "generation_config": {"chunk_length_schedule": list(self.chunk_length_schedule)}}


def _flag(value: bool) -> str:
    return "true" if value else "false"


class StreamInputError(Exception):
    """The server refused or failed the stream in-band (an error message or a close)."""

    def __init__(self, message: str, *, status: int | None = None,
                 retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def map_stream_input_error(exc: BaseException) -> ProviderError:
    """A socket failure as a ProviderError with status and retryability."""
    if isinstance(exc, StreamInputError):
        return ProviderError(PROVIDER, str(exc), status=exc.status, retryable=exc.retryable)
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        status = exc.status
        retryable = status in (408, 409, 429) or status >= 500
        return ProviderError(PROVIDER, f"handshake refused: HTTP {status} {exc.message}",
                             status=status, retryable=retryable)
    if isinstance(exc, aiohttp.ClientError | ConnectionError):
        return ProviderError(PROVIDER, f"connection failed: {exc!r}", retryable=True)
    return ProviderError(PROVIDER, f"{type(exc).__name__}: {exc}", retryable=True)


def server_error(message: Mapping[str, Any]) -> StreamInputError:
    """An in-band error message, `{"message": ..., "error": ..., "code": ...}`."""
    code = message.get("code")
    status = code if isinstance(code, int) and 100 <= code < 600 else None
    what = ": ".join(str(message[key]) for key in ("error", "message") if message.get(key))
    return StreamInputError(f"server error {code}: {what}"[:300], status=status,
                            retryable=code not in _FINAL_CODES)


def closed_error(code: int | None, reason: str) -> StreamInputError:
    """The socket closed before the end of the audio."""
    return StreamInputError(f"socket closed ({code}) {reason}".strip()[:300],
                            retryable=code not in _FINAL_CODES)


# --- what a stream's two tasks tell its reader (`StreamInputSynthesis`) -----------------


@dataclass(slots=True)
class FirstText:
    """The first text came (the first-audio clock starts)."""


@dataclass(slots=True)
class Triggered:
    """Enough text was sent for the server to generate (the first-audio deadline starts)."""


@dataclass(slots=True)
class TextDone:
    """All the text was sent and the end of input asked for."""


@dataclass(slots=True)
class Audio:
    ulaw: bytes
    alignment: Mapping[str, Any] | None


@dataclass(slots=True)
class Final:
    """`isFinal`: every audio chunk came."""


@dataclass(slots=True)
class Ended:
    """The socket closed (normally or not) or failed."""

    error: BaseException | None


@dataclass(slots=True)
class TextFailed:
    """The text being fed raised: re-raised to the reader unchanged."""

    error: BaseException


Item = FirstText | Triggered | TextDone | Audio | Final | Ended | TextFailed


def parse_message(raw: str) -> Item | None:
    """One server message as an item (None for one that carries nothing we use)."""
    try:  # orjson: the audio chunks' alignment arrays decode several times faster
        message = orjson.loads(raw)
    except ValueError:
        return Ended(StreamInputError("server sent a message that is not JSON"))
    if not isinstance(message, dict):
        return None
    audio = message.get("audio")
    if isinstance(audio, str) and audio:
        try:
            ulaw = binascii.a2b_base64(audio, strict_mode=True)
        except (binascii.Error, ValueError):
            return Ended(StreamInputError("server sent audio that is not base64"))
        alignment = message.get("alignment")
        return Audio(ulaw, alignment if isinstance(alignment, dict) else None)
    if message.get("isFinal") is True:
        return Final()
    if message.get("error") or message.get("message"):
        return Ended(server_error(message))
    return None
