"""What every stand-in server shares: the behaviour knobs, the request log, the lifecycle.

Tests and benchmarks point the official SDKs at the stand-ins (via `base_url`) to
exercise the real client code with a fixed, configurable latency and failure behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
from aiohttp import web

Mode = Literal["ok", "401", "422", "429", "500", "timeout", "cut"]

# A stand-in in "timeout" mode sleeps this long: longer than any client timeout we use.
TIMEOUT_SLEEP_S = 60.0


@dataclass(slots=True)
class RecordedRequest:
    """What a stand-in received, for tests to assert on."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any = None
    form: dict[str, Any] = field(default_factory=dict)
    # Set when the client went away before the response was complete.
    disconnected: bool = False


async def serve_local(app: web.Application, host: str = "127.0.0.1", port: int = 0,
                      **runner_options: Any) -> tuple[web.AppRunner, int]:
    """Serve `app` on `host` (port 0: a free one); its runner and the port it got. Every
    local server of the simulator (stand-ins, the demo's order service) starts here."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])


class StandinServer:
    """An aiohttp app on 127.0.0.1 with behaviour knobs shared by every stand-in.

    Knobs (plain attributes, change them between requests):
    - `mode`: "ok", an error status ("401", "422", "429", "500"), "timeout" (no answer
      for TIMEOUT_SLEEP_S) or "cut" (the stream stops midway and the connection drops).
    - `latency_s`: delay before the first byte of the response.
    - `token_interval_s`: delay between streamed chunks (tokens or audio).
    - `api_key`: when set, requests with another key get 401.
    """

    def __init__(self, *, api_key: str | None = None) -> None:
        self.mode: Mode = "ok"
        self.latency_s = 0.0
        self.token_interval_s = 0.0
        self.audio_chunk_bytes = 800  # streamed audio piece size (subclasses set their own)
        self.last_audio_sent = b""  # what the last audio stream really sent
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._disconnect = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------

    def build_app(self) -> web.Application:
        raise NotImplementedError

    def url_for(self, host: str, port: int) -> str:
        """The base URL the SDK is given (providers differ in whether it includes /v1)."""
        return f"http://{host}:{port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._stopping.clear()
        # handler_cancellation: a client that goes away cancels its handler, as a real
        # server stops generating; we record that as a disconnect.
        self._runner, bound_port = await serve_local(
            self.build_app(), host, port, handler_cancellation=True, shutdown_timeout=1.0)
        self.base_url = self.url_for(host, bound_port)
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # --- helpers for handlers -------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the server stops (so stop() never hangs)."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def wait_disconnect(self, within_s: float) -> bool:
        """True once some streamed response was abandoned by its client."""
        try:
            await asyncio.wait_for(self._disconnect.wait(), timeout=within_s)
        except TimeoutError:
            return False
        return True

    def mark_disconnected(self, record: RecordedRequest) -> None:
        record.disconnected = True
        self._disconnect.set()

    def key_ok(self, presented: str | None) -> bool:
        return self.api_key is None or presented == self.api_key

    @staticmethod
    async def record(request: web.Request, *, json_body: Any = None,
                     form: dict[str, Any] | None = None) -> RecordedRequest:
        return RecordedRequest(method=request.method, path=request.path,
                               query=dict(request.query), headers=dict(request.headers),
                               json=json_body, form=form or {})

    async def json_request(self, request: web.Request) -> tuple[Any, RecordedRequest]:
        """The request's JSON body (None when it is not JSON), recorded in `requests`."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        record = await self.record(request, json_body=body)
        self.requests.append(record)
        return body, record

    async def stream_audio(self, request: web.Request, record: RecordedRequest,
                           data: bytes, headers: dict[str, str]) -> web.StreamResponse:
        """Stream `data` in `audio_chunk_bytes` pieces `token_interval_s` apart, as the TTS
        APIs do; mode "cut" drops the connection halfway. `last_audio_sent` keeps what
        actually went out, and a client that hangs up early is recorded as disconnected."""
        response = web.StreamResponse(headers=headers)
        sent = bytearray()
        try:
            await response.prepare(request)
            step = max(1, self.audio_chunk_bytes)
            cut_at = len(data) // 2 if self.mode == "cut" else None
            for offset in range(0, len(data), step):
                if cut_at is not None and offset >= cut_at:
                    self.last_audio_sent = bytes(sent)
                    self.drop_connection(request)
                    return response
                if offset:
                    await self.sleep(self.token_interval_s)
                piece = data[offset:offset + step]
                await response.write(piece)
                sent += piece
            self.last_audio_sent = bytes(sent)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.last_audio_sent = bytes(sent)
            self.mark_disconnected(record)
            raise
        return response

    @staticmethod
    def drop_connection(request: web.Request) -> None:
        """Abort the TCP connection mid-response: the client sees a truncated body."""
        transport = request.transport
        if transport is not None:
            transport.abort()


def speech_like_pcm(seconds: float, sample_rate: int) -> npt.NDArray[np.int16]:
    """A voiced, syllable-modulated tone: enough like speech for VAD and level meters."""
    n = max(0, math.ceil(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    pitch = 140.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t)  # gently moving pitch
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = (np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)) / 1.75
    syllables = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t)  # ~4 syllables per second
    return (voiced * syllables * 9000.0).astype(np.int16)
