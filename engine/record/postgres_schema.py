"""The history's PostgreSQL schema and migrations: the same logical schema as SQLite
(database.py), with money as NUMERIC (exact sums across a fleet) and times as double
precision epoch seconds (UTC), like SQLite's REAL, so one SQL text serves both.

Flags stay integers 0/1 (as in SQLite) so the shared statements (`greatest(escalated, ?)`)
read the same on both. The version is in `schema_version`, one row per applied step;
engines starting together serialize their migration on an advisory lock.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg

from engine.record.database import HistoryError

# Each entry upgrades the schema by one version; append, never edit a released one.
# 1 is SQLite's 1-4 at once (the PostgreSQL backend starts there).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE calls (
        call_sid TEXT PRIMARY KEY,
        from_number TEXT NOT NULL DEFAULT '',
        to_number TEXT NOT NULL DEFAULT '',
        started_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        last_activity_at DOUBLE PRECISION NOT NULL,
        duration_s DOUBLE PRECISION,
        end_reason TEXT,
        state TEXT NOT NULL DEFAULT 'connected',
        cost_usd NUMERIC,
        escalated INTEGER NOT NULL DEFAULT 0,
        engine_id TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX calls_started_at ON calls(started_at);
    CREATE INDEX calls_unfinished ON calls(engine_id) WHERE ended_at IS NULL;
    CREATE TABLE turns (
        call_sid TEXT NOT NULL,
        idx INTEGER NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        caller_text TEXT NOT NULL DEFAULT '',
        agent_text TEXT NOT NULL DEFAULT '',
        heard_text TEXT NOT NULL DEFAULT '',
        interrupted INTEGER NOT NULL DEFAULT 0,
        cached INTEGER NOT NULL DEFAULT 0,
        caller_audio_s DOUBLE PRECISION NOT NULL DEFAULT 0,
        agent_audio_s DOUBLE PRECISION NOT NULL DEFAULT 0,
        stt_s DOUBLE PRECISION,
        llm_first_token_s DOUBLE PRECISION,
        tts_first_audio_s DOUBLE PRECISION,
        engine_overhead_s DOUBLE PRECISION,
        voice_to_voice_s DOUBLE PRECISION,
        endpointing_s DOUBLE PRECISION,
        knowledge_ids TEXT,
        PRIMARY KEY (call_sid, idx)
    );
    CREATE INDEX turns_ts ON turns(ts);
    CREATE TABLE usage (
        id BIGSERIAL PRIMARY KEY,
        call_sid TEXT,
        ts DOUBLE PRECISION NOT NULL,
        provider TEXT NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        audio_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        cached_input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        characters BIGINT NOT NULL DEFAULT 0,
        cost_usd NUMERIC NOT NULL DEFAULT 0,
        estimated INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX usage_call ON usage(call_sid);
    CREATE INDEX usage_ts ON usage(ts);
    CREATE TABLE cost_lines (
        id BIGSERIAL PRIMARY KEY,
        usage_id BIGINT NOT NULL REFERENCES usage(id),
        call_sid TEXT,
        ts DOUBLE PRECISION NOT NULL,
        item TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        quantity DOUBLE PRECISION NOT NULL,
        unit TEXT NOT NULL,
        unit_price NUMERIC NOT NULL,
        amount NUMERIC NOT NULL,
        estimated INTEGER NOT NULL DEFAULT 0,
        unpriced INTEGER NOT NULL DEFAULT 0,
        cached INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX cost_lines_call ON cost_lines(call_sid);
    CREATE INDEX cost_lines_ts ON cost_lines(ts);
    CREATE TABLE actions (
        id BIGSERIAL PRIMARY KEY,
        call_sid TEXT,
        ts DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        args TEXT NOT NULL DEFAULT '{}',
        ok INTEGER NOT NULL DEFAULT 1,
        error TEXT
    );
    CREATE INDEX actions_call ON actions(call_sid);
    CREATE INDEX actions_ts ON actions(ts);
    CREATE TABLE applied_writes (
        write_id TEXT PRIMARY KEY,
        applied_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE tool_calls (
        id BIGSERIAL PRIMARY KEY,
        call_sid TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        turn INTEGER NOT NULL,
        round INTEGER NOT NULL DEFAULT 1,
        call_id TEXT NOT NULL,
        name TEXT NOT NULL,
        arguments TEXT NOT NULL DEFAULT '{}',
        outcome TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT '',
        latency_s DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX tool_calls_call ON tool_calls(call_sid);
    """,
    # 2: experiment variants (SQLite's 5).
    """
    CREATE TABLE call_variants (
        call_sid TEXT NOT NULL,
        experiment TEXT NOT NULL,
        variant TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        misunderstood_turns INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (call_sid, experiment)
    );
    CREATE INDEX call_variants_experiment ON call_variants(experiment);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
# pg_advisory_xact_lock key of the migration (any constant: "SWBD" in ASCII).
_MIGRATION_LOCK = 0x53574244


async def migrate(conn: Any) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction; the version found before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                           "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL "
                           "DEFAULT now())")
        found = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        if found > SCHEMA_VERSION:
            raise HistoryError(f"history schema version {found} is newer than this engine "
                               f"({SCHEMA_VERSION}); upgrade the engine")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
    return found


async def init_connection(conn: asyncpg.Connection) -> None:
    """Money goes in as the decimal a float prints as (0.019, not 0.01899999...), and comes
    back as Decimal (run_postgres hands plans floats, as SQLite does)."""
    await conn.set_type_codec("numeric", schema="pg_catalog", format="text",
                              encoder=_numeric_text, decoder=_decimal)


def _numeric_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _decimal(text: str) -> Decimal:
    return Decimal(text)


async def read_dsn(dsn: str, plan: Any, timeout_s: float = 10.0) -> Any:
    """Run a read `plan` (engine/record/sql.py) on the fleet's PostgreSQL history, in one
    read-only snapshot, for a report; HistoryError saying why when it cannot."""
    from engine.record.sql import run_postgres

    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, ValueError) as exc:
        raise HistoryError(f"cannot connect to the PostgreSQL history: {exc}") from exc
    try:
        await init_connection(conn)
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            return await run_postgres(conn, plan)
    except asyncpg.UndefinedTableError as exc:
        raise HistoryError(f"no history in this database (no engine has written to it "
                           f"yet): {exc}") from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise HistoryError(f"cannot read the PostgreSQL history: {exc}") from exc
    finally:
        await asyncio.wait_for(conn.close(), timeout_s)
