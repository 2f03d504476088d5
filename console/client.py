"""Async WebSocket client for the supervisor API (`/console/ws`).

`frames()` yields what the server sends (Hello, Snapshot, EventFrame, ErrorFrame) plus
`ConnectionChanged` items for the status bar; it reconnects on its own with exponential
backoff and jitter and resumes with `?after=<last event id>` so nothing is lost or
repeated. Replies are matched to commands by id inside the reader, so `send_command`
just awaits its Reply (or a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
from pydantic import ValidationError
from yarl import URL

from engine.supervision.api_schema import (
    SERVER_FRAME,
    Command,
    CommandName,
    ErrorFrame,
    EventFrame,
    Hello,
    Reply,
    Snapshot,
)

log = structlog.get_logger(__name__)

WS_PATH = "/console/ws"
ConnectionStateName = Literal["connecting", "connected", "reconnecting", "failed", "closed"]


@dataclass(slots=True, frozen=True)
class ConnectionChanged:
    """Connection state for the status bar (not a server frame)."""

    state: ConnectionStateName
    detail: str = ""
    retry_in_s: float | None = None


SourceItem = Hello | Snapshot | EventFrame | ErrorFrame | ConnectionChanged


class FrameSource(Protocol):
    """What the console reads from: the supervisor API or a Redis stream."""

    @property
    def readonly(self) -> bool: ...

    def frames(self) -> AsyncIterator[SourceItem]: ...

    async def send_command(self, command: CommandName, call_sid: str, *,
                           text: str | None = None, number: str | None = None) -> Reply: ...

    async def close(self) -> None: ...


def console_ws_url(engine: str) -> str:
    """'ws://host:port' (or http://, or host:port) -> the API's ws:// URL."""
    raw = engine if "://" in engine else f"ws://{engine}"
    parts = urlsplit(raw)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"not an engine address: {engine!r} (expected ws://HOST:PORT)")
    path = parts.path if parts.path not in ("", "/") else WS_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class AuthError(Exception):
    """The server refused the token: retrying will not help."""


class _EngineChanged(Exception):
    """Resumed on an engine other than the one the cursor came from: start over."""


class SupervisorClient:
    """One supervisor API connection with reconnect, resume and command replies."""

    def __init__(self, url: str, token: str, *, readonly: bool = False,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0,
                 reply_timeout_s: float = 5.0, heartbeat_s: float = 10.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.url = console_ws_url(url)
        self._token = token
        self._readonly = readonly
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._reply_timeout_s = reply_timeout_s
        self._heartbeat_s = heartbeat_s
        self._rng = rng
        self.last_event_id = ""  # resume point: the id of the last frame handed out
        self.hello: Hello | None = None
        self.connects = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._closed = False

    @property
    def readonly(self) -> bool:
        return self._readonly or bool(self.hello and self.hello.readonly)

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    def _connect_url(self) -> str:
        if not self.last_event_id:
            return self.url
        return str(URL(self.url).update_query(after=self.last_event_id))

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads reconnects of many consoles after an engine restart.
        ceiling = min(self._backoff_max_s, self._backoff_initial_s * (2 ** attempt))
        return ceiling / 2 + self._rng() * ceiling / 2

    async def frames(self) -> AsyncIterator[SourceItem]:
        attempt = 0
        self._session = aiohttp.ClientSession()
        try:
            while not self._closed:
                yield ConnectionChanged("connecting" if attempt == 0 else "reconnecting")
                try:
                    async for item in self._one_connection():
                        attempt = 0
                        yield item
                    reason = "connection closed by the engine"
                except AuthError as exc:
                    log.warning("console_auth_refused", url=self.url, detail=str(exc))
                    yield ConnectionChanged("failed", str(exc))
                    return
                except _EngineChanged:
                    continue  # at once, without `after`: the server sends a snapshot
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                finally:
                    self._fail_pending("connection lost before the reply; the command "
                                       "may or may not have run")
                if self._closed:
                    break
                delay = self._backoff(attempt)
                attempt += 1
                log.info("console_reconnecting", url=self.url, reason=reason,
                         retry_in_s=round(delay, 2), after=self.last_event_id)
                yield ConnectionChanged("reconnecting", reason, retry_in_s=delay)
                await asyncio.sleep(delay)
        finally:
            await self._close_session()

    async def _one_connection(self) -> AsyncIterator[SourceItem]:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            ws = await self._session.ws_connect(self._connect_url(), headers=headers,
                                                heartbeat=self._heartbeat_s,
                                                timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise AuthError(f"the engine refused the token ({exc.status})") from None
            raise
        self._ws = ws
        self.connects += 1
        resuming_on = self.hello.engine_id if self.last_event_id and self.hello else ""
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    if message.type == aiohttp.WSMsgType.ERROR:
                        raise aiohttp.ClientError(f"websocket error: {ws.exception()}")
                    continue
                try:
                    frame = SERVER_FRAME.validate_json(message.data)
                except ValidationError as exc:
                    log.warning("console_bad_frame", error=str(exc)[:200])
                    continue
                if isinstance(frame, Reply):
                    future = self._pending.pop(frame.id, None)
                    if future is not None and not future.done():
                        future.set_result(frame)
                    continue
                if isinstance(frame, Hello):
                    if resuming_on and frame.engine_id != resuming_on:
                        # A restarted engine's in-memory bus numbers its events from 1
                        # again: our cursor may name an unrelated event there.
                        log.info("console_engine_changed", was=resuming_on,
                                 now=frame.engine_id, cursor=self.last_event_id)
                        self.hello = frame
                        self.last_event_id = ""
                        raise _EngineChanged
                    self.hello = frame
                    yield ConnectionChanged("connected", frame.engine_id)
                elif isinstance(frame, Snapshot):
                    self.last_event_id = frame.cursor or self.last_event_id
                elif isinstance(frame, EventFrame):
                    self.last_event_id = frame.id
                yield frame
        finally:
            self._ws = None
            if not ws.closed:
                await ws.close()

    def _fail_pending(self, error: str) -> None:
        for command_id, future in list(self._pending.items()):
            if not future.done():
                future.set_result(Reply(id=command_id, ok=False, error=error))
        self._pending.clear()

    async def send_command(self, command: CommandName, call_sid: str, *,
                           text: str | None = None, number: str | None = None,
                           command_id: str | None = None) -> Reply:
        """Send one command and wait for its Reply. Never raises: failures come back as
        Reply(ok=False, error=...) so the UI can show them. Sending again with the same
        `command_id` (after a timeout or a lost connection) is safe on a fleet engine:
        the command runs once and the retry gets the first run's reply."""
        command_id = command_id or secrets.token_hex(8)
        try:
            frame = Command(id=command_id, command=command, call_sid=call_sid, text=text,
                            number=number)
        except ValidationError as exc:
            return Reply(id=command_id, ok=False,
                         error=f"invalid command: {exc.errors()[0]['msg']}")
        ws = self._ws
        if ws is None or ws.closed:
            return Reply(id=command_id, ok=False, error="not connected to the engine")
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await ws.send_str(frame.model_dump_json(exclude_none=True))
            return await asyncio.wait_for(future, self._reply_timeout_s)
        except TimeoutError:
            return Reply(id=command_id, ok=False,
                         error=f"no reply within {self._reply_timeout_s:g} s")
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            return Reply(id=command_id, ok=False, error=f"send failed: {exc}")
        finally:
            self._pending.pop(command_id, None)

    async def resync(self) -> None:
        """Start over from a fresh snapshot (after a BusGap: the view may be stale).
        Drops the connection; the reader reconnects without `after`."""
        self.last_event_id = ""
        ws = self._ws
        if ws is not None and not ws.closed:
            await ws.close()

    async def close(self) -> None:
        self._closed = True
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
        self._fail_pending("console closed")

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
