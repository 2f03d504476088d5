"""Supervisor API `/console/ws` over real sockets, on the memory bus and on Redis Streams.

The backend is `CallTable`, a small implementation of our own SupervisorBackend protocol
(a dict of calls, commands checked against the call's state) publishing to a real bus.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from engine.bus.event_bus import EventBus
from engine.bus.events import (
    CallState,
    CommandAudit,
    EventStamper,
    StateChanged,
    TranscriptLine,
)
from engine.bus.memory import MemoryEventBus
from engine.bus.redis_streams import RedisEventBus
from engine.config import Config, ConsoleApiConfig
from engine.supervision.api_schema import (
    SERVER_FRAME,
    CallSnapshot,
    Command,
    ErrorFrame,
    EventFrame,
    Hello,
    Reply,
    Snapshot,
    TranscriptEntry,
)
from engine.supervision.backend import Actor, CommandRunner
from engine.supervision.connection import CLOSE_TOO_SLOW, READONLY_REFUSAL
from engine.supervision.server import SupervisorApi
from engine.supervision.tokens import ConsoleTokens, TokenError, load_or_create_tokens
from tests.conftest import BusFactory

FULL = "full-token-" + "f" * 32
READONLY = "readonly-token-" + "r" * 32

ALLOWED: dict[str, set[CallState]] = {
    "take_over": {"connected", "ai"},
    "hand_back": {"human_takeover"},
    "say": {"human_takeover"},
    "transfer": {"ai", "human_takeover"},
    "escalate": {"ai", "human_takeover"},
    "hang_up": {"connected", "ai", "human_takeover", "transferring"},
}
NEXT_STATE: dict[str, CallState | None] = {
    "take_over": "human_takeover", "hand_back": "ai", "say": None,
    "transfer": "transferring", "escalate": "transferring", "hang_up": "ended"}


class CallTable:
    """SupervisorBackend over a dict of calls; publishes what it does to the bus."""

    def __init__(self, bus: EventBus, engine_id: str = "engine-test") -> None:
        self.engine_id = engine_id
        self.bus = bus
        self.stamper = EventStamper(engine_id)
        self.calls: dict[str, CallSnapshot] = {}
        self.executed: list[tuple[Command, Actor]] = []
        self.refused: list[tuple[Command, Actor, str]] = []  # by the API, before running
        self.delay_s: dict[str, float] = {}  # per command name: a slow REST call
        self.crash_on: set[str] = set()  # call sids whose commands raise
        self.snapshot_error: Exception | None = None

    def add_call(self, call_sid: str, state: CallState = "ai", lines: int = 0) -> None:
        self.calls[call_sid] = CallSnapshot(
            call_sid=call_sid, from_number="+15550001", state=state,
            started_at=time.time(), cost_usd=0.01,
            transcript=[TranscriptEntry(line_id=f"{call_sid}-{i}", speaker="caller",
                                        text=f"hello {i}") for i in range(lines)])

    async def say_line(self, call_sid: str, text: str) -> str:
        line_id = uuid.uuid4().hex[:8]
        call = self.calls[call_sid]
        call.transcript.append(TranscriptEntry(line_id=line_id, speaker="caller", text=text))
        return await self.bus.publish(self.stamper.stamp(TranscriptLine(
            call_sid=call_sid, speaker="caller", text=text, line_id=line_id)))

    def snapshot(self) -> Snapshot:
        if self.snapshot_error is not None:
            raise self.snapshot_error
        return Snapshot(server_time=time.time(),
                        calls=[c.model_copy(deep=True) for c in self.calls.values()])

    def hello(self) -> Hello:
        return Hello(engine_id=self.engine_id, transfer_destinations=[("Sales", "+15550100")],
                     default_transfer_number="+15550199")

    @property
    def commands(self) -> CommandRunner:
        return self

    def refuse(self, command: Command, actor: Actor, error: str) -> Reply:
        self.refused.append((command, actor, error))
        return Reply(id=command.id, ok=False, error=error)

    async def execute(self, command: Command, actor: Actor) -> Reply:
        self.executed.append((command, actor))
        if command.call_sid in self.crash_on:
            raise RuntimeError("backend exploded")
        if command.command in self.delay_s:
            await asyncio.sleep(self.delay_s[command.command])
        call = self.calls.get(command.call_sid)
        error = ""
        if call is None:
            error = "unknown call"
        elif call.state == "ended":
            error = "call already ended"
        elif call.state not in ALLOWED[command.command]:
            error = "not allowed in this state"
        else:
            new = NEXT_STATE[command.command]
            if new is not None:
                old, call.state = call.state, CallState(new)
                await self.bus.publish(self.stamper.stamp(StateChanged(
                    call_sid=call.call_sid, old=old, new=new, reason=command.command)))
        await self.bus.publish(self.stamper.stamp(CommandAudit(
            call_sid=command.call_sid, actor=actor.name, command=command.command,
            ok=not error, error=error)))
        return Reply(id=command.id, ok=not error, error=error or None)






def make_config(**console_api: Any) -> Config:
    return Config.model_validate({"console_api": {"port": 0, **console_api}})


@asynccontextmanager
async def running_api(backend: CallTable, config: Config | None = None,
                      **kwargs: Any) -> AsyncIterator[SupervisorApi]:
    api = SupervisorApi(config or make_config(snapshot_transcript_lines=3), backend,
                        tokens=ConsoleTokens(full=FULL, readonly=READONLY), **kwargs)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@asynccontextmanager
async def console(api: SupervisorApi, token: str | None = FULL, after: str | None = None,
                  actor: str | None = None,
                  ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if actor is not None:
        headers["X-Switchboard-Actor"] = actor
    url = f"http://127.0.0.1:{api.port}/console/ws"
    params = {"after": after} if after is not None else None
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url, headers=headers, params=params) as ws:
        yield ws


async def recv(ws: aiohttp.ClientWebSocketResponse, within_s: float = 5.0) -> Any:
    msg = await ws.receive(timeout=within_s)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg}"
    return SERVER_FRAME.validate_json(msg.data)


async def recv_until(ws: aiohttp.ClientWebSocketResponse, kind: type,
                     within_s: float = 5.0) -> tuple[Any, list[Any]]:
    """The next frame of `kind`, and the frames received before it."""
    before: list[Any] = []
    async with asyncio.timeout(within_s):
        while True:
            frame = await recv(ws)
            if isinstance(frame, kind):
                return frame, before
            before.append(frame)


async def handshake(ws: aiohttp.ClientWebSocketResponse) -> tuple[Hello, Snapshot]:
    hello = await recv(ws)
    snapshot = await recv(ws)
    assert isinstance(hello, Hello) and isinstance(snapshot, Snapshot)
    return hello, snapshot


async def command(ws: aiohttp.ClientWebSocketResponse, cmd_id: str, name: str,
                  call_sid: str, **extra: str) -> Reply:
    await ws.send_json({"type": "command", "id": cmd_id, "command": name,
                        "call_sid": call_sid, **extra})
    reply, _ = await recv_until(ws, Reply)
    assert reply.id == cmd_id
    return reply


async def logged(logs: Sequence[Mapping[str, Any]], event: str, within_s: float = 10.0) -> None:
    for _ in range(int(within_s / 0.02)):
        if any(e["event"] == event for e in logs):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {event} log line within {within_s} s")


def line_texts(frames: list[Any]) -> list[str]:
    return [f.event.text for f in frames
            if isinstance(f, EventFrame) and isinstance(f.event, TranscriptLine)]


# --- snapshot and live events ---------------------------------------------------------


async def test_snapshot_then_live_events(make_bus: BusFactory) -> None:
    backend = CallTable(await make_bus(maxlen=10_000, block_ms=300))
    backend.add_call("CA1", lines=5)
    backend.add_call("CA2", state="human_takeover")
    await backend.say_line("CA2", "before connect")
    async with running_api(backend) as api, console(api) as ws:
        hello, snapshot = await handshake(ws)
        assert hello.engine_id == "engine-test" and hello.readonly is False
        assert hello.transfer_destinations == [("Sales", "+15550100")]
        assert snapshot.cursor == await backend.bus.latest_id()
        calls = {c.call_sid: c for c in snapshot.calls}
        assert calls.keys() == {"CA1", "CA2"}
        assert calls["CA2"].state == "human_takeover"
        # Trimmed to console_api.snapshot_transcript_lines (3), newest kept.
        assert [e.text for e in calls["CA1"].transcript] == ["hello 2", "hello 3", "hello 4"]
        assert [e.text for e in calls["CA2"].transcript] == ["before connect"]
        ids = [await backend.say_line("CA1", f"live {i}") for i in range(3)]
        frames = [await recv(ws) for _ in range(3)]
    assert [f.id for f in frames] == ids
    assert line_texts(frames) == ["live 0", "live 1", "live 2"]
    assert all(f.event.engine_id == "engine-test" and f.event.seq > 0 for f in frames)


# --- authentication -------------------------------------------------------------------


async def test_missing_or_wrong_token_is_refused_and_logged() -> None:
    backend = CallTable(MemoryEventBus())
    wrong = "not-the-token-" + "x" * 30
    async with running_api(backend) as api:
        with capture_logs() as logs:
            for headers in ({}, {"Authorization": f"Basic {wrong}"},
                            {"Authorization": f"Bearer {wrong}"},
                            {"Authorization": f"Bearer {FULL}x"}):
                async with aiohttp.ClientSession() as session:
                    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                        await session.ws_connect(f"http://127.0.0.1:{api.port}/console/ws",
                                                 headers=headers)
                assert refused.value.status == 401
        assert api.console_count == 0
    refusals = [e for e in logs if e["event"] == "console_api.auth_refused"]
    assert [e["reason"] for e in refusals] == [
        "missing bearer token", "missing bearer token", "wrong token", "wrong token"]
    assert all(e["log_level"] == "warning" for e in refusals)
    assert wrong not in repr(logs) and FULL not in repr(logs)


async def test_readonly_token_watches_but_cannot_act() -> None:
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1", state="ai")
    async with running_api(backend) as api, console(api, token=READONLY) as ws:
        hello, snapshot = await handshake(ws)
        assert hello.readonly is True
        assert [c.call_sid for c in snapshot.calls] == ["CA1"]
        event_id = await backend.say_line("CA1", "watch this")
        frame = await recv(ws)
        assert isinstance(frame, EventFrame) and frame.id == event_id
        with capture_logs() as logs:
            for name in ("take_over", "hang_up"):
                reply = await command(ws, f"c-{name}", name, "CA1")
                assert (reply.ok, reply.error) == (False, READONLY_REFUSAL)
    assert backend.executed == []
    assert backend.calls["CA1"].state == "ai"
    # Refused before running, and handed to the backend's runner to be audited: under the
    # read-only console token's name.
    assert [(c.command, a, error) for c, a, error in backend.refused] == [
        ("take_over", Actor("console-readonly", "readonly"), READONLY_REFUSAL),
        ("hang_up", Actor("console-readonly", "readonly"), READONLY_REFUSAL)]
    refused = [e for e in logs if e["event"] == "console_api.command_refused"]
    assert [e["command"] for e in refused] == ["take_over", "hang_up"]
    assert all(e["actor"] == "console-readonly" for e in refused)


# --- commands -------------------------------------------------------------------------


async def test_commands_reply_ok_or_say_why_and_are_audited() -> None:
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1", state="ai")
    backend.add_call("CA2", state="ai")
    backend.add_call("CA3", state="ended")
    async with running_api(backend) as api, console(api, actor="alice<script>") as ws:
        await handshake(ws)
        commands = [("1", "take_over", "CA1", {}),
                    ("2", "say", "CA1", {"text": "One moment please."}),
                    ("3", "hang_up", "CA404", {}), ("4", "take_over", "CA3", {}),
                    ("5", "hand_back", "CA2", {}),
                    ("6", "transfer", "CA1", {"number": "+15550100"})]
        with capture_logs() as logs:
            for cmd_id, name, call_sid, extra in commands:
                await ws.send_json({"type": "command", "id": cmd_id, "command": name,
                                    "call_sid": call_sid, **extra})
            replies: list[Reply] = []
            audits: list[CommandAudit] = []  # the backend's, streamed like any event
            async with asyncio.timeout(5):
                while len(replies) < 6 or len(audits) < 6:
                    frame = await recv(ws)
                    if isinstance(frame, Reply):
                        replies.append(frame)
                    elif isinstance(frame.event, CommandAudit):
                        audits.append(frame.event)
    assert [r.id for r in replies] == ["1", "2", "3", "4", "5", "6"]  # in order
    assert [(r.ok, r.error) for r in replies] == [
        (True, None), (True, None), (False, "unknown call"), (False, "call already ended"),
        (False, "not allowed in this state"), (True, None)]
    # Nothing changed on error.
    assert backend.calls["CA2"].state == "ai" and backend.calls["CA3"].state == "ended"
    assert backend.calls["CA1"].state == "transferring"
    # The token decides who acted; the header is kept, sanitized, as a claim only.
    assert {actor for _, actor in backend.executed} == {
        Actor("console", "full", claimed="alicescript")}
    assert [(a.command, a.ok) for a in audits] == [
        ("take_over", True), ("say", True), ("hang_up", False), ("take_over", False),
        ("hand_back", False), ("transfer", True)]
    lines = [e for e in logs if e["event"] == "console_api.command"]
    assert [(e["command_id"], e["call_sid"], e["ok"], e["error"]) for e in lines] == [
        ("1", "CA1", True, None), ("2", "CA1", True, None), ("3", "CA404", False, "unknown call"),
        ("4", "CA3", False, "call already ended"), ("5", "CA2", False, "not allowed in this state"),
        ("6", "CA1", True, None)]
    assert lines[1]["args"] == {"text": "One moment please."}
    assert all(e["actor"] == "console" for e in lines)


async def test_commands_run_in_order_without_holding_up_events() -> None:
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1", state="ai")
    backend.delay_s["transfer"] = 0.5  # a slow REST call
    async with running_api(backend) as api, console(api) as ws:
        await handshake(ws)
        await ws.send_json({"type": "command", "id": "t", "command": "transfer",
                            "call_sid": "CA1"})
        await ws.send_json({"type": "command", "id": "h", "command": "hang_up",
                            "call_sid": "CA1"})
        await asyncio.sleep(0.05)
        await backend.say_line("CA1", "while transferring")
        first_reply, before = await recv_until(ws, Reply)
        second_reply, _ = await recv_until(ws, Reply)
    assert line_texts(before) == ["while transferring"]  # streamed during the transfer
    assert [first_reply.id, second_reply.id] == ["t", "h"]
    assert first_reply.ok and second_reply.ok  # hang_up ran after transfer had finished
    assert [c.command for c, _ in backend.executed] == ["transfer", "hang_up"]


async def test_backend_failure_is_an_error_reply_not_a_dead_socket() -> None:
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1", state="ai")
    backend.add_call("CA-boom", state="ai")
    backend.crash_on.add("CA-boom")
    async with running_api(backend) as api, console(api) as ws:
        await handshake(ws)
        with capture_logs() as logs:
            crashed = await command(ws, "1", "hang_up", "CA-boom")
        assert crashed.ok is False and "internal error" in (crashed.error or "")
        assert (await command(ws, "2", "take_over", "CA1")).ok
    assert any(e["event"] == "console_api.command_crashed" for e in logs)


async def test_malformed_frames_get_an_error_and_the_socket_stays_open() -> None:
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1", state="ai")
    async with running_api(backend) as api, console(api) as ws:
        await handshake(ws)
        with capture_logs() as logs:
            await ws.send_str("not json")
            not_json = await recv(ws)
            await ws.send_json({"type": "command", "id": "x1", "command": "dance",
                                "call_sid": "CA1"})
            bad_verb = await recv(ws)
            await ws.send_json({"type": "command", "id": "x2", "command": "say"})
            no_call = await recv(ws)
            await ws.send_bytes(b"\x00\x01")
            binary = await recv(ws)
        assert all(isinstance(f, ErrorFrame) for f in (not_json, bad_verb, no_call, binary))
        assert "'x1'" in bad_verb.message and "command" in bad_verb.message
        assert "call_sid" in no_call.message
        assert "binary" in binary.message
        assert (await command(ws, "ok", "take_over", "CA1")).ok
    assert backend.executed[0][0].id == "ok" and len(backend.executed) == 1
    assert [e["event"] for e in logs].count("console_api.bad_frame") == 4


# --- resuming -------------------------------------------------------------------------


async def test_reconnect_with_cursor_misses_no_event(make_bus: BusFactory) -> None:
    backend = CallTable(await make_bus(maxlen=10_000, block_ms=300))
    backend.add_call("CA1")
    total = 300
    published: list[str] = []

    async def publish_all() -> None:
        for i in range(total):
            published.append(await backend.say_line("CA1", f"line {i}"))
            if i % 5 == 0:
                await asyncio.sleep(0.002)

    received: list[EventFrame] = []
    async with running_api(backend) as api:
        async with console(api) as ws:
            await handshake(ws)
            publisher = asyncio.create_task(publish_all())
            while len(received) < 40:
                received.append(await recv(ws))
        # Disconnected while events keep coming.
        await asyncio.sleep(0.05)
        assert not publisher.done()
        async with console(api, after=received[-1].id) as ws:
            assert isinstance(await recv(ws), Hello)
            while len(received) < total:  # no snapshot on resume: events only
                frame = await recv(ws)
                assert isinstance(frame, EventFrame), frame
                received.append(frame)
            await publisher
            await backend.say_line("CA1", "marker")
            assert line_texts([await recv(ws)]) == ["marker"]  # nothing duplicated before
    assert line_texts(received) == [f"line {i}" for i in range(total)]
    assert [f.id for f in received] == published


async def test_trimmed_cursor_gets_a_fresh_snapshot(make_bus: BusFactory) -> None:
    bus = await make_bus(maxlen=20, block_ms=300)
    backend = CallTable(bus)
    backend.add_call("CA1")
    async with running_api(backend) as api:
        async with console(api) as ws:
            await handshake(ws)
            await backend.say_line("CA1", "seen")
            last_seen = (await recv(ws)).id
        for i in range(60):
            await backend.say_line("CA1", f"missed {i}")
        if isinstance(bus, RedisEventBus):  # MAXLEN ~ trims lazily: trim exactly
            client = aioredis.from_url(bus._url)
            await client.xtrim(bus.stream_key, maxlen=5, approximate=False)
            await client.aclose()
        async with console(api, after=last_seen) as ws:
            assert isinstance(await recv(ws), Hello)
            snapshot = await recv(ws)
            assert isinstance(snapshot, Snapshot)
            assert snapshot.cursor == await bus.latest_id()
            assert [e.text for e in snapshot.calls[0].transcript] == [
                "missed 57", "missed 58", "missed 59"]
            await backend.say_line("CA1", "after the snapshot")
            frame = await recv(ws)
    assert line_texts([frame]) == ["after the snapshot"]


async def test_a_bad_cursor_is_refused_before_the_upgrade() -> None:
    backend = CallTable(MemoryEventBus())
    async with running_api(backend) as api:
        for bad in ("not-a-cursor", "-5", "9" * 100):
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(
                        f"http://127.0.0.1:{api.port}/console/ws", params={"after": bad},
                        headers={"Authorization": f"Bearer {FULL}"})
            assert refused.value.status == 400


# --- slow consoles, shutdown, binding ---------------------------------------------------


async def test_a_slow_console_is_closed_and_resumes_losslessly() -> None:
    bus = MemoryEventBus(maxlen=100_000)
    backend = CallTable(bus)
    backend.add_call("CA1")
    total = 6000
    padding = "x" * 4000  # big frames fill the socket buffers sooner
    fast_frames: list[EventFrame] = []

    async def read_fast(ws: aiohttp.ClientWebSocketResponse) -> None:
        while len(fast_frames) < total:
            frame = await recv(ws, within_s=20)
            if isinstance(frame, EventFrame):
                fast_frames.append(frame)

    async with running_api(backend, send_queue_frames=50, slow_console_s=1.0) as api, \
            console(api) as fast, console(api) as slow:
        await handshake(fast)
        await handshake(slow)
        fast_reader = asyncio.create_task(read_fast(fast))
        with capture_logs() as logs:
            # Every event is published while the slow console reads nothing at all:
            # were publishing tied to it, this would stall and time out.
            async with asyncio.timeout(10):
                for i in range(total):
                    await backend.say_line("CA1", f"{i} {padding}")
                    if i % 100 == 0:
                        await asyncio.sleep(0)
            await logged(logs, "console_api.console_too_slow")
            # The slow console now reads what reached it, then the close frame.
            slow_frames: list[EventFrame] = []
            async with asyncio.timeout(10):
                while True:
                    msg = await slow.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    frame = SERVER_FRAME.validate_json(msg.data)
                    assert isinstance(frame, EventFrame)
                    slow_frames.append(frame)
            await fast_reader
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == CLOSE_TOO_SLOW
        assert isinstance(msg.extra, str) and "reconnect with after=" in msg.extra
        assert len(slow_frames) < total
        # It resumes from the last event it got and misses nothing.
        async with console(api, after=slow_frames[-1].id) as resumed:
            assert isinstance(await recv(resumed), Hello)
            while len(slow_frames) < total:
                slow_frames.append(await recv(resumed, within_s=10))
    expected = [f"{i} {padding}" for i in range(total)]
    assert line_texts(fast_frames) == expected
    assert line_texts(slow_frames) == expected


async def test_stop_closes_consoles_going_away() -> None:
    backend = CallTable(MemoryEventBus())
    api = SupervisorApi(make_config(), backend, tokens=ConsoleTokens(full=FULL))
    await api.start()
    try:
        async with console(api) as ws:
            await handshake(ws)
            assert api.console_count == 1
            stopping = asyncio.create_task(api.stop())
            msg = await ws.receive(timeout=5)
            await stopping
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
    finally:
        await api.stop()
    assert api.console_count == 0


async def test_a_failing_snapshot_closes_that_console_only() -> None:
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1")
    backend.snapshot_error = RuntimeError("boom")
    async with running_api(backend) as api:
        with capture_logs() as logs:
            async with console(api) as ws:
                assert isinstance(await recv(ws), Hello)
                msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1011
        assert any(e["event"] == "console_api.events_failed" for e in logs)
        backend.snapshot_error = None
        async with console(api) as ws:
            _, snapshot = await handshake(ws)
            assert [c.call_sid for c in snapshot.calls] == ["CA1"]


async def test_binds_to_localhost_by_default() -> None:
    assert ConsoleApiConfig().host == "127.0.0.1"
    backend = CallTable(MemoryEventBus())
    async with running_api(backend, make_config()) as api:
        assert api.host == "127.0.0.1" and api.port > 0


async def test_no_readonly_token_means_no_readonly_access() -> None:
    backend = CallTable(MemoryEventBus())
    api = SupervisorApi(make_config(), backend, tokens=ConsoleTokens(full=FULL))
    await api.start()
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"http://127.0.0.1:{api.port}/console/ws",
                                         headers={"Authorization": f"Bearer {READONLY}"})
        assert refused.value.status == 401
    finally:
        await api.stop()


# --- tokens ---------------------------------------------------------------------------


def token_config(data_dir: Path, **console_api: Any) -> Config:
    return Config.model_validate({"engine": {"data_dir": str(data_dir)},
                                  "console_api": console_api})


def test_generated_token_is_private_persisted_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with capture_logs() as logs:
        first = load_or_create_tokens(token_config(data_dir))
        second = load_or_create_tokens(token_config(data_dir))
    path = data_dir / "console_token"
    assert first.source == "generated" and second.source == "file"
    assert first.full == second.full == path.read_text().strip()
    assert len(first.full) >= 40 and first.readonly is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    generated = [e for e in logs if e["event"] == "console_api.token_generated"]
    assert len(generated) == 1 and generated[0]["read_with"] == f"cat {path}"
    assert first.full not in repr(logs) and first.full not in repr(first)
    assert not [p for p in data_dir.iterdir() if p.name != "console_token"]  # no temp left


def test_configured_tokens_win_and_nothing_is_written(tmp_path: Path) -> None:
    tokens = load_or_create_tokens(token_config(tmp_path, token=FULL, readonly_token=READONLY))
    assert (tokens.full, tokens.readonly, tokens.source) == (FULL, READONLY, "config")
    assert not (tmp_path / "console_token").exists()


def test_unusable_tokens_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="must differ"):
        load_or_create_tokens(token_config(tmp_path, token=FULL, readonly_token=FULL))
    with pytest.raises(TokenError, match="printable ASCII"):
        load_or_create_tokens(token_config(tmp_path, token="has a space in it"))
    with capture_logs() as logs:
        load_or_create_tokens(token_config(tmp_path, token="short"))
    assert [e["event"] for e in logs] == ["console_api.weak_token"]


def test_a_loose_token_file_is_tightened_and_an_empty_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "console_token"
    path.write_text("stored-token-value-" + "s" * 20 + "\n")
    os.chmod(path, 0o644)
    with capture_logs() as logs:
        tokens = load_or_create_tokens(token_config(tmp_path))
    assert tokens.full == "stored-token-value-" + "s" * 20
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "console_api.token_file_permissions_fixed" in [e["event"] for e in logs]
    path.write_text("")
    replaced = load_or_create_tokens(token_config(tmp_path))
    assert replaced.source == "generated" and replaced.full == path.read_text().strip()
