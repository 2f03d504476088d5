"""No silent loss (issue 10): history writes on a full disk, and events while Redis is down.

The data directory is on a real size-limited filesystem (a tmpfs mounted here, as root),
filled until SQLite refuses; the engine is the real one (a simulated caller, the OpenAI
stand-in for speech and agent); Redis is a real redis-server stopped and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from engine.app import Engine
from engine.bus import events as ev
from engine.bus.event_bus import BusPublishError
from engine.bus.memory import MemoryEventBus
from engine.bus.redis_streams import RedisEventBus
from engine.config import Config, MetricsConfig
from engine.money.prices import CostLine
from engine.providers.base import Usage
from engine.record.health import history_section
from engine.record.history import CallHistory
from engine.record.metrics import EngineMetrics
from engine.record.spool import RESERVE_BYTES
from engine.session.records import TurnRecord, TurnTimings
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.openai_api import OpenAIStandin
from engine.wiring import build_engine
from tests.harness import EventLog, RunningEngine, running_engine
from tests.redis_server import RedisServer

QUESTION = "What time do you open on Saturday?"
ANSWER = "We open at nine."
ENGINE_PORT = 18_765  # the configured port: the engine id, hence the journal, survives restarts
DISK_BYTES = 32 << 20


class Disk:
    """A tmpfs of DISK_BYTES: `fill` takes every free byte but `leave`, `free` gives all back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fillers = 0

    def fill(self, leave: int = 0) -> None:
        self._fillers += 1
        fd = os.open(self.path / f"filler-{self._fillers}", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (1 << 20, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * chunk)
            os.ftruncate(fd, max(os.fstat(fd).st_size - leave, 0))
        finally:
            os.close(fd)
        assert leave <= self.free_bytes() <= leave + 4096

    def free_bytes(self) -> int:
        info = os.statvfs(self.path)
        return info.f_bavail * info.f_frsize

    def free(self) -> None:
        for filler in self.path.glob("filler-*"):
            filler.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a size-limited filesystem")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700",
                           "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr}")
    try:
        yield Disk(mount)
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def settle_wal(database: Path) -> None:
    """Checkpoint and truncate the WAL: from here every commit needs new disk space."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def query(database: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return conn.execute(sql, args).fetchall()


async def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def get(run: RunningEngine, path: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(run.url + path) as response:
        assert response.status == 200
        return await response.text()


async def run_json(run: RunningEngine) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(run.url + "/healthz") as response:
        body: dict[str, Any] = await response.json()
        return body


def metric(exposition: str, name: str) -> float:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def journal_lines(journal: Path) -> int:
    return len(journal.read_bytes().splitlines()) if journal.exists() else 0


def turn(idx: int, caller_text: str = "question") -> TurnRecord:
    return TurnRecord(idx=idx, caller_text=caller_text, agent_text="answer",
                      heard_text="answer", caller_audio_s=1.0, agent_audio_s=1.0,
                      timings=TurnTimings(stt=0.2, voice_to_voice=0.8))


# --- the history on a full disk ----------------------------------------------------------


async def test_a_call_on_a_full_disk_is_journaled_counted_and_replayed_whole(
        disk: Disk, tmp_path: Path) -> None:
    openai = OpenAIStandin(api_key="sk-test")
    openai.transcript, openai.reply = QUESTION, ANSWER
    sections: dict[str, Any] = {
        "engine": {"data_dir": str(disk.path / "data"), "port": ENGINE_PORT,
                   "greeting": "Hello."},
        "providers": {"stt": ["openai"], "agent": ["openai"], "tts": ["openai"],
                      "openai": {"api_key": "sk-test", "base_url": await openai.start()}},
        "cache": {"backend": "off"}}

    async def engine(config: Config) -> Any:
        return await build_engine(config, supervisor_api=False)

    try:
        async with running_engine(tmp_path, make_engine=engine, **sections) as run:
            history = run.engine.hub.history
            assert history is not None
            events = EventLog(run)
            settle_wal(history.path)
            disk.fill()
            caller = run.caller()
            result = await asyncio.wait_for(caller.run(Scenario(
                name="ask", voice="en-us", steps=[Step(say=QUESTION)])), 60)
            assert result.error is None
            sid = caller.call_sid
            await wait_until(lambda: any(isinstance(e, ev.CallEnded) and e.call_sid == sid
                                         for e in events.events), 10)
            deps = run.engine.deps
            assert deps is not None
            for chain in deps.all_chains():
                await chain.settle_abandoned(10.0)
            await run.engine.hub.drain()
            await events.close()
            ended = next(e for e in events.events if isinstance(e, ev.CallEnded))
            assert ended.cost_usd > 0

            # Every write of the call acknowledged: in the journal, none in memory only.
            stats = history.stats()
            assert (stats.status, stats.in_memory, stats.lost) == ("spooling", 0, 0)
            assert stats.failed >= 1 and stats.spooled == stats.backlog >= 5
            assert journal_lines(history.journal) == stats.backlog
            assert await history.get_call(sid) is None  # nothing reached the database
            health = await run_json(run)
            assert health["status"] == "degraded"
            assert health["history"]["status"] == "spooling"
            assert any(d.startswith("history spooling") for d in health["degraded"])
            assert health["bus"]["reachable"] is True
            scraped = await get(run, "/metrics")
            assert metric(scraped, "switchboard_history_write_failures_total") >= 1
            assert metric(scraped, "switchboard_history_writes_spooled_total") == stats.spooled
            assert metric(scraped, "switchboard_history_journal_backlog") == stats.backlog
            assert metric(scraped, "switchboard_history_writes_lost_total") == 0
            journaled = stats.backlog
            database, journal = history.path, history.journal

        # The engine stopped with the disk still full: the journal stays. A restart on
        # the same disk (some room for SQLite's shared memory, none for the backlog)
        # reloads the day's spend from the journal: the budget knows what the call cost.
        assert journal_lines(journal) == journaled
        disk.free()  # refilled, but for the room SQLite needs to open (not to write)
        disk.fill(leave=40 << 10)
        async with running_engine(tmp_path, make_engine=engine, **sections) as again:
            history = again.engine.hub.history
            assert history is not None and history.journal == journal
            assert history.stats().status == "spooling"
            spent = again.engine.hub.budget.reading().daily.spent_usd
            assert float(spent) == pytest.approx(ended.cost_usd, abs=1e-9)
            today = datetime.now(UTC).date()
            assert (await history.daily_costs(today))[today] == pytest.approx(ended.cost_usd)

            disk.free()  # the disk has room again: the backlog lands, each write once
            await wait_until(lambda: history.stats().status == "ok", 15)
            health = await run_json(again)
            assert health["status"] == "ok" and health["history"]["status"] == "ok"
            scraped = await get(again, "/metrics")
            assert metric(scraped, "switchboard_history_journal_backlog") == 0
            assert metric(scraped, "switchboard_history_writes_lost_total") == 0
            call = await history.get_call(sid)
            bill = await history.bill(sid)
            replayed = history.stats().spooled  # this run's own writes (its recovery)
    finally:
        await openai.stop()

    assert call is not None and call.ended_at is not None and call.end_reason
    assert call.from_number == "+15550100001"
    assert call.cost_usd == pytest.approx(ended.cost_usd)
    assert sum(line.amount for line in bill) == pytest.approx(ended.cost_usd)
    assert {line.item for line in bill} >= {"stt", "agent", "voice", "phone"}
    turns = query(database, "SELECT caller_text, agent_text FROM turns WHERE call_sid = ?", sid)
    assert turns == [(QUESTION, ANSWER)]
    assert query(database, "SELECT count(*) FROM usage WHERE call_sid = ?", sid)[0][0] == len(
        {line.usage_id for line in bill})
    # Each journaled write applied once, and the journal emptied.
    assert query(database, "SELECT count(*) FROM applied_writes")[0][0] == journaled + replayed
    assert journal.stat().st_size == 0
    assert not journal.with_suffix(".rejected").exists()


async def booking(history: CallHistory, sid: str, usd: str) -> bool:
    line = CostLine("agent", "openai", "gpt-4o-mini", Decimal(1), "request", Decimal(usd),
                    Decimal(usd))
    return await history.usage_recorded(sid, Usage("openai", "llm", "gpt-4o-mini",
                                                   input_tokens=10, output_tokens=5), [line])


async def test_a_journal_left_behind_replays_at_open_once_and_a_torn_line_is_set_aside(
        disk: Disk) -> None:
    database = disk.path / "history.sqlite3"
    first = CallHistory(database, engine_id="e1")
    await first.open()
    settle_wal(database)
    disk.fill()
    assert await first.call_started("CA1", "+15550100001", "+15550100000")
    assert await first.turn_completed("CA1", turn(0))
    assert await booking(first, "CA1", "0.25")
    today = datetime.now(UTC).date()
    assert await first.daily_costs(today) == {today: 0.25}  # journaled spend counts
    await first.aclose()  # the disk is still full: the journal stays behind
    journal = first.journal
    assert journal_lines(journal) == 3
    with journal.open("ab") as torn:  # a crash in the middle of an append
        torn.write(b'{"id":"cut","op":"turn_comp')

    # Closing gave the WAL's room back; SQLite's shared memory takes 32 KiB of what is
    # left, the rejected file 4 KiB, and the 8 KiB over are too little for the backlog.
    disk.free()
    disk.fill(leave=44 << 10)
    second = CallHistory(database, engine_id="e1")
    await second.open()  # the database still refuses: the journal is the backlog
    assert (second.stats().status, second.stats().backlog) == ("spooling", 3)
    assert journal.with_suffix(".rejected").read_bytes() == b'{"id":"cut","op":"turn_comp\n'
    assert journal.with_suffix(".rejected").stat().st_mode & 0o777 == 0o600
    assert await second.call_ended("CA1", "caller hung up", 0.25)  # after the cut line
    await second.aclose()
    saved = journal.read_bytes()  # the cut line was ended: the next write has its own
    assert saved.splitlines()[3:] == [b'{"id":"cut","op":"turn_comp', saved.splitlines()[4]]

    disk.free()
    third = CallHistory(database, engine_id="e1")
    await third.open()  # replayed at open, before anything else
    assert third.stats().status == "ok" and journal.stat().st_size == 0
    call = await third.get_call("CA1")
    assert call is not None and call.end_reason == "caller hung up"
    assert await third.daily_costs(today) == {today: 0.25}
    await third.aclose()

    # Killed after the replay's commit, before the journal was emptied: the next start
    # finds every write already applied and applies none again.
    journal.write_bytes(saved)
    fourth = CallHistory(database, engine_id="e1")
    await fourth.open()
    assert fourth.stats().backlog == 0 and journal.stat().st_size == 0
    assert await fourth.daily_costs(today) == {today: 0.25}
    await fourth.aclose()
    assert query(database, "SELECT count(*) FROM turns")[0][0] == 1
    assert query(database, "SELECT count(*) FROM usage")[0][0] == 1
    assert query(database, "SELECT count(*) FROM applied_writes")[0][0] == 4
    assert third.stats().lost == fourth.stats().lost == 0
    rejected = journal.with_suffix(".rejected").read_bytes().splitlines()
    assert set(rejected) == {b'{"id":"cut","op":"turn_comp'}  # set aside at each start

    # An engine under another id (a new host name, another port) does not replay e1's
    # journal, but says at start that it waits there.
    journal.write_bytes(saved)
    other = CallHistory(database, engine_id="e2")
    with capture_logs() as logs:
        await other.open()
    await other.aclose()
    assert [e["journals"] for e in logs if e["event"] == "history.other_journals"] == [
        [str(journal)]]


async def test_beyond_the_journals_room_writes_are_held_in_memory_then_replayed(
        disk: Disk) -> None:
    """No room for the journal either (its reserve used up): writes are held in memory,
    not acknowledged, at most `memory_max`; beyond, dropped and counted; all the held
    ones land once the disk has room."""
    database = disk.path / "history.sqlite3"
    history = CallHistory(database, engine_id="e1", memory_max=3)
    await history.open()
    settle_wal(database)
    disk.fill()
    big = "x" * (RESERVE_BYTES // 8)  # eight of these fill the journal's reserve
    outcomes = [await history.turn_completed("CA1", turn(i, big)) for i in range(16)]
    stats = history.stats()
    journaled = outcomes.index(False)
    assert 4 <= journaled <= 8 and all(outcomes[:journaled]) and not any(outcomes[journaled:])
    assert (stats.status, stats.in_memory, stats.lost) == ("failing", 3, 16 - journaled - 3)
    assert journal_lines(history.journal) == journaled
    degraded: list[str] = []
    section = history_section(stats, degraded)
    assert section["status"] == "failing" and degraded[0].startswith("history failing")
    metrics = EngineMetrics(MetricsConfig())
    metrics.watch_record(history.stats, MemoryEventBus().health)
    scraped = metrics.render()[0].decode()
    assert metric(scraped, "switchboard_history_writes_lost_total") == stats.lost
    assert metric(scraped, "switchboard_history_journal_backlog") == journaled + 3

    disk.free()
    await wait_until(lambda: history.stats().status == "ok", 15)
    stored = query(database, "SELECT idx FROM turns ORDER BY idx")
    assert [idx for (idx,) in stored] == list(range(journaled + 3))
    assert history.stats().lost == 16 - journaled - 3  # said so, never silently
    await history.aclose()
    assert history.journal.stat().st_size == 0


# --- the bus while Redis is down ---------------------------------------------------------


def line(i: int) -> ev.TranscriptLine:
    return ev.TranscriptLine(call_sid="CA1", speaker="caller", text=f"line {i}",
                             line_id=str(i))


async def read_until(subscription: Any, last: str, within_s: float = 20.0) -> list[Any]:
    """Events (gaps too) until the line `last`."""
    got: list[Any] = []
    async with asyncio.timeout(within_s):
        async for _, event in subscription:
            got.append(event)
            if isinstance(event, ev.TranscriptLine) and event.text == last:
                return got
    return got


@pytest.mark.redis
async def test_events_published_while_redis_is_down_wait_in_order_and_a_drop_is_a_gap(
        redis_server: RedisServer) -> None:
    bus = RedisEventBus(redis_server.url, key_prefix=f"trust-{os.getpid()}", block_ms=300,
                        backoff_base_s=0.05, backoff_max_s=0.3, buffer_max=10)
    stamper = ev.EventStamper("engine-a")
    try:
        subscription = bus.subscribe(after=await bus.latest_id())
        await bus.publish(stamper.stamp(line(0)))
        assert [e.text for e in await read_until(subscription, "line 0")] == ["line 0"]
        reading = asyncio.create_task(read_until(subscription, "line 16"))

        redis_server.stop()
        waiting = [asyncio.create_task(bus.publish(stamper.stamp(line(i))))
                   for i in range(1, 11)]
        await wait_until(lambda: not bus.health().reachable and bus.health().buffered == 10, 5)
        for i in range(11, 14):  # the buffer is full: dropped at once, and counted
            with pytest.raises(BusPublishError, match="buffer full"):
                await bus.publish(stamper.stamp(line(i)))
        health = await bus.check()
        assert (health.reachable, health.buffered, health.dropped) == (False, 10, 3)
        assert not any(task.done() for task in waiting)  # waiting, not failed

        redis_server.start()
        await asyncio.wait_for(asyncio.gather(*waiting), 10)  # flushed when it returned
        await bus.publish(stamper.stamp(line(16)))
        got = await reading
        health = await bus.check()
    finally:
        await bus.aclose()
    assert (health.reachable, health.buffered, health.dropped) == (True, 0, 3)
    lines = [e.text for e in got if isinstance(e, ev.TranscriptLine)]
    assert lines == [f"line {i}" for i in range(1, 11)] + ["line 16"]
    gaps = [(n, e) for n, e in enumerate(got) if isinstance(e, ev.BusGap)]
    # The restarted server (no persistence) lost its stream: the reader may say so
    # first; then the three dropped events are one gap, counted, before the next event.
    *reset, (at, dropped) = gaps
    assert all(e.reason in ("stream_reset", "trimmed") and n == 0 for n, e in reset)
    assert (dropped.reason, dropped.count, dropped.engine_id) == ("seq_jump", 3, "engine-a")
    assert got[at - 1].text == "line 10" and got[at + 1].text == "line 16"


@pytest.mark.redis
async def test_healthz_and_metrics_say_when_the_bus_cannot_reach_redis(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with running_engine(tmp_path, bus={"backend": "redis", "buffer_max": 5},
                              redis={"url": redis_server.url}) as run:
        health = await run_json(run)
        assert health["bus"]["backend"] == "redis" and health["bus"]["reachable"] is True
        assert not any(d.startswith("bus") for d in health["degraded"])

        redis_server.stop()
        health = await run_json(run)
        assert health["status"] == "degraded" and health["bus"]["reachable"] is False
        assert any(d.startswith("bus unreachable") for d in health["degraded"])
        hub = run.engine.hub
        for i in range(8):  # five wait for Redis, three are dropped
            hub.publish(ev.Alert(kind="latency_p95", severity="info", message=f"test {i}"))
        await wait_until(lambda: hub.bus.health().dropped == 3, 5)
        health = await run_json(run)
        assert (health["bus"]["buffered"], health["bus"]["dropped"]) == (5, 3)
        scraped = await get(run, "/metrics")
        assert metric(scraped, "switchboard_bus_events_buffered") == 5
        assert metric(scraped, "switchboard_bus_events_dropped_total") == 3

        redis_server.start()
        await wait_until(lambda: hub.bus.health().buffered == 0, 10)
        health = await run_json(run)
        assert health["bus"]["reachable"] is True and health["bus"]["dropped"] == 3
        assert not any(d.startswith("bus") for d in health["degraded"])


async def test_a_configured_engine_id_finds_its_open_calls_after_a_restart(
        tmp_path: Path) -> None:
    """A container gets a new hostname at each start: the configured id still names it
    (each run here gets another port, so "<hostname>:<port>" would differ)."""
    from engine.record.database import END_REASON_UNEXPECTED
    from tests.harness import make_local_engine, running_engine

    sid = "CA" + "e1" * 16

    async def with_history(config: Config) -> Engine:
        return await make_local_engine(config, history=True)

    async with running_engine(tmp_path, make_engine=with_history,
                              engine={"engine_id": "edge-1"}) as run:
        history = run.engine.hub.history
        assert history is not None and history.engine_id == "edge-1"
        # Recorded as started; the engine then "dies" without the call's end.
        await history.call_started(sid, "+15550100001", "+15550100000")
    async with running_engine(tmp_path, make_engine=with_history,
                              engine={"engine_id": "edge-1"}) as run:
        assert run.engine.hub.history is not None
        stored = await run.engine.hub.history.get_call(sid)
    assert stored is not None and stored.end_reason == END_REASON_UNEXPECTED
