"""The fleet's record in PostgreSQL (issue 14, point 3): a server unreachable at start or
lost mid-run sends writes to the journal, replayed in order and once when it is back
(/healthz says so meanwhile); engines starting together migrate once; `switchboard
report` covers every engine's calls.

The server is the real one; "unreachable" is a TCP relay in front of it that the test
closes (connections cut, the port refusing) and opens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from engine.money.prices import CostLine
from engine.providers.base import Usage
from engine.record.health import history_section
from engine.record.history import CallHistory
from engine.record.postgres_schema import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION
from engine.record.report import build_fleet_report
from engine.session.records import TurnRecord, TurnTimings

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0


class Relay:
    """A TCP relay to the PostgreSQL server that can be cut (every connection closed, the
    port refusing new ones) and restored on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
async def relay(postgres_dsn: str) -> AsyncIterator[tuple[Relay, str]]:
    """A relay in front of the server, and the test's DSN through it."""
    parts = urlsplit(postgres_dsn)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    await relay.start()
    netloc = f"{parts.username}@127.0.0.1:{relay.port}" if parts.username else \
        f"127.0.0.1:{relay.port}"
    yield relay, urlunsplit(parts._replace(netloc=netloc))
    await relay.cut()


async def rows(dsn: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def turn(idx: int) -> TurnRecord:
    return TurnRecord(idx=idx, caller_text=f"question {idx}", agent_text="answer",
                      heard_text="answer", caller_audio_s=1.0, agent_audio_s=2.0,
                      timings=TurnTimings(stt=0.2, voice_to_voice=0.8))


async def booking(history: CallHistory, sid: str, usd: str, at: float) -> bool:
    line = CostLine("agent", "openai", "gpt-4o-mini", Decimal(1), "request", Decimal(usd),
                    Decimal(usd))
    return await history.usage_recorded(sid, Usage("openai", "llm", "gpt-4o-mini",
                                                   input_tokens=10, output_tokens=5),
                                        [line], at=at)


async def test_unreachable_at_start_journals_then_replays_once(
        relay: tuple[Relay, str], postgres_dsn: str, tmp_path: Path) -> None:
    proxy, dsn = relay
    await proxy.cut()  # the server cannot be reached when the engine starts
    history = CallHistory.postgres(dsn, tmp_path, engine_id="e1")
    await history.open()  # starts anyway
    try:
        assert await history.call_started("CA1", "+15550100001", "+15550100000",
                                          started_at=T0)
        assert await history.turn_completed("CA1", turn(0), at=T0 + 5)
        assert await booking(history, "CA1", "0.25", T0 + 6)
        stats = history.stats()
        assert (stats.status, stats.backlog, stats.in_memory, stats.lost) == (
            "spooling", 3, 0, 0)
        assert len(history.journal.read_bytes().splitlines()) == 3
        degraded: list[str] = []
        section = history_section(stats, degraded)
        assert (section["status"], section["backend"]) == ("spooling", "postgres")
        assert degraded[0].startswith("history spooling: 3 writes")
        # The journal's spend still seeds the budget while the server is away.
        day = datetime.fromtimestamp(T0, UTC).date()
        assert await history.daily_costs(day) == {day: 0.25}

        await proxy.start()  # back: the backlog lands by itself, in order, once
        await wait_until(lambda: history.stats().status == "ok", 15)
        assert await history.call_ended("CA1", "hangup", 0.25, ended_at=T0 + 60)
        call = await history.get_call("CA1")
    finally:
        await history.aclose()
    assert call is not None and call.end_reason == "hangup" and call.cost_usd == 0.25
    assert await rows(postgres_dsn, "SELECT idx FROM turns") == [(0,)]
    assert await rows(postgres_dsn, "SELECT count(*) FROM applied_writes") == [(3,)]
    assert await rows(postgres_dsn, "SELECT amount::text FROM cost_lines") == [("0.25",)]
    assert history.journal.stat().st_size == 0


async def test_lost_mid_run_journals_keeps_order_and_replays_once(
        relay: tuple[Relay, str], postgres_dsn: str, tmp_path: Path) -> None:
    proxy, dsn = relay
    history = CallHistory.postgres(dsn, tmp_path, engine_id="e1")
    await history.open()
    try:
        assert await history.call_started("CA1", started_at=T0)
        assert await history.turn_completed("CA1", turn(0), at=T0 + 1)
        assert history.stats().status == "ok"
        await proxy.cut()  # connections dropped mid-run, the port refusing
        outcomes = await asyncio.gather(*(history.turn_completed("CA1", turn(i), at=T0 + i)
                                          for i in range(1, 6)))
        assert all(outcomes)  # acknowledged: in the journal
        stats = history.stats()
        assert stats.status == "spooling" and stats.backlog == 5 and stats.failed >= 1
        assert stats.last_error
        assert await history.turn_completed("CA1", turn(6), at=T0 + 6)  # behind the backlog
        with pytest.raises(Exception, match="cannot read the history"):
            await history.get_call("CA1")  # reads need the server

        await proxy.start()
        await wait_until(lambda: history.stats().status == "ok", 15)
        assert history.stats().lost == 0
    finally:
        await history.aclose()
    assert await rows(postgres_dsn, "SELECT idx FROM turns ORDER BY idx") == [
        (i,) for i in range(7)]
    assert await rows(postgres_dsn, "SELECT count(*) FROM applied_writes") == [(6,)]


async def test_a_journal_left_behind_replays_at_the_next_start_and_never_twice(
        relay: tuple[Relay, str], postgres_dsn: str, tmp_path: Path) -> None:
    proxy, dsn = relay
    await proxy.cut()
    first = CallHistory.postgres(dsn, tmp_path, engine_id="e1")
    await first.open()
    assert await first.call_started("CA1", started_at=T0)
    assert await booking(first, "CA1", "0.10", T0 + 1)
    await first.aclose()  # still unreachable: the journal stays behind
    saved = first.journal.read_bytes()
    assert len(saved.splitlines()) == 2

    await proxy.start()
    second = CallHistory.postgres(dsn, tmp_path, engine_id="e1")
    await second.open()  # replayed at open, before anything else
    assert second.stats().status == "ok" and first.journal.stat().st_size == 0
    assert await second.bill("CA1") != []
    await second.aclose()
    # Killed after the replay's commit, before the journal was emptied: nothing twice.
    first.journal.write_bytes(saved)
    third = CallHistory.postgres(dsn, tmp_path, engine_id="e1")
    await third.open()
    await third.aclose()
    assert await rows(postgres_dsn, "SELECT count(*) FROM usage") == [(1,)]
    assert await rows(postgres_dsn, "SELECT count(*) FROM calls") == [(1,)]
    assert first.journal.stat().st_size == 0


async def test_engines_starting_together_migrate_once(postgres_dsn: str,
                                                      tmp_path: Path) -> None:
    engines = [CallHistory.postgres(postgres_dsn, tmp_path / f"e{i}", engine_id=f"e{i}")
               for i in range(4)]
    await asyncio.gather(*(engine.open() for engine in engines))
    try:
        assert all(await asyncio.gather(*(engine.call_started(f"CA{i}", started_at=T0)
                                          for i, engine in enumerate(engines))))
    finally:
        await asyncio.gather(*(engine.aclose() for engine in engines))
    assert await rows(postgres_dsn, "SELECT version FROM schema_version") == [
        (v,) for v in range(1, POSTGRES_SCHEMA_VERSION + 1)]  # each step once


async def write_fleet(dsn: str, tmp_path: Path, t0: float) -> None:
    """Two engines, a call each (and a second call on the first), into one database."""
    for n, engine_id in enumerate(("edge-1", "edge-2")):
        history = CallHistory.postgres(dsn, tmp_path / engine_id, engine_id=engine_id)
        await history.open()
        for k in range(2 - n):
            sid, t = f"CA{engine_id}-{k}", t0 + 1000 * n + 100 * k
            await history.call_started(sid, started_at=t)
            await history.turn_completed(sid, turn(0), at=t + 5)
            await booking(history, sid, "0.10", t + 6)
            await history.call_ended(sid, "hangup", 0.1, ended_at=t + 60)
        await history.aclose()


async def test_the_report_covers_every_engine_of_the_fleet(postgres_dsn: str,
                                                           tmp_path: Path) -> None:
    t0 = time.time() - 7200  # the command reports up to now
    await write_fleet(postgres_dsn, tmp_path, t0)
    now = datetime.fromtimestamp(t0 + 3600, UTC)
    report = await build_fleet_report(postgres_dsn, timedelta(hours=2), now=now)
    assert report.calls == 3 and report.turns == 3
    assert report.total_cost_usd == pytest.approx(0.3)
    assert {line.call_sid for line in report.lines} == {
        "CAedge-1-0", "CAedge-1-1", "CAedge-2-0"}

    # The command, as the README gives it: --dsn names the fleet's database.
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "switchboard", "report", "--dsn", postgres_dsn,
                         "--since", "1d", "--format", "json"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    figures = json.loads(done.stdout)
    assert figures["calls"] == 3 and figures["total_cost_usd"] == pytest.approx(0.3)


async def test_report_of_an_unreachable_or_empty_database_is_a_clear_error(
        relay: tuple[Relay, str], postgres_dsn: str) -> None:
    proxy, dsn = relay
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "switchboard", "report", "--dsn",
                         postgres_dsn], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=60)
    assert done.returncode == 1
    assert b"no history in this database" in done.stderr
    await proxy.cut()
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "switchboard", "report", "--dsn", dsn],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        timeout=60)
    assert done.returncode == 1
    assert b"cannot connect to the PostgreSQL history" in done.stderr


async def test_an_engine_configured_for_postgres_records_there_and_recovers_its_calls(
        postgres_dsn: str, tmp_path: Path) -> None:
    """history.backend = "postgres" in the config: the engine's record is the shared
    database (its journal in the data dir), /healthz names the backend, and a restarted
    engine closes the calls it left open, and only its own."""
    import aiohttp

    from engine.app import Engine
    from engine.config import Config
    from engine.record.database import END_REASON_UNEXPECTED
    from tests.harness import make_local_engine, running_engine

    async def with_history(config: Config) -> Engine:
        return await make_local_engine(config, history=True)

    sections = {"history": {"backend": "postgres", "dsn": postgres_dsn}}
    other = CallHistory.postgres(postgres_dsn, tmp_path / "other", engine_id="edge-2")
    await other.open()
    await other.call_started("CAother", started_at=T0)  # another engine's live call
    await other.aclose()
    async with running_engine(tmp_path, make_engine=with_history,
                              engine={"engine_id": "edge-1"}, **sections) as run:
        history = run.engine.hub.history
        assert history is not None and history.backend == "postgres"
        assert history.journal.parent == run.engine.config.data_path()
        async with aiohttp.ClientSession() as http, http.get(run.url + "/healthz") as resp:
            health = await resp.json()
        assert (health["history"]["status"], health["history"]["backend"]) == (
            "ok", "postgres")
        await history.call_started("CAmine", "+15550100001", "+15550100000")
    async with running_engine(tmp_path, make_engine=with_history,
                              engine={"engine_id": "edge-1"}, **sections) as run:
        assert run.engine.hub.history is not None
        mine = await run.engine.hub.history.get_call("CAmine")
        theirs = await run.engine.hub.history.get_call("CAother")
    assert mine is not None and mine.end_reason == END_REASON_UNEXPECTED
    assert theirs is not None and theirs.ended_at is None
