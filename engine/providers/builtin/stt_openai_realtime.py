"""Streaming speech-to-text over OpenAI's realtime transcription WebSocket.

A transcription session (`client.realtime.connect(extra_query={"intent":
"transcription"})`, then `session.update` with a `transcription` session) hears the
caller while they speak: each `push` is queued and the stream's own task sends it as
`input_audio_buffer.append` (base64, batched to `append_ms`); `finish` commits the buffer
and waits for `conversation.item.input_audio_transcription.completed`, whose usage is
billed. Turn detection is off (null): the engine's endpointer decides when a turn ends.

- Model: `gpt-live-transcribe` (the docs' recommendation for realtime transcription,
  transcript deltas while audio arrives, $0.017/min) by default; `gpt-transcribe`
  ($0.0045/min) transcribes each committed turn after the commit, so it finishes later.
- Audio: `audio/pcmu` (G.711 mu-law, 8 kHz) by default: the caller's own format, no
  resampling, a sixth of the bytes of 24 kHz PCM; `pcm24` resamples to 24 kHz PCM16.
- Connections are reused: a session serves any number of committed turns, so finished
  streams hand theirs back to a pool of connected, configured sessions (warm-up opens
  `pool_size`; that many, or as many as were in use at once lately, wait idle), and a new
  utterance starts on a warm socket: no TLS and WebSocket handshake per utterance, for
  its latency and our CPU. When none is idle the stream connects its own in the
  background while the caller speaks.
  A connection that saw any error, a commit it did not wait out, or `session_max_age_s`
  of life is closed instead of reused; an abandoned stream clears the buffer
  (`input_audio_buffer.clear`) before handing its connection back. Reuse assumes a
  committed turn is transcribed on its own, not with the session's earlier turns (maybe
  another call's) as context [unverified]; `pool_size = 0` gives each utterance its own.
- Deadlines: the wait from `finish` to the transcript is the first byte
  (engine.providers.first_byte), bounded by `finish_timeout_s` (the chain's STT deadline
  by default: the session falls back to batch transcription when it passes); `transcribe`
  (the batch protocol: one stream pushed whole) has the chain's request deadline.
- Failures (refused upgrade, `error` or `.failed` events, a dropped socket, a deadline)
  become ProviderError; `finish` raises the first one, as soon as it is known.

The API key and base URL are the `[providers.openai]` ones (OPENAI_API_KEY,
OPENAI_BASE_URL); Usage says provider "openai_realtime".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydantic import Field

import engine.providers.builtin.openai_realtime_sessions as wire
from engine.audio.codec import int16_to_ulaw
from engine.audio.resample import StreamResampler
from engine.config import Config
from engine.log import get_logger
from engine.providers.base import ProviderError, Transcript, TranscriptConfidence, Usage
from engine.providers.builtin.openai_common import LOGPROB_MODELS, OpenAISettings, api_key, openai
from engine.providers.builtin.openai_common import PROVIDER as OPENAI_TABLE
from engine.providers.builtin.openai_realtime_sessions import (
    CLOSE_S,
    PROVIDER,
    RealtimeConnection,
    SessionPool,
    event_error,
    map_error,
    ws_errors,
)
from engine.providers.first_byte import FirstByteDeadline, TimedRequest
from engine.providers.registry import Billing, BillingUnit, ProviderSettings, ProviderSpec, register

if TYPE_CHECKING:
    from openai.types.realtime import (
        AudioTranscriptionParam,
        RealtimeTranscriptionSessionCreateRequestParam,
        SessionUpdateEventParam,
    )

log = get_logger(__name__)

AudioFormat = Literal["pcmu", "pcm24"]


class RealtimeSTTSettings(ProviderSettings):
    model: str = "gpt-live-transcribe"
    base_url: str = ""  # empty = [providers.openai].base_url
    audio_format: AudioFormat = "pcmu"
    language: str = ""  # ISO-639-1 hint; empty = let the model detect
    pool_size: int = Field(default=2, ge=0, le=64)
    session_max_age_s: float = Field(default=1500.0, gt=0, allow_inf_nan=False)
    connect_timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    finish_timeout_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # 0 = stt_timeout_s
    append_ms: int = Field(default=100, ge=20, le=1000)


class _Encoder:
    """PCM16 at the caller's rate -> the session's input format, chunk by chunk."""

    def __init__(self, audio_format: AudioFormat, sample_rate: int) -> None:
        target = 8000 if audio_format == "pcmu" else 24000
        self._resampler = StreamResampler(sample_rate, target) if sample_rate != target else None
        self._ulaw = audio_format == "pcmu"

    def encode(self, pcm16: bytes, last: bool) -> bytes:
        samples = np.frombuffer(pcm16, dtype=np.int16)
        if self._resampler is not None:
            samples = self._resampler.process(samples)
            if last:
                samples = np.concatenate((samples, self._resampler.flush()))
        return int16_to_ulaw(samples) if self._ulaw else samples.tobytes()


class RealtimeStream:
    """One utterance over a leased session (a SpeechStream): `push` queues, the stream's
    task sends; `finish` commits and waits for the transcript."""

    def __init__(self, stt: OpenAIRealtimeTranscriber, sample_rate: int) -> None:
        self._stt = stt
        self.sample_rate = sample_rate
        self._pending = bytearray()
        self._pushed = 0  # PCM16 bytes pushed in all
        self._batch = max(2, int(sample_rate * 2 * stt.append_ms / 1000))
        self._wake = asyncio.Event()
        self._finishing = self._abandoned = self._committed = self._closed = False
        self._item_id: str | None = None
        self._logprobs: list[float] = []
        self._done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        self._connection: RealtimeConnection | None = None
        self._encoder = _Encoder(stt.audio_format, sample_rate) if sample_rate > 0 else None
        self._task = stt._track(self._run())

    def push(self, pcm16: bytes) -> None:
        if self._finishing or self._abandoned or self._done.done():
            return
        self._pending += pcm16
        self._pushed += len(pcm16)
        if len(self._pending) >= self._batch:
            self._wake.set()

    async def finish(self) -> Transcript:
        return await self._finish(self._stt._finish_deadline)

    async def _finish(self, deadline: FirstByteDeadline) -> Transcript:
        if self._finishing or self._closed:
            raise ProviderError(PROVIDER, "stream already finished or closed", retryable=False)
        if self._pushed < 2 or self._encoder is None:
            await self.aclose()
            raise ProviderError(PROVIDER, f"bad audio: {self._pushed} bytes of PCM16 at "
                                f"{self.sample_rate} Hz", retryable=False)
        self._finishing = True
        self._wake.set()
        request = deadline.request(self._stt.model)
        try:
            async with request.first_byte():
                completed = await self._done
        except BaseException:
            self._closed = True
            self._task.cancel()
            self._drop_connection()
            raise
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            self._stt._pool.release(connection)
        return self._transcript(completed, request)

    async def aclose(self) -> None:
        """Abandon the utterance: before the commit the buffer is cleared and the session
        goes back to the pool; after it (or on failure) the connection is closed."""
        if self._closed:
            return
        self._closed = self._abandoned = True
        if self._connection is None or self._finishing or self._done.done():
            self._task.cancel()
            self.fail(ProviderError(PROVIDER, "stream closed", retryable=False))
            self._drop_connection()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            return
        self._wake.set()  # the task clears the buffer and returns the session
        try:
            async with asyncio.timeout(CLOSE_S):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
        self._drop_connection()  # unless the task handed it back

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._stt._pool.discard(connection)

    async def _run(self) -> None:
        try:
            if self._encoder is None:
                raise ProviderError(PROVIDER, f"bad sample rate {self.sample_rate}",
                                    retryable=False)
            connection = self._connection = await self._stt._pool.acquire()
            connection.stream = self
            if connection.broken:
                raise connection.error or ProviderError(PROVIDER, "connection lost")
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._abandoned:
                    await connection.send(wire.CLEAR)
                    self._connection = None
                    self._stt._pool.release(connection)
                    return
                await self._send_audio(connection, last=self._finishing)
                if self._finishing:
                    self._committed = True
                    await connection.send(wire.COMMIT)
                    return
        except ProviderError as exc:
            self.fail(exc)
        except (ws_errors.WebSocketException, OSError) as exc:
            self.fail(map_error(exc))
        except asyncio.CancelledError:  # closed (the stream, or the provider)
            if not self._done.done():
                self._done.set_exception(ProviderError(PROVIDER, "stream closed",
                                                       retryable=False))
            raise

    async def _send_audio(self, connection: RealtimeConnection, last: bool) -> None:
        size = len(self._pending) - len(self._pending) % 2
        if not size and not last:
            return
        pcm, self._pending = bytes(self._pending[:size]), self._pending[size:]
        audio = self._encoder.encode(pcm, last) if self._encoder is not None else b""
        for start in range(0, len(audio), wire.MAX_APPEND_BYTES):
            chunk = base64.b64encode(audio[start:start + wire.MAX_APPEND_BYTES]).decode("ascii")
            await connection.send(f'{wire.APPEND_HEAD}{chunk}"}}')

    def on_event(self, kind: object, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        if kind == "input_audio_buffer.committed" and self._committed:
            self._item_id = str(item_id)
        elif kind == "conversation.item.input_audio_transcription.delta":
            if self._item_id is None or item_id == self._item_id:
                self._logprobs += _logprobs(event)
        elif kind == wire.COMPLETED and self._committed and self._item_id in (None, item_id):
            if not self._done.done():
                self._done.set_result(event)
        elif kind == "conversation.item.input_audio_transcription.failed":
            self.fail(event_error(event))

    def fail(self, error: ProviderError) -> None:
        if self._done.done():
            return
        self._done.set_exception(error)
        if not self._abandoned:
            log.warning("stt_realtime.stream_failed", provider=PROVIDER, model=self._stt.model,
                        status=error.status, retryable=error.retryable, error=str(error))

    def _transcript(self, completed: dict[str, Any], request: TimedRequest) -> Transcript:
        audio_seconds = self._pushed / 2 / self.sample_rate
        usage = Usage(provider=PROVIDER, kind="stt", model=self._stt.model,
                      audio_seconds=audio_seconds)
        reported = completed.get("usage")
        if not isinstance(reported, dict):
            usage.estimated = True
        elif reported.get("type") == "duration":
            usage.audio_seconds = float(reported.get("seconds", audio_seconds))
        elif reported.get("type") == "tokens":
            usage.input_tokens = int(reported.get("input_tokens", 0))
            usage.output_tokens = int(reported.get("output_tokens", 0))
        logprobs = _logprobs(completed) or self._logprobs
        confidence = TranscriptConfidence(
            token_logprob_mean=sum(logprobs) / len(logprobs) if logprobs else None)
        return Transcript(text=str(completed.get("transcript") or "").strip(),
                          confidence=confidence, usage=usage, timing=request.timing())


def _logprobs(event: dict[str, Any]) -> list[float]:
    entries = event.get("logprobs")
    if not isinstance(entries, list):
        return []
    return [float(e["logprob"]) for e in entries
            if isinstance(e, dict) and isinstance(e.get("logprob"), int | float)]


class OpenAIRealtimeTranscriber:
    """StreamingSpeechToText over the realtime transcription WebSocket."""

    name = PROVIDER
    runs_locally = False

    def __init__(self, api_key: str, base_url: str, model: str = "gpt-live-transcribe", *,
                 audio_format: AudioFormat = "pcmu", language: str | None = None,
                 pool_size: int = 2, session_max_age_s: float = 1500.0,
                 connect_timeout_s: float = 5.0, finish_timeout_s: float = 3.0,
                 request_timeout_s: float = 18.0, append_ms: int = 100) -> None:
        self.model = model
        self.audio_format: AudioFormat = audio_format
        self.language = language
        self.connect_timeout_s = connect_timeout_s
        self.append_ms = append_ms
        errors = (ws_errors.WebSocketException, OSError)
        self._finish_deadline = FirstByteDeadline(PROVIDER, "stt", finish_timeout_s, errors,
                                                  map_error)
        self._request_deadline = FirstByteDeadline(PROVIDER, "stt", request_timeout_s, errors,
                                                   map_error)
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0)
        self._session_update = self._update_event()
        self._pool = SessionPool(self._connect, pool_size, session_max_age_s, connect_timeout_s)
        self._open: set[RealtimeConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _update_event(self) -> str:
        transcription: AudioTranscriptionParam = {"model": self.model}
        if self.language:
            transcription["language"] = self.language
        session: RealtimeTranscriptionSessionCreateRequestParam = {
            "type": "transcription",
            "audio": {"input": {
                "format": ({"type": "audio/pcmu"} if self.audio_format == "pcmu"
                           else {"type": "audio/pcm", "rate": 24000}),
                "transcription": transcription, "turn_detection": None}}}
        if self.model.startswith(LOGPROB_MODELS):
            session["include"] = ["item.input_audio_transcription.logprobs"]
        event: SessionUpdateEventParam = {"type": "session.update", "session": session}
        return json.dumps(event)

    async def _connect(self) -> RealtimeConnection:
        """A new configured session (its `session.update` sent, not yet answered)."""
        options = cast(Any, {"open_timeout": self.connect_timeout_s, "close_timeout": CLOSE_S})
        manager = self._client.realtime.connect(extra_query={"intent": "transcription"},
                                                websocket_connection_options=options)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                conn = await manager.enter()
        except (ws_errors.WebSocketException, OSError, TimeoutError, openai.OpenAIError) as exc:
            raise map_error(exc) from exc  # logged by whoever wanted the session
        connection = RealtimeConnection(conn)
        self._open.add(connection)
        connection.reader.add_done_callback(lambda _: self._open.discard(connection))
        try:
            await connection.send(self._session_update)
        except BaseException as exc:
            await connection.aclose()
            if isinstance(exc, ws_errors.WebSocketException | OSError):
                raise map_error(exc) from exc
            raise
        return connection

    def _track(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def open_stream(self, sample_rate: int) -> RealtimeStream:
        return RealtimeStream(self, sample_rate)

    async def transcribe(self, pcm16: bytes, sample_rate: int) -> Transcript:
        """One utterance at once: a stream pushed whole and finished."""
        stream = RealtimeStream(self, sample_rate)
        try:
            stream.push(pcm16)
            return await stream._finish(self._request_deadline)
        finally:
            await stream.aclose()

    @property
    def idle_sessions(self) -> int:
        """Connected sessions waiting in the pool."""
        return self._pool.idle

    async def warm_up(self) -> None:
        """Connect the pool's sessions (failures are logged: the first utterance retries)."""
        await self._pool.fill()

    async def aclose(self) -> None:
        await self._pool.aclose()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.aclose() for c in list(self._open)), return_exceptions=True)
        await self._client.close()


def build(settings: RealtimeSTTSettings, config: Config) -> OpenAIRealtimeTranscriber:
    shared = config.providers.settings(OPENAI_TABLE, OpenAISettings)
    return OpenAIRealtimeTranscriber(
        api_key(shared), settings.base_url or shared.base_url, model=settings.model,
        audio_format=settings.audio_format, language=settings.language or None,
        pool_size=settings.pool_size, session_max_age_s=settings.session_max_age_s,
        connect_timeout_s=settings.connect_timeout_s,
        finish_timeout_s=settings.finish_timeout_s or config.providers.stt_timeout_s,
        request_timeout_s=config.providers.request_deadline_s("stt"),
        append_ms=settings.append_ms)


# gpt-live-transcribe, gpt-realtime-whisper and gpt-transcribe report audio seconds; the
# gpt-4o transcribers tokens. Each model's catalog entry names its unit.
SPEC = register(ProviderSpec(name=PROVIDER, kind="stt", settings=RealtimeSTTSettings,
                             build=build, billing=(Billing(BillingUnit.AUDIO_MINUTE),
                                                   Billing(BillingUnit.AUDIO_TOKENS))))
