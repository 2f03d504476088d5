"""The supervisor API: WebSocket `/console/ws` for consoles (wire format: api_schema.py).

Serves on its own aiohttp site (`console_api.host:port`, 127.0.0.1 by default), apart from
the Twilio-facing app, so it is not public unless configured to be.

Per connection:
- Auth before the upgrade: `Authorization: Bearer <token>`, the full or the read-only
  token, compared in constant time; anything else is HTTP 401 and a warning line (never
  with the token). Header only: a token in the URL would end up in access logs. Browsers
  cannot set that header on a WebSocket, so a web page cannot hijack a local console API.
- `Hello`, then either a `Snapshot` (cursor pinned with `bus.latest_id()` before the
  snapshot is built, then events after that cursor) or, with `?after=<cursor>`, the events
  after the cursor the console last saw. A `BusGap` (cursor trimmed away, events lost)
  is not forwarded: the console gets a fresh `Snapshot` instead and events after it.
  Publishing is asynchronous, so a snapshot may already reflect an event that follows its
  cursor: consoles apply events idempotently (transcript lines replace by line_id).
- Events go out through a bounded queue drained by one writer task. A console that cannot
  keep up is closed with 1013 and the cursor to resume from: the bus keeps the events,
  so it reconnects with `after=` and loses nothing, and the engine never waits for it.
- Commands run one at a time per console, in order, in their own task (a slow transfer
  does not hold up events); each gets a `Reply`. A read-only console's commands are
  refused without reaching the backend. Every command is logged (actor, command, call,
  outcome); the backend audits executed ones to the call's history and the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import time
from collections.abc import AsyncGenerator
from typing import Literal, Protocol

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import ValidationError

from engine.bus.event_bus import BusError, EventBus
from engine.bus.events import BusGap, Event, encode_event
from engine.config import Config
from engine.log import get_logger
from engine.supervision.api_schema import COMMAND, Command, ErrorFrame, Hello, Reply, Snapshot
from engine.supervision.tokens import ConsoleTokens, load_or_create_tokens

log = get_logger(__name__)

WS_PATH = "/console/ws"
ACTOR_HEADER = "X-Switchboard-Actor"
DEFAULT_ACTOR = "supervisor"
READONLY_REFUSAL = "read-only token cannot act"
TokenKind = Literal["full", "readonly"]

# Close codes (RFC 6455 registry): 1013 "try again later" tells the console to reconnect.
CLOSE_TOO_SLOW = 1013
CLOSE_GOING_AWAY = int(WSCloseCode.GOING_AWAY)
CLOSE_INTERNAL = int(WSCloseCode.INTERNAL_ERROR)

_ACTOR_UNSAFE = re.compile(r"[^A-Za-z0-9._@+ -]")
_MAX_CURSOR_LENGTH = 64


class SupervisorBackend(Protocol):
    """What the engine provides to the API (implemented by the engine's wiring)."""

    engine_id: str
    bus: EventBus

    def snapshot(self) -> Snapshot:
        """Every live and recently ended call, and the spend totals, from live state.
        Leave `cursor` empty: the API sets it."""
        ...

    async def execute(self, command: Command, actor: str) -> Reply:
        """Perform one command; Reply(ok=True) or Reply(ok=False, error=<why>) having
        changed nothing. Audits it (call history + a CommandAudit event)."""
        ...

    def hello(self) -> Hello:
        """Engine id, transfer destinations, default queue number (`readonly` is set by
        the API)."""
        ...


class SupervisorApi:
    def __init__(self, config: Config, backend: SupervisorBackend, *,
                 tokens: ConsoleTokens | None = None,
                 heartbeat_s: float = 20.0,
                 send_queue_frames: int = 10_000,
                 slow_console_s: float = 5.0,
                 max_pending_commands: int = 32,
                 max_consoles: int = 32,
                 max_message_bytes: int = 16 * 1024,
                 close_timeout_s: float = 5.0) -> None:
        self._config = config
        self._backend = backend
        self._tokens = tokens if tokens is not None else load_or_create_tokens(config)
        # Compared as digests: equal lengths, so not even the token length leaks.
        self._full_digest = _digest(self._tokens.full)
        self._readonly_digest = (_digest(self._tokens.readonly)
                                 if self._tokens.readonly is not None else None)
        self.heartbeat_s = heartbeat_s
        self.send_queue_frames = send_queue_frames
        self.slow_console_s = slow_console_s
        self.max_pending_commands = max_pending_commands
        self.max_consoles = max_consoles
        self.max_message_bytes = max_message_bytes
        self.close_timeout_s = close_timeout_s
        self._connections: set[_ConsoleConnection] = set()
        self._runner: web.AppRunner | None = None
        self._stopping = False

    # --- lifecycle ----------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_get(WS_PATH, self._handle)

    async def start(self) -> None:
        """Listen on console_api.host:port (port 0: a free port, see `port`)."""
        if self._runner is not None:
            raise RuntimeError("supervisor API already started")
        host, port = self._config.console_api.host, self._config.console_api.port
        app = web.Application()
        self.routes(app)
        # Consoles are closed by stop() first, so cleanup has nothing left to wait for.
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            log.error("console_api.bind_failed", host=host, port=port, error=str(exc))
            raise
        self._runner = runner
        self._stopping = False
        if not _is_loopback(host):
            log.warning("console_api.not_local", host=host,
                        hint="plain ws: put TLS (a reverse proxy) or an SSH tunnel in front")
        log.info("console_api.listening", host=host, port=self.port, path=WS_PATH,
                 token_source=self._tokens.source,
                 readonly_token=self._tokens.readonly is not None)

    async def stop(self) -> None:
        """Close every console (1001) and stop listening."""
        self._stopping = True
        connections = list(self._connections)
        for connection in connections:
            connection.shut_down(CLOSE_GOING_AWAY, "engine shutting down")
        if connections:
            await asyncio.gather(*(c.finished.wait() for c in connections))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def tokens(self) -> ConsoleTokens:
        """The tokens consoles must present (for an in-process console, e.g. the demo)."""
        return self._tokens

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("supervisor API is not listening")
        return int(self._runner.addresses[0][1])

    @property
    def host(self) -> str:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("supervisor API is not listening")
        return str(self._runner.addresses[0][0])

    @property
    def console_count(self) -> int:
        return len(self._connections)

    # --- one console --------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> TokenKind | None:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            log.warning("console_api.auth_refused", reason="missing bearer token",
                        remote=request.remote)
            return None
        digest = _digest(presented.strip())
        # Both comparisons always run, so timing does not tell which one matched.
        is_full = _compare(digest, self._full_digest)
        is_readonly = (_compare(digest, self._readonly_digest)
                       if self._readonly_digest is not None else False)
        if is_full:
            return "full"
        if is_readonly:
            return "readonly"
        log.warning("console_api.auth_refused", reason="wrong token", remote=request.remote)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = self._authenticate(request)
        if kind is None:
            return web.Response(status=401, text="missing or wrong console token\n",
                                headers={"WWW-Authenticate": 'Bearer realm="switchboard"'})
        if self._stopping:
            return web.Response(status=503, text="engine shutting down\n")
        if len(self._connections) >= self.max_consoles:
            log.warning("console_api.too_many_consoles", limit=self.max_consoles,
                        remote=request.remote)
            return web.Response(status=503, text="too many consoles connected\n")
        after = request.query.get("after")
        subscription: AsyncGenerator[tuple[str, Event], None] | None = None
        if after is not None:
            # Validated before the upgrade, so a bad cursor is a plain HTTP 400.
            try:
                if not after or len(after) > _MAX_CURSOR_LENGTH:
                    raise ValueError(f"invalid cursor {after[:_MAX_CURSOR_LENGTH]!r}")
                subscription = self._backend.bus.subscribe(after=after)
            except ValueError as exc:
                log.warning("console_api.bad_cursor", error=str(exc), remote=request.remote)
                return web.Response(status=400, text=f"{exc}\n")
        actor_name = _sanitize_actor(request.headers.get(ACTOR_HEADER, ""))
        # compress=False: deflating thousands of small frames a second costs the engine
        # CPU that live calls need; the console link is local or tunnelled.
        ws = web.WebSocketResponse(heartbeat=self.heartbeat_s, compress=False,
                                   max_msg_size=self.max_message_bytes,
                                   timeout=self.close_timeout_s)
        try:
            await ws.prepare(request)
        except BaseException:
            if subscription is not None:
                await subscription.aclose()
            raise
        connection = _ConsoleConnection(self, ws, kind=kind, actor=f"{actor_name}/{kind}",
                                        remote=request.remote or "", after=after,
                                        subscription=subscription)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
        return ws


class _ConsoleConnection:
    def __init__(self, api: SupervisorApi, ws: web.WebSocketResponse, *, kind: TokenKind,
                 actor: str, remote: str, after: str | None,
                 subscription: AsyncGenerator[tuple[str, Event], None] | None) -> None:
        self._api = api
        self._backend = api._backend
        self._ws = ws
        self.kind = kind
        self.actor = actor
        self._after = after
        self._subscription = subscription
        self._log = log.bind(actor=actor, remote=remote)
        # Unbounded as a queue; events are admitted only below `send_queue_frames`
        # (see _put_event), other frames are few and capped in _enqueue.
        self._outbox: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self._queue_limit = api.send_queue_frames
        self._space = asyncio.Event()  # set by the writer when the queue has room
        self._last_drained = time.monotonic()  # the queue was last below half its limit
        self._commands: asyncio.Queue[Command] = asyncio.Queue(
            maxsize=api.max_pending_commands)
        self._stop = asyncio.Event()
        self._close_code = int(WSCloseCode.OK)
        self._close_reason = ""
        self._last_sent_id: str | None = after  # resume point for a console we close
        self._executing = False
        self.finished = asyncio.Event()

    def shut_down(self, code: int, reason: str) -> None:
        """Ask the connection to close (first caller's code wins)."""
        if not self._stop.is_set():
            self._close_code, self._close_reason = code, reason
            self._stop.set()

    async def run(self) -> None:
        self._log.info("console_api.connected", kind=self.kind,
                       resume_after=self._after)
        hello = self._backend.hello().model_copy(update={"readonly": self.kind == "readonly"})
        self._enqueue(hello.model_dump_json())
        tasks = [asyncio.create_task(self._read_frames(), name="console-read"),
                 asyncio.create_task(self._write_frames(), name="console-write"),
                 asyncio.create_task(self._pump_events(), name="console-events")]
        commands = asyncio.create_task(self._run_commands(), name="console-commands")
        stop_waiter = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([*tasks, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stop.set()
            for task in [*tasks, stop_waiter]:
                task.cancel()
            # A command already running finishes (cancelling it halfway could leave a
            # call half transferred); queued ones are dropped, nothing was done for them.
            if not self._executing:
                commands.cancel()
            if not self._commands.empty():
                self._log.warning("console_api.commands_dropped",
                                  count=self._commands.qsize())
            await asyncio.gather(*tasks, stop_waiter, return_exceptions=True)
            if self._subscription is not None:
                await self._subscription.aclose()
            await self._close()
            # A running command is awaited to its end; its reply has no reader any more.
            await asyncio.gather(commands, return_exceptions=True)
            self._log.info("console_api.disconnected", code=self._ws.close_code,
                           reason=self._close_reason or None,
                           last_event_id=self._last_sent_id)
            self.finished.set()

    async def _close(self) -> None:
        if self._ws.closed:
            return
        with contextlib.suppress(asyncio.TimeoutError, OSError, RuntimeError):
            async with asyncio.timeout(self._api.close_timeout_s + 1.0):
                # drain=False: a console too slow to read its events will not read
                # this promptly either; the close frame follows what is buffered.
                await self._ws.close(code=self._close_code,
                                     message=self._close_reason.encode()[:123],
                                     drain=False)

    # --- outgoing -----------------------------------------------------------------

    def _enqueue(self, frame: str, event_id: str | None = None) -> bool:
        """Queue a frame that is not an event (hello, snapshot, reply, error)."""
        if self._stop.is_set():
            return False
        # Replies and errors may pass a full event queue, but a console that sends
        # frames without ever reading the answers cannot grow it without bound.
        if self._outbox.qsize() >= 2 * self._queue_limit:
            self._too_slow()
            return False
        self._outbox.put_nowait((frame, event_id))
        return True

    async def _put_event(self, frame: str, event_id: str) -> bool:
        """Queue an event, waiting while the queue is full; False when closing.

        A console is too slow when its queue has not been below half full for
        `slow_console_s`: stalled, or reading slower than events arrive. A console that
        merely takes a burst drains below half quickly and is left alone.
        """
        outbox = self._outbox
        while outbox.qsize() >= self._queue_limit:
            if self._stop.is_set():
                return False
            waited = time.monotonic() - self._last_drained
            self._space.clear()
            try:
                async with asyncio.timeout(max(0.0, self._api.slow_console_s - waited)):
                    await self._space.wait()
            except TimeoutError:
                self._too_slow()
                return False
        if self._stop.is_set():
            return False
        outbox.put_nowait((frame, event_id))
        return True

    def _too_slow(self) -> None:
        resume = self._last_sent_id
        reason = ("console too slow; reconnect with after=" + resume if resume
                  else "console too slow; reconnect")
        self._log.warning("console_api.console_too_slow", queued=self._outbox.qsize(),
                          resume_after=resume)
        self.shut_down(CLOSE_TOO_SLOW, reason)

    async def _write_frames(self) -> None:
        ws = self._ws
        outbox = self._outbox
        limit = self._queue_limit
        while True:
            frame, event_id = await outbox.get()
            size = outbox.qsize()
            if size < limit:
                if not self._space.is_set():
                    self._space.set()
                if size < limit // 2:
                    self._last_drained = time.monotonic()
            try:
                # Awaits the transport when its buffer is full: that backs up our own
                # queue, never the bus or the engine.
                await ws.send_str(frame)
            except (ConnectionError, RuntimeError) as exc:
                self._log.info("console_api.send_failed", error=repr(exc))
                return
            if event_id is not None:
                self._last_sent_id = event_id

    async def _pump_events(self) -> None:
        bus = self._backend.bus
        try:
            if self._subscription is None:
                cursor = await self._send_snapshot()
                if cursor is None:
                    return
                self._subscription = bus.subscribe(after=cursor)
            while True:
                gap = await self._forward(self._subscription)
                await self._subscription.aclose()
                self._subscription = None
                if gap is None:  # the bus closed: the engine is going down
                    self.shut_down(CLOSE_GOING_AWAY, "event bus closed")
                    return
                self._log.warning("console_api.events_lost", reason=gap.reason,
                                  missed_after=gap.missed_after, count=gap.count)
                cursor = await self._send_snapshot()
                if cursor is None:
                    return
                self._subscription = bus.subscribe(after=cursor)
        except BusError as exc:
            self._log.warning("console_api.bus_unavailable", error=str(exc))
            self.shut_down(CLOSE_INTERNAL, "event bus unavailable; reconnect later")
        except Exception:  # e.g. a snapshot that failed to build: this console only
            self._log.exception("console_api.events_failed")
            self.shut_down(CLOSE_INTERNAL, "internal error; see the engine log")

    async def _forward(self, subscription: AsyncGenerator[tuple[str, Event], None],
                       ) -> BusGap | None:
        """Queue events until a gap (returned) or the end of the bus (None)."""
        outbox = self._outbox
        limit = self._queue_limit
        stop = self._stop
        async for event_id, event in subscription:
            if isinstance(event, BusGap):
                return event
            # The event's own serializer inside a prebuilt frame: no model per frame.
            frame = ('{"type":"event","id":' + json.dumps(event_id) + ',"event":'
                     + encode_event(event).decode() + "}")
            if outbox.qsize() < limit and not stop.is_set():  # the hot path
                outbox.put_nowait((frame, event_id))
            elif not await self._put_event(frame, event_id):
                return None
        return None

    async def _send_snapshot(self) -> str | None:
        """Pin the cursor, then snapshot: nothing published after the cursor is lost.
        Returns the cursor, None when the connection is closing."""
        cursor = await self._backend.bus.latest_id()
        snapshot = self._backend.snapshot()  # no await between pin and snapshot
        limit = self._api._config.console_api.snapshot_transcript_lines
        calls = [call if len(call.transcript) <= limit
                 else call.model_copy(update={"transcript": call.transcript[-limit:]})
                 for call in snapshot.calls]
        snapshot = snapshot.model_copy(update={
            "cursor": cursor, "calls": calls,
            "server_time": snapshot.server_time or time.time()})
        if not self._enqueue(snapshot.model_dump_json(), cursor):
            return None
        self._log.info("console_api.snapshot_sent", cursor=cursor, calls=len(calls))
        return cursor

    # --- incoming -----------------------------------------------------------------

    async def _read_frames(self) -> None:
        async for message in self._ws:
            if message.type == WSMsgType.TEXT:
                self._on_text(message.data)
            elif message.type == WSMsgType.BINARY:
                self._refuse_frame("binary frames are not supported; send JSON text")
            elif message.type == WSMsgType.ERROR:
                self._log.info("console_api.read_error", error=repr(self._ws.exception()))
                return

    def _on_text(self, data: str) -> None:
        try:
            command = COMMAND.validate_json(data)
        except ValidationError as exc:
            self._refuse_frame(_explain_bad_command(data, exc))
            return
        if self.kind == "readonly":
            self._log.warning("console_api.command_refused", command=command.command,
                              call_sid=command.call_sid, command_id=command.id,
                              error=READONLY_REFUSAL)
            self._enqueue(Reply(id=command.id, ok=False,
                                error=READONLY_REFUSAL).model_dump_json())
            return
        try:
            self._commands.put_nowait(command)
        except asyncio.QueueFull:
            error = f"too many pending commands (limit {self._api.max_pending_commands})"
            self._log.warning("console_api.command_refused", command=command.command,
                              call_sid=command.call_sid, command_id=command.id, error=error)
            self._enqueue(Reply(id=command.id, ok=False, error=error).model_dump_json())

    def _refuse_frame(self, message: str) -> None:
        self._log.warning("console_api.bad_frame", error=message)
        self._enqueue(ErrorFrame(message=message).model_dump_json())

    async def _run_commands(self) -> None:
        while not self._stop.is_set():
            command = await self._commands.get()
            self._executing = True
            try:
                reply = await self._execute(command)
            finally:
                self._executing = False
            self._enqueue(reply.model_dump_json())

    async def _execute(self, command: Command) -> Reply:
        started = time.monotonic()
        try:
            reply = await self._backend.execute(command, self.actor)
        except Exception as exc:
            self._log.exception("console_api.command_crashed", command=command.command,
                                call_sid=command.call_sid, command_id=command.id)
            reply = Reply(id=command.id, ok=False,
                          error=f"internal error ({type(exc).__name__}); see the engine log")
        if reply.id != command.id:  # the reply must answer this command
            reply = reply.model_copy(update={"id": command.id})
        args = {key: value for key, value in (("text", command.text),
                                              ("number", command.number))
                if value is not None}
        (self._log.info if reply.ok else self._log.warning)(
            "console_api.command", call_sid=command.call_sid, command=command.command,
            command_id=command.id, args=args, ok=reply.ok, error=reply.error,
            duration_ms=round((time.monotonic() - started) * 1000, 1))
        return reply


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _compare(a: bytes, b: bytes | None) -> bool:
    return b is not None and hmac.compare_digest(a, b)


def _sanitize_actor(raw: str) -> str:
    """A label for the audit trail (self-declared, not authenticated: the token is)."""
    name = _ACTOR_UNSAFE.sub("", raw)[:64].strip()
    return name or DEFAULT_ACTOR


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _explain_bad_command(data: str, exc: ValidationError) -> str:
    """A message the console's user can act on (slow path: bad frames only)."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<frame>'}: {err['msg']}"
        for err in exc.errors()[:3])
    command_id = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        raw = json.loads(data)
        if isinstance(raw, dict) and isinstance(raw.get("id"), str):
            command_id = f" {raw['id'][:64]!r}"
    return f"invalid command{command_id}: {problems}"[:500]
