"""The call history on both backends (SQLite and PostgreSQL, `history_backend`):
durability across kill -9, recovery of unfinished calls, isolation of a bad write, tool
calls, schema versioning; and SQLite's upgrade of an older file in place."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from engine.config import PricesConfig
from engine.money.prices import PriceTable
from engine.providers.base import Usage
from engine.record.database import (
    END_REASON_UNEXPECTED,
    MIGRATIONS,
    SCHEMA_VERSION,
    HistoryError,
)
from engine.record.history import CallHistory
from engine.record.report import build_report
from engine.session.records import ToolCallRecord, TurnRecord, TurnTimings
from tests.history_backends import HistoryBackend

REPO = Path(__file__).resolve().parent.parent
PRICES = PriceTable(PricesConfig())

# Writes a call, three turns and some usage, then kills itself (SIGKILL) mid-call.
# argv: the SQLite file, or "postgres" and the DSN and the data dir.
CRASHING_ENGINE = textwrap.dedent("""
    import asyncio, os, sys
    from decimal import Decimal
    from engine.money.prices import CostLine
    from engine.record.history import CallHistory
    from engine.session.records import TurnRecord, TurnTimings
    from engine.providers.base import Usage

    async def main() -> None:
        if sys.argv[1] == "postgres":
            history = CallHistory.postgres(sys.argv[2], sys.argv[3], engine_id="engine-a")
        else:
            history = CallHistory(sys.argv[1], engine_id="engine-a")
        await history.open()
        t0 = 1_790_000_000.0
        await history.call_started("CAcrash", "+15550001", "+15550002", started_at=t0)
        for i in range(3):
            line = CostLine("agent", "openai", "gpt-4o-mini", Decimal(1), "request",
                            Decimal("0.001"), Decimal("0.001"))
            await history.usage_recorded("CAcrash", Usage("openai", "llm", "gpt-4o-mini",
                                         input_tokens=100, output_tokens=10), [line],
                                         at=t0 + 10 * i + 5)
            await history.turn_completed("CAcrash", TurnRecord(
                idx=i, caller_text=f"question {i}", agent_text=f"answer {i}",
                heard_text=f"answer {i}", caller_audio_s=2.0, agent_audio_s=3.0,
                timings=TurnTimings(stt=0.2, voice_to_voice=0.7 + i / 10)), at=t0 + 10 * i + 8)
        os.kill(os.getpid(), 9)

    asyncio.run(main())
""")


async def test_writes_survive_kill_and_recover_unfinished(
        history_backend: HistoryBackend) -> None:
    backend = history_backend
    target = (["postgres", backend.dsn, str(backend.data_dir)] if backend.kind == "postgres"
              else [str(backend.sqlite_path)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_ENGINE, *target, cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()

    history = backend.make(engine_id="engine-a")
    await history.open()
    try:
        call = await history.get_call("CAcrash")
        assert call is not None and call.ended_at is None and call.state == "connected"
        turns = await backend.rows("SELECT idx, caller_text, voice_to_voice_s FROM turns "
                                   "ORDER BY idx")
        assert turns == [(i, f"question {i}", 0.7 + i / 10) for i in range(3)]
        # an unfinished call of another engine sharing the database is not ours to close
        other = backend.make(engine_id="engine-b")
        await other.open()
        await other.call_started("CAother", started_at=1_790_000_000.0)
        await other.aclose()

        t0 = 1_790_000_000.0
        recovered = await history.recover_unfinished(now=t0 + 3600)
        assert recovered == ["CAcrash"]
        call = await history.get_call("CAcrash")
        assert call is not None
        assert call.end_reason == END_REASON_UNEXPECTED and call.state == "ended"
        assert call.ended_at == t0 + 28 and call.duration_s == 28.0  # up to its last write
        assert call.cost_usd == pytest.approx(0.003)
        assert await history.recover_unfinished(now=t0 + 3600) == []
        still_open = await history.get_call("CAother")
        assert still_open is not None and still_open.ended_at is None
    finally:
        await history.aclose()

    report = await backend.report(timedelta(days=1),
                                  now=datetime.fromtimestamp(1_790_000_000 + 3600, UTC))
    assert report.calls == 2
    assert report.calls_ended_unexpectedly == 1 and report.calls_in_progress == 1
    assert report.turns == 3
    assert report.total_cost_usd == pytest.approx(0.003)


async def test_full_call_roundtrip(history_backend: HistoryBackend) -> None:
    backend = history_backend  # the data dir is created on open
    history = backend.make(engine_id="e1", clock=lambda: 1_800_000_000.0)
    await history.open()
    assert await history.call_started("CA1", "+1555", "+1666")
    assert await history.turn_completed("CA1", TurnRecord(
        idx=0, caller_text="hi", agent_text="hello there", heard_text="hello", interrupted=True,
        cached=True, timings=TurnTimings(stt=0.3, llm_first_token=0.4, tts_first_audio=0.1,
                                         engine_overhead=0.02, voice_to_voice=0.9,
                                         endpointing=0.5)))
    voice = Usage("elevenlabs", "tts", "eleven_flash_v2_5", characters=40, estimated=True)
    assert await history.usage_recorded("CA1", voice, PRICES.cost_lines(voice))
    assert await history.action_recorded("CA1", "supervisor:alice", "transfer",
                                         {"to": "sales"}, escalation=True)
    assert await history.minutes_recorded("CA1", "phone", "voice", 2, Decimal("0.0085"), 61.0,
                                          at=1_800_000_061.0)
    assert await history.call_ended("CA1", "transferred", 0.019, ended_at=1_800_000_061.0)
    call = await history.get_call("CA1")
    assert call is not None
    assert (call.from_number, call.duration_s, call.end_reason, call.escalated,
            call.cost_usd, call.engine_id) == ("+1555", 61.0, "transferred", True, 0.019, "e1")
    assert await history.daily_costs(date(2027, 1, 1)) == {date(2027, 1, 15): 0.019}
    actions = await history.actions("CA1")
    assert [(a.actor, a.action, a.args, a.ok) for a in actions] == [
        ("supervisor:alice", "transfer", '{"to": "sales"}', True)]
    await history.aclose()

    turn = await backend.rows("SELECT heard_text, interrupted, cached, llm_first_token_s, "
                              "endpointing_s FROM turns")
    assert turn == [("hello", 1, 1, 0.4, 0.5)]
    assert await backend.rows("SELECT kind, estimated FROM usage ORDER BY id") == [
        ("tts", 1), ("phone", 0)]
    # Money is stored as it was priced (exact NUMERIC in PostgreSQL).
    assert await backend.rows("SELECT amount FROM cost_lines WHERE item = 'phone'") == [
        (0.017,)]
    if backend.kind == "sqlite":
        with sqlite3.connect(backend.sqlite_path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_tool_calls_are_recorded_in_order(history_backend: HistoryBackend) -> None:
    history = history_backend.make(engine_id="e1", clock=lambda: 1_800_000_000.0)
    await history.open()
    try:
        await history.call_started("CA1")
        lookup = ToolCallRecord(turn=0, call_id="call_a", name="order_status",
                                arguments={"order": "4471", "email": "[redacted]"},
                                outcome="ok", summary="order 4471: shipped", latency_s=0.42)
        failed = ToolCallRecord(turn=1, call_id="call_b", name="book_visit", arguments={},
                                outcome="timeout", latency_s=3.0, round=2)
        assert await history.tool_called("CA1", lookup)
        assert await history.tool_called("CA1", failed, at=1_800_000_009.0)
        assert await history.tool_calls("CA1") == [lookup, failed]
        call = await history.get_call("CA1")
        assert call is not None and call.last_activity_at == 1_800_000_009.0
    finally:
        await history.aclose()
    assert await history_backend.rows("SELECT arguments FROM tool_calls ORDER BY id") == [
        ('{"email": "[redacted]", "order": "4471"}',), ("{}",)]


async def test_bad_write_is_isolated_and_reported(history_backend: HistoryBackend) -> None:
    history = history_backend.make()
    await history.open()
    await history.call_started("CA1")
    bad = TurnRecord(idx=1, caller_text=["not", "text"])  # type: ignore[arg-type]
    results = await asyncio.gather(
        history.turn_completed("CA1", TurnRecord(idx=0, caller_text="a")),
        history.turn_completed("CA1", bad),
        history.turn_completed("CA1", TurnRecord(idx=2, caller_text="c")))
    assert results == [True, False, True]
    await history.aclose()
    assert not await history.turn_completed("CA1", TurnRecord(idx=3))  # closed: no raise
    assert await history_backend.rows("SELECT idx FROM turns ORDER BY idx") == [(0,), (2,)]
    assert history.stats().status == "ok" and history.stats().backlog == 0


async def test_cancelled_writer_still_lands(history_backend: HistoryBackend) -> None:
    history = history_backend.make()
    await history.open()
    task = asyncio.create_task(history.call_started("CA1", "+1"))
    await asyncio.sleep(0)  # the write is queued
    task.cancel()
    await history.aclose()  # flushes the queue
    assert await history_backend.rows("SELECT from_number FROM calls") == [("+1",)]


@pytest.mark.postgres
async def test_a_newer_postgres_schema_is_refused(postgres_dsn: str, tmp_path: Path) -> None:
    from engine.record import postgres_schema

    first = CallHistory.postgres(postgres_dsn, tmp_path)
    await first.open()
    await first.aclose()
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)",
                           postgres_schema.SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(HistoryError, match="newer"):
        await CallHistory.postgres(postgres_dsn, tmp_path).open()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    history = CallHistory(db)
    with pytest.raises(HistoryError, match="newer"):
        await history.open()


async def test_a_history_of_the_previous_schema_upgrades_in_place(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    t0 = 1_800_000_000.0
    # The file as the engine before the itemised bill left it (schema 1): a call whose
    # usage rows carry their cost, a cache hit among them, and spend outside any call.
    with sqlite3.connect(db) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version=1")
        conn.execute("INSERT INTO calls (call_sid, started_at, ended_at, last_activity_at, "
                     "duration_s, end_reason, state, cost_usd) VALUES "
                     "('CAold', ?, ?, ?, 61, 'hangup', 'ended', 0.0185)", (t0, t0 + 61, t0 + 61))
        conn.executemany(
            "INSERT INTO usage (call_sid, ts, provider, kind, model, audio_seconds, "
            "input_tokens, cached_input_tokens, output_tokens, characters, cost_usd, "
            "estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [("CAold", t0 + 5, "openai", "llm", "gpt-4o-mini", 0, 900, 0, 40, 0, 0.001, 0),
             ("CAold", t0 + 6, "elevenlabs", "tts", "eleven_flash_v2_5", 0, 0, 0, 0, 10,
              0.0005, 1),
             ("CAold", t0 + 9, "openai:cache", "llm", "gpt-4o-mini", 0, 0, 0, 0, 0, 0.0, 0),
             ("CAold", t0 + 61, "twilio", "phone", "voice", 61, 0, 0, 0, 0, 0.017, 0),
             (None, t0 - 5, "openai", "llm", "gpt-4o-mini", 0, 10, 0, 1, 0, 0.0001, 0)])
    history = CallHistory(db)
    await history.open()
    try:
        bill = await history.bill("CAold")
        assert [(line.item, line.provider, line.quantity, line.unit, line.amount,
                 line.estimated, line.cached) for line in bill] == [
            ("agent", "openai", 1.0, "booking", 0.001, False, False),
            ("voice", "elevenlabs", 1.0, "booking", 0.0005, True, False),
            ("agent", "openai:cache", 1.0, "booking", 0.0, False, True),
            ("phone", "twilio", 1.0, "booking", 0.017, False, False)]
        assert await history.daily_costs(date(2027, 1, 1)) == {date(2027, 1, 15): 0.0186}
        # The upgraded file takes new bookings like a new one.
        voice = Usage("elevenlabs", "tts", "eleven_flash_v2_5", characters=20)
        assert await history.usage_recorded("CAnew", voice, PRICES.cost_lines(voice),
                                            at=t0 + 100)
        assert [(line.unit, line.quantity) for line in await history.bill("CAnew")] == [
            ("1K characters", 0.02)]
    finally:
        await history.aclose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    report = build_report(db, timedelta(days=1), now=datetime.fromtimestamp(t0 + 3600, UTC))
    assert {item: split.usd for item, split in report.cost_by_item.items() if split.usd} == \
        pytest.approx({"agent": 0.0011, "voice": 0.0015, "phone": 0.017})
    assert report.estimated_usd == pytest.approx(0.0005) and report.answer_cache_hits == 1


def test_the_history_backend_is_configured_and_database_url_overrides(tmp_path: Path) -> None:
    from engine.config import ConfigError, load_config

    default = load_config(REPO / "config.toml", env={})
    assert (default.history.backend, default.history.dsn) == ("sqlite", "")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[history]\nbackend = "postgres"\n')
    with pytest.raises(ConfigError, match=r"needs history\.dsn"):
        load_config(fleet, env={})
    config = load_config(fleet, env={"DATABASE_URL": "postgresql://switchboard@db:5432/calls"})
    assert config.history.dsn == "postgresql://switchboard@db:5432/calls"
