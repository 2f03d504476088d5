"""Named supervisor tokens: `switchboard tokens add|list|revoke` run as a user would, the
supervisor API authenticating by them (real sockets), and a real engine whose audit trail
(history, CommandAudit events, log lines) names the token's holder, refusals included."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from engine.bus.events import CommandAudit
from engine.bus.memory import MemoryEventBus
from engine.config import Config, load_config
from engine.sim.scenario import Scenario
from engine.supervision.api_schema import SERVER_FRAME, EventFrame, Hello, Reply, Snapshot
from engine.supervision.auth import SupervisorTokens
from engine.supervision.backend import Actor
from engine.supervision.connection import READONLY_REFUSAL, REVOKED_REFUSAL
from engine.supervision.server import SupervisorApi
from engine.supervision.token_store import STORE_FILE_NAME, NamedTokenStore
from engine.supervision.tokens import ConsoleTokens, TokenError, token_digest
from tests.harness import base_sections, make_local_engine, running_engine
from tests.test_supervisor_api import CallTable

CONSOLE_TOKEN = "console-token-" + "c" * 32
CONSOLE_READONLY = "console-readonly-token-" + "w" * 32


# --- the CLI ----------------------------------------------------------------------------


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["SWITCHBOARD_DATA_DIR"] = str(data_dir)
    return env


def tokens_cli(data_dir: Path, *args: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`switchboard tokens ARGS` in a directory without a config.toml."""
    return subprocess.run([sys.executable, "-m", "switchboard", "tokens", *args],
                          capture_output=True, text=True, timeout=60, cwd=data_dir.parent,
                          env=env or cli_env(data_dir))


def add_token(data_dir: Path, name: str, *flags: str) -> str:
    out = tokens_cli(data_dir, "add", name, *flags)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_add_list_revoke_through_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dana = add_token(data, "dana")
    watcher = add_token(data, "night.watch", "--readonly")
    assert dana.startswith("sbt_") and len(dana) >= 40 and dana != watcher
    store = data / STORE_FILE_NAME
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    # Only digests are kept: the file opens nothing by itself.
    kept = store.read_text()
    assert dana not in kept and watcher not in kept and token_digest(dana).hex() in kept

    for name, why in (("DANA", "exists already"), ("bad name", "invalid token name"),
                      ("x" * 33, "invalid token name"), ("dana<b>", "invalid token name"),
                      ("console", "reserved"), ("Console-Readonly", "reserved")):
        refused = tokens_cli(data, "add", name)
        assert refused.returncode == 1 and why in refused.stderr, (name, refused.stderr)
        assert not refused.stdout

    listed = tokens_cli(data, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows.keys() == {"dana", "night.watch"}  # no console token before a start
    assert rows["dana"][1] == "full" and rows["night.watch"][1] == "readonly"
    assert rows["dana"][-1] == "named"
    assert dana not in listed.stdout + listed.stderr

    revoked = tokens_cli(data, "revoke", "dana")
    assert revoked.returncode == 0 and "revoked dana" in revoked.stdout
    assert "dana" not in tokens_cli(data, "list").stdout
    again = tokens_cli(data, "revoke", "dana")
    assert again.returncode == 1 and "no token named 'dana'" in again.stderr
    # The console tokens are listed with where they come from, and not revoked here.
    env = cli_env(data) | {"SWITCHBOARD_CONSOLE_TOKEN": CONSOLE_TOKEN}
    listed = tokens_cli(data, "list", env=env)
    assert "console " in listed.stdout and "SWITCHBOARD_CONSOLE_TOKEN" in listed.stdout
    assert CONSOLE_TOKEN not in listed.stdout
    console = tokens_cli(data, "revoke", "console", env=env)
    assert console.returncode == 1 and "console token, not a named one" in console.stderr


def test_concurrent_adds_all_land(tmp_path: Path) -> None:
    data = tmp_path / "data"
    names = [f"sup{i}" for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-m", "switchboard", "tokens", "add", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env=cli_env(data)) for name in names]
    tokens = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    entries = NamedTokenStore(data / STORE_FILE_NAME).entries()
    assert sorted(e.name for e in entries) == names
    assert {e.digest for e in entries} == {token_digest(t) for t in tokens}


# --- the API authenticating by name -------------------------------------------------------


@asynccontextmanager
async def api_with_store(backend: CallTable, data: Path,
                         **kwargs: Any) -> AsyncIterator[SupervisorApi]:
    api = SupervisorApi(Config.model_validate({"console_api": {"port": 0}}), backend,
                        tokens=ConsoleTokens(full=CONSOLE_TOKEN, readonly=CONSOLE_READONLY),
                        token_store=NamedTokenStore(data / STORE_FILE_NAME), **kwargs)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


async def connect(http: aiohttp.ClientSession, api: SupervisorApi, token: str,
                  **headers: str) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(f"http://127.0.0.1:{api.port}/console/ws",
                                 headers={"Authorization": f"Bearer {token}", **headers})


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: type, within_s: float = 5) -> Any:
    async with asyncio.timeout(within_s):
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                return msg
            frame = SERVER_FRAME.validate_json(msg.data)
            if isinstance(frame, kind):
                return frame


async def refused_status(http: aiohttp.ClientSession, api: SupervisorApi, token: str) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(http, api, token)
    return refused.value.status


async def test_a_named_token_acts_under_its_name_and_a_claim_stays_a_claim(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = NamedTokenStore(data / STORE_FILE_NAME)
    dana, watcher = store.add("dana", "full"), store.add("watcher", "readonly")
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1", state="ai")
    async with api_with_store(backend, data) as api, aiohttp.ClientSession() as http:
        ws = await connect(http, api, dana, **{"X-Switchboard-Actor": "the-boss"})
        assert (await next_of(ws, Hello)).readonly is False
        await ws.send_json({"type": "command", "id": "1", "command": "take_over",
                            "call_sid": "CA1"})
        assert (await next_of(ws, Reply)).ok
        watching = await connect(http, api, watcher)
        assert (await next_of(watching, Hello)).readonly is True
        await watching.send_json({"type": "command", "id": "2", "command": "hang_up",
                                  "call_sid": "CA1"})
        reply = await next_of(watching, Reply)
        assert (reply.ok, reply.error) == (False, READONLY_REFUSAL)
        # A new token works at once, without a restart.
        late = store.add("late", "full")
        late_ws = await connect(http, api, late)
        assert isinstance(await next_of(late_ws, Hello), Hello)
        for socket in (ws, watching, late_ws):
            await socket.close()
    assert backend.executed[0][1] == Actor("dana", "full", claimed="the-boss")
    assert [(c.id, a.name, e) for c, a, e in backend.refused] == [
        ("2", "watcher", READONLY_REFUSAL)]
    assert backend.calls["CA1"].state == "human_takeover"


async def test_a_revoked_token_is_refused_at_its_next_command_and_for_new_connections(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    eve = NamedTokenStore(data / STORE_FILE_NAME).add("eve", "full")
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1", state="ai")
    # No periodic check during the test: the command itself must find the revocation.
    async with api_with_store(backend, data, token_check_s=3600) as api, \
            aiohttp.ClientSession() as http:
        ws = await connect(http, api, eve)
        await next_of(ws, Snapshot)
        revoked = await asyncio.to_thread(tokens_cli, data, "revoke", "eve")
        assert revoked.returncode == 0, revoked.stderr
        await ws.send_json({"type": "command", "id": "1", "command": "hang_up",
                            "call_sid": "CA1"})
        answer = await next_of(ws, Reply)
        if isinstance(answer, Reply):  # the reply, then the close
            assert (answer.ok, answer.error) == (False, REVOKED_REFUSAL)
            answer = await ws.receive(timeout=5)
        assert answer.type == aiohttp.WSMsgType.CLOSE and answer.data == 1008
        assert await refused_status(http, api, eve) == 401
        # The console tokens are untouched by it.
        console = await connect(http, api, CONSOLE_TOKEN)
        assert isinstance(await next_of(console, Hello), Hello)
        await console.close()
    assert backend.executed == []
    assert [(a.name, e) for _, a, e in backend.refused] == [("eve", REVOKED_REFUSAL)]
    assert backend.calls["CA1"].state == "ai"


async def test_a_revoked_watcher_is_closed_without_sending_anything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = NamedTokenStore(data / STORE_FILE_NAME)
    watcher = store.add("watcher", "readonly")
    backend = CallTable(MemoryEventBus())
    async with api_with_store(backend, data, token_check_s=0.1) as api, \
            aiohttp.ClientSession() as http:
        ws = await connect(http, api, watcher)
        await next_of(ws, Snapshot)
        with capture_logs() as logs:
            assert store.revoke("watcher") is not None
            closed = await ws.receive(timeout=5)
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1008
        assert closed.extra == REVOKED_REFUSAL
    revoked = [e for e in logs if e["event"] == "console_api.tokens_revoked"]
    assert revoked and revoked[0]["names"] == ["watcher"]


async def test_a_damaged_token_file_opens_nothing_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = NamedTokenStore(data / STORE_FILE_NAME)
    dana = store.add("dana", "full")
    backend = CallTable(MemoryEventBus())
    async with api_with_store(backend, data) as api, aiohttp.ClientSession() as http:
        store.path.write_text(store.path.read_text().replace('"full"', '"superuser"'))
        with capture_logs() as logs:
            assert await refused_status(http, api, dana) == 401
        assert any(e["event"] == "console_api.named_tokens_unreadable" for e in logs)
        console = await connect(http, api, CONSOLE_TOKEN)  # still works meanwhile
        assert isinstance(await next_of(console, Hello), Hello)
        await console.close()
    with pytest.raises(TokenError, match="damaged"):  # and an engine will not start on it
        SupervisorTokens(ConsoleTokens(full=CONSOLE_TOKEN), store)


async def test_the_old_single_token_settings_keep_working(tmp_path: Path) -> None:
    backend = CallTable(MemoryEventBus())
    backend.add_call("CA1", state="ai")
    env = {"SWITCHBOARD_CONSOLE_TOKEN": CONSOLE_TOKEN,
           "SWITCHBOARD_CONSOLE_READONLY_TOKEN": CONSOLE_READONLY,
           "SWITCHBOARD_DATA_DIR": str(tmp_path / "env")}
    config = load_config(None, env=env)
    config.console_api.port = 0
    generated = Config.model_validate({"engine": {"data_dir": str(tmp_path / "gen")},
                                       "console_api": {"port": 0}})
    async with aiohttp.ClientSession() as http:
        api = SupervisorApi(config, backend)  # tokens from the config, as the engine does
        await api.start()
        try:
            for token, readonly, command_id in ((CONSOLE_TOKEN, False, "1"),
                                                (CONSOLE_READONLY, True, "2")):
                ws = await connect(http, api, token)
                assert (await next_of(ws, Hello)).readonly is readonly
                await ws.send_json({"type": "command", "id": command_id,
                                    "command": "take_over", "call_sid": "CA1"})
                assert (await next_of(ws, Reply)).ok is not readonly
                await ws.close()
        finally:
            await api.stop()
        api = SupervisorApi(generated, backend)  # no setting: the generated token file
        await api.start()
        try:
            ws = await connect(http, api, (tmp_path / "gen" / "console_token").read_text()
                               .strip())
            await ws.send_json({"type": "command", "id": "3", "command": "hand_back",
                                "call_sid": "CA1"})
            assert (await next_of(ws, Reply)).ok
            await ws.close()
        finally:
            await api.stop()
    assert [(c.id, a) for c, a in backend.executed] == [
        ("1", Actor("console", "full")), ("3", Actor("console", "full"))]
    assert [(c.id, a.name, e) for c, a, e in backend.refused] == [
        ("2", "console-readonly", READONLY_REFUSAL)]


# --- a real engine: the audit trail names who acted ----------------------------------


class Console:
    """A supervisor client on the engine's API that keeps every frame it receives."""

    def __init__(self, http: aiohttp.ClientSession, port: int, token: str,
                 claimed: str | None = None) -> None:
        self.http, self.port, self.token, self.claimed = http, port, token, claimed
        self.frames: list[Any] = []
        self.closed: aiohttp.WSMessage | None = None
        self._n = 0

    async def __aenter__(self) -> Console:
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.claimed:
            headers["X-Switchboard-Actor"] = self.claimed
        self.ws = await self.http.ws_connect(f"http://127.0.0.1:{self.port}/console/ws",
                                             headers=headers)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                self.closed = msg
                return
            self.frames.append(SERVER_FRAME.validate_json(msg.data))

    async def send(self, frame: dict[str, Any]) -> Reply:
        self._n += 1
        command_id = frame.setdefault("id", f"c{self._n}")
        await self.ws.send_str(json.dumps({"type": "command", **frame}))
        async with asyncio.timeout(20):
            while True:
                for reply in (f for f in self.frames if isinstance(f, Reply)):
                    if reply.id == command_id:
                        return reply
                await asyncio.sleep(0.02)

    def audits(self) -> list[CommandAudit]:
        return [f.event for f in self.frames
                if isinstance(f, EventFrame) and isinstance(f.event, CommandAudit)]


async def eventually(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_a_real_engine_audits_every_command_under_the_token_name(
        tmp_path: Path) -> None:
    data = tmp_path / "data"  # the harness's data dir for this engine
    dana, watcher = add_token(data, "dana"), add_token(data, "watcher", "--readonly")
    sections = base_sections()
    sections["console_api"] = {"port": 0, "token": CONSOLE_TOKEN}

    async def supervised(config: Config):  # type: ignore[no-untyped-def]
        return await make_local_engine(config, history=True, supervisor_api=True)

    unknown = "CA" + "0" * 32
    with capture_logs() as logs:
        async with running_engine(tmp_path, make_engine=supervised, **sections) as run, \
                aiohttp.ClientSession() as http:
            port = run.engine.supervisor_api.port
            caller = run.caller()
            call = asyncio.create_task(caller.run(Scenario(name="hold", hangup_at_end=False,
                                                           steps=[])))
            await eventually(lambda: run.engine.registry.get(caller.call_sid) is not None)
            await caller.wait_agent_done(timeout=20)  # the greeting played: state ai
            sid = caller.call_sid
            async with Console(http, port, dana, claimed="mallory") as boss, \
                    Console(http, port, watcher) as watch, \
                    Console(http, port, CONSOLE_TOKEN) as shared:
                assert (await boss.send({"command": "take_over", "call_sid": sid})).ok
                refused = await watch.send({"command": "hang_up", "call_sid": sid})
                assert refused.error == READONLY_REFUSAL
                session = run.engine.registry.get(sid)
                assert session is not None and not session.ended
                assert (await boss.send({"command": "hand_back", "call_sid": sid})).ok
                nobody = await shared.send({"command": "hang_up", "call_sid": unknown})
                assert nobody.error == "unknown call"
                too_long = await shared.send({"command": "say", "call_sid": sid,
                                              "text": "x" * 1001})
                assert not too_long.ok and "invalid command" in (too_long.error or "")
                assert (await boss.send({"command": "hang_up", "call_sid": sid})).ok
                await asyncio.wait_for(call, 15)
                await eventually(lambda: len(boss.audits()) >= 6)
                audits = boss.audits()
                # Revoking a live console's token closes it within the check interval.
                revoked = await asyncio.to_thread(tokens_cli, data, "revoke", "watcher")
                assert revoked.returncode == 0, revoked.stderr
                await eventually(lambda: watch.closed is not None, timeout=5)
                assert watch.closed is not None and watch.closed.data == 1008
            await run.engine.hub.drain()
            history = run.engine.hub.history
            assert history is not None
            stored = await history.actions(sid)
            db = history.path
    # The audit events: every command once, named by the token, refusals with the reason.
    assert [(a.actor, a.command, a.call_sid == sid, a.ok, a.error) for a in audits] == [
        ("dana", "take_over", True, True, ""),
        ("watcher", "hang_up", True, False, READONLY_REFUSAL),
        ("dana", "hand_back", True, True, ""),
        ("console", "hang_up", False, False, "unknown call"),
        ("console", "say", True, False, too_long.error),
        ("dana", "hang_up", True, True, "")]
    assert audits[0].args == {"claimed_actor": "mallory"}
    # The history: the same, under the same names (the call's own rows).
    assert [(a.actor, a.action, a.ok, a.error) for a in stored] == [
        ("dana", "take_over", True, None), ("watcher", "hang_up", False, READONLY_REFUSAL),
        ("dana", "hand_back", True, None), ("console", "say", False, too_long.error),
        ("dana", "hang_up", True, None)]
    assert json.loads(stored[0].args) == {"claimed_actor": "mallory"}
    # The log lines name them too.
    lines = [(e["actor"], e["command"], e["ok"]) for e in logs if e["event"] == "ops.command"]
    assert lines == [(a.actor, a.command, a.ok) for a in audits]
    # A command for a call the engine never had: its refusal, and no phantom call.
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM calls WHERE call_sid = ?",
                            (unknown,)).fetchone() == (0,)
        rows = conn.execute("SELECT call_sid, actor, ok, error, args FROM actions "
                            "WHERE action = 'hang_up' AND actor = 'console'").fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(None, "console", 0, "unknown call")]
    assert json.loads(rows[0][4]) == {"call_sid": unknown}
