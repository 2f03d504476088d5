"""The sessions behind the realtime speech-to-text (stt_openai_realtime.py): one
WebSocket per transcription session, a reader task per session handing its events to the
stream that holds it, and the pool that keeps configured sessions connected between
utterances. Also the mapping of WebSocket failures and `error` events to ProviderError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from engine.log import get_logger
from engine.providers.base import ProviderError
from engine.providers.registry import lazy_import

if TYPE_CHECKING:
    import websockets.exceptions as ws_errors
    from openai.resources.realtime.realtime import AsyncRealtimeConnection
else:  # loaded when the provider is built, not when discovery imports this module
    ws_errors = lazy_import("websockets.exceptions")

log = get_logger(__name__)

PROVIDER = "openai_realtime"  # the registry name and Usage.provider
CLOSE_S = 1.0  # a close or a clear-and-return never holds anyone longer
# The client events sent as prebuilt JSON (the audio appended per 100 ms is the hot one).
COMMIT = '{"type":"input_audio_buffer.commit"}'
CLEAR = '{"type":"input_audio_buffer.clear"}'
APPEND_HEAD = '{"type":"input_audio_buffer.append","audio":"'
MAX_APPEND_BYTES = 256 * 1024  # encoded audio per append (the API takes up to 15 MiB)
COMPLETED = "conversation.item.input_audio_transcription.completed"


class Listener(Protocol):
    """The stream holding a session: it gets the session's events and its failure."""

    def on_event(self, kind: object, event: dict[str, Any]) -> None: ...

    def fail(self, error: ProviderError) -> None: ...


def map_error(exc: BaseException) -> ProviderError:
    """A WebSocket or socket failure as a ProviderError (a refused upgrade keeps its status)."""
    if isinstance(exc, ws_errors.InvalidStatus):
        status = exc.response.status_code
        message = exc.response.body.decode(errors="replace") if exc.response.body else ""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            message = str(json.loads(message)["error"]["message"])
        return ProviderError(PROVIDER, f"HTTP {status}: {message}", status=status,
                             retryable=status in (408, 409, 429) or status >= 500)
    if isinstance(exc, TimeoutError):
        return ProviderError(PROVIDER, "connect timed out", retryable=True)
    if isinstance(exc, ws_errors.ConnectionClosed):
        return ProviderError(PROVIDER, f"connection closed ({exc})", retryable=True)
    return ProviderError(PROVIDER, f"connection failed: {exc!r}", retryable=True)


def event_error(event: dict[str, Any]) -> ProviderError:
    """An `error` or `.failed` server event as a ProviderError."""
    error = event.get("error") if isinstance(event.get("error"), dict) else {}
    assert isinstance(error, dict)
    type_, code = error.get("type"), error.get("code")
    status = {"invalid_api_key": 401, "rate_limit_exceeded": 429}.get(str(code))
    retryable = type_ == "server_error" or status == 429 or event.get("type") != "error"
    return ProviderError(PROVIDER, f"{event.get('type')} {type_}/{code}: "
                         f"{error.get('message')}", status=status, retryable=retryable)


class _RecentPeak:
    """The most sessions held at once over the current and the previous window."""

    __slots__ = ("_current", "_previous", "_since")

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._current = self._previous = 0
        self._since = time.monotonic()

    def note(self, held: int) -> None:
        self._roll()
        self._current = max(self._current, held)

    def recent(self) -> int:
        self._roll()
        return max(self._current, self._previous)

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._since >= self.WINDOW_S:
            # A window with no lease at all ends both (an idle hour keeps nothing open).
            idle_window = now - self._since >= 2 * self.WINDOW_S
            self._previous = 0 if idle_window else self._current
            self._current, self._since = 0, now


class RealtimeConnection:
    """One transcription session (a WebSocket), leased to one stream at a time.

    Its reader task hands the session's events to the stream holding it; any error or a
    lost socket marks it `broken` (never reused) and fails that stream."""

    __slots__ = ("broken", "conn", "error", "leased", "opened", "reader", "ready", "stream")

    def __init__(self, conn: AsyncRealtimeConnection) -> None:
        self.conn = conn
        self.opened = time.monotonic()
        self.stream: Listener | None = None
        self.leased = False  # held by a stream (SessionPool counts them)
        self.broken = False
        self.error: ProviderError | None = None
        self.ready = asyncio.Event()  # the session.update was answered (or refused)
        self.reader = asyncio.create_task(self._read())

    def usable(self, max_age_s: float) -> bool:
        return not self.broken and time.monotonic() - self.opened < max_age_s

    async def send(self, data: str) -> None:
        await self.conn.send_raw(data)

    async def _read(self) -> None:
        try:
            while True:
                event = orjson.loads(await self.conn.recv_bytes())
                if isinstance(event, dict):
                    self._dispatch(event)
        except (ws_errors.WebSocketException, OSError, ValueError) as exc:
            self._lost(map_error(exc))

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "session.updated":
            self.ready.set()
        elif kind == "error":
            self._lost(event_error(event))
        elif self.stream is not None:
            self.stream.on_event(kind, event)

    def _lost(self, error: ProviderError) -> None:
        was_broken, self.broken = self.broken, True
        self.error = self.error or error
        self.ready.set()
        if self.stream is not None:
            self.stream.fail(error)
        elif not was_broken:
            log.warning("stt_realtime.idle_connection_lost", provider=PROVIDER, error=str(error))

    async def aclose(self) -> None:
        self.broken = True
        self.reader.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_S):
                await self.conn.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class SessionPool:
    """Connected, configured sessions kept idle for the next utterance.

    Warm-up connects `size`; finished streams hand their session back. A stream that
    finds none idle connects its own, in the background while the caller speaks; it joins
    the pool when done. Sessions wait idle while fewer than `size` do, or while the
    sessions open stay within the most held at once over the last minute or two (the
    utterances in progress at the busiest moment): so at 250 calls, with ~70 callers
    speaking at any time, a new utterance finds a warm session instead of opening (and
    the previous one closing) a WebSocket each time; after a busy spell the extras close
    as they come back. `size` 0: no session is reused."""

    def __init__(self, connect: Callable[[], Awaitable[RealtimeConnection]], size: int,
                 max_age_s: float, ready_timeout_s: float) -> None:
        self._connect = connect
        self.size = size
        self.max_age_s = max_age_s
        self.ready_timeout_s = ready_timeout_s
        self.closed = False
        self._idle: deque[RealtimeConnection] = deque()
        self._filling = 0
        self._fills: set[asyncio.Task[None]] = set()
        self._closes: set[asyncio.Task[None]] = set()  # never cancelled: a close is bounded
        self.leased = 0  # sessions held by streams now
        self._peaks = _RecentPeak()

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self) -> RealtimeConnection:
        if self.closed:
            raise ProviderError(PROVIDER, "provider closed", retryable=False)
        while self._idle:
            connection = self._idle.popleft()
            if connection.usable(self.max_age_s):
                return self._lease(connection)
            self.discard(connection)
        return self._lease(await self._connect())

    def _lease(self, connection: RealtimeConnection) -> RealtimeConnection:
        connection.leased = True
        self.leased += 1
        self._peaks.note(self.leased)
        return connection

    def _unlease(self, connection: RealtimeConnection) -> None:
        if connection.leased:
            connection.leased = False
            self.leased -= 1

    def release(self, connection: RealtimeConnection) -> None:
        connection.stream = None
        self._unlease(connection)
        # size 0: no reuse at all; else at least `size` idle, or as many as were held.
        keep = self.size and max(self.size - len(self._idle),
                                 self._peaks.recent() - self.leased - len(self._idle))
        if not self.closed and connection.usable(self.max_age_s) and keep > 0:
            self._idle.append(connection)
        else:
            self.discard(connection)

    def discard(self, connection: RealtimeConnection) -> None:
        connection.stream = None
        self._unlease(connection)
        self._spawn(self._closes, connection.aclose())

    async def fill(self) -> None:
        """Top the pool up and wait for it (warm-up)."""
        for _ in range(self.size - len(self._idle) - self._filling):
            self._filling += 1
            self._spawn(self._fills, self._fill_one())
        await asyncio.gather(*self._fills, return_exceptions=True)

    async def _fill_one(self) -> None:
        try:
            connection = await self._connect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ready_timeout_s):
                    await connection.ready.wait()
            if connection.ready.is_set() and connection.error is None:
                self.release(connection)
            else:
                self.discard(connection)
        except ProviderError as exc:
            log.warning("stt_realtime.prefill_failed", provider=PROVIDER, error=str(exc))
        finally:
            self._filling -= 1

    @staticmethod
    def _spawn(tasks: set[asyncio.Task[None]], work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def aclose(self) -> None:
        self.closed = True
        for task in list(self._fills):
            task.cancel()
        while self._idle:
            self.discard(self._idle.popleft())
        while self._fills or self._closes:
            await asyncio.gather(*self._fills, *self._closes, return_exceptions=True)
