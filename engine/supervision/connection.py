"""One console's connection to the supervisor API: hello, snapshot, live events, commands.

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
  does not hold up events); each gets a `Reply`. Before each, the console's token is
  checked again: a revoked token's command is refused and the console closed (1008).
  A read-only token's commands, a command with invalid arguments and one beyond the
  pending limit are refused here; every command, run or refused, is audited once by the
  backend's command runner under the token's name. A console whose commands keep being
  refused here is closed (1008): a real console never sends them, and each is a history row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from engine.bus.event_bus import BusError
from engine.bus.events import BusGap, Event, encode_event
from engine.log import get_logger
from engine.supervision.api_schema import Command, ErrorFrame, Reply
from engine.supervision.auth import SupervisorTokens
from engine.supervision.backend import Actor, SupervisorBackend
from engine.supervision.frames import read_command
from engine.supervision.tokens import TokenEntry

log = get_logger(__name__)

READONLY_REFUSAL = "read-only token cannot act"
REVOKED_REFUSAL = "token revoked"

# Close codes (RFC 6455 registry): 1013 "try again later" tells the console to reconnect.
CLOSE_TOO_SLOW = 1013
CLOSE_GOING_AWAY = int(WSCloseCode.GOING_AWAY)
CLOSE_INTERNAL = int(WSCloseCode.INTERNAL_ERROR)
CLOSE_POLICY = int(WSCloseCode.POLICY_VIOLATION)  # 1008: revoked, or refused too often


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How much one console may queue, and how long it may lag (see SupervisorApi)."""

    send_queue_frames: int
    slow_console_s: float
    max_pending_commands: int
    close_timeout_s: float
    snapshot_transcript_lines: int
    max_refused_commands: int = 20  # refused by the API itself, before the console goes


class ConsoleConnection:
    """One authenticated console, from its hello to its close."""

    def __init__(self, backend: SupervisorBackend, ws: web.WebSocketResponse,
                 limits: ConnectionLimits, *, token: TokenEntry, tokens: SupervisorTokens,
                 actor: Actor, remote: str, after: str | None,
                 subscription: AsyncGenerator[tuple[str, Event], None] | None) -> None:
        self._backend = backend
        self._limits = limits
        self._ws = ws
        self.token = token  # what it authenticated with, checked again before commands
        self._tokens = tokens
        self.actor = actor
        self._after = after
        self._subscription = subscription
        self._log = log.bind(actor=actor.name, role=actor.role, remote=remote)
        # Unbounded as a queue; events are admitted only below `send_queue_frames`
        # (see _put_event), other frames are few and capped in _enqueue.
        self._outbox: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self._queue_limit = limits.send_queue_frames
        self._space = asyncio.Event()  # set by the writer when the queue has room
        self._last_drained = time.monotonic()  # the queue was last below half its limit
        # Each command with the reason to refuse it found when it was read, if any.
        self._commands: asyncio.Queue[tuple[Command, str | None]] = asyncio.Queue(
            maxsize=limits.max_pending_commands)
        self._refused = 0  # commands refused here (not by the backend)
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
        self._log.info("console_api.connected", claimed_actor=self.actor.claimed or None,
                       resume_after=self._after)
        hello = self._backend.hello().model_copy(
            update={"readonly": self.actor.role == "readonly"})
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
            async with asyncio.timeout(self._limits.close_timeout_s + 1.0):
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
                async with asyncio.timeout(max(0.0, self._limits.slow_console_s - waited)):
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
        # A fleet backend first lets its views of other engines' calls read up to the
        # cursor (engine/fleet/fleet_view.py); this engine's own views only move ahead.
        prepare = getattr(self._backend, "prepare_snapshot", None)
        if prepare is not None:
            await prepare(cursor)
        snapshot = self._backend.snapshot()
        limit = self._limits.snapshot_transcript_lines
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
                error = self._ws.exception()
                if (isinstance(error, WebSocketError)
                        and error.code == WSCloseCode.MESSAGE_TOO_BIG):
                    self._log.warning("console_api.message_too_big", error=str(error))
                else:
                    self._log.info("console_api.read_error", error=repr(error))
                return

    def _on_text(self, data: str) -> None:
        read = read_command(data)
        if isinstance(read, Command):
            command, problem = read, None
        elif read.command is None:  # not a command on a call at all: nothing to audit
            self._refuse_frame(read.message)
            return
        else:
            command, problem = read.command, read.message
        try:
            self._commands.put_nowait((command, problem))
        except asyncio.QueueFull:
            self._refuse(command, "too many pending commands "
                                  f"(limit {self._limits.max_pending_commands})")

    def _refuse_frame(self, message: str) -> None:
        self._log.warning("console_api.bad_frame", error=message)
        self._enqueue(ErrorFrame(message=message).model_dump_json())

    async def _run_commands(self) -> None:
        while not self._stop.is_set():
            command, problem = await self._commands.get()
            self._executing = True
            try:
                await self._answer(command, problem)
            finally:
                self._executing = False

    async def _answer(self, command: Command, problem: str | None) -> None:
        """Run the command or refuse it; either way its reply is queued."""
        await self._tokens.refresh()
        if not self._tokens.is_current(self.token):
            self._refuse(command, REVOKED_REFUSAL, close=True)
        elif self.actor.role == "readonly":
            self._refuse(command, READONLY_REFUSAL)
        elif problem is not None:
            self._refuse(command, problem)
        else:
            self._enqueue((await self._execute(command)).model_dump_json())

    def _refuse(self, command: Command, error: str, *, close: bool = False) -> None:
        """Refuse a command here: audited by the backend, answered, counted."""
        self._log.warning("console_api.command_refused", command=command.command,
                          call_sid=command.call_sid, command_id=command.id, error=error)
        try:
            reply = self._backend.commands.refuse(command, self.actor, error)
        except Exception:
            self._log.exception("console_api.audit_failed", command=command.command,
                                call_sid=command.call_sid, command_id=command.id)
            reply = Reply(id=command.id, ok=False, error=error)
        self._enqueue(reply.model_dump_json())
        self._refused += 1
        if close:
            self.shut_down(CLOSE_POLICY, error)
        elif self._refused >= self._limits.max_refused_commands:
            self._log.warning("console_api.too_many_refused", count=self._refused)
            self.shut_down(CLOSE_POLICY, "too many refused commands")

    async def _execute(self, command: Command) -> Reply:
        started = time.monotonic()
        try:
            reply = await self._backend.commands.execute(command, self.actor)
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
