"""The history database: its SQLite schema and migrations, and how it is opened
(PostgreSQL's, the same logical schema, is in postgres_schema.py).

WAL journal with `synchronous=NORMAL` and a busy timeout: several engines may write one
file on a local disk. Do not put it on a network filesystem (WAL needs shared memory).
Timestamps are Unix epoch seconds (REAL, UTC).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

# The end reason of a call its engine never ended (it died); set at the next startup.
END_REASON_UNEXPECTED = "ended_unexpectedly"

# Each entry upgrades the schema by one version; append, never edit a released one.
MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE calls (
        call_sid TEXT PRIMARY KEY,
        from_number TEXT NOT NULL DEFAULT '',
        to_number TEXT NOT NULL DEFAULT '',
        started_at REAL NOT NULL,
        ended_at REAL,
        last_activity_at REAL NOT NULL,
        duration_s REAL,
        end_reason TEXT,
        state TEXT NOT NULL DEFAULT 'connected',
        cost_usd REAL,
        escalated INTEGER NOT NULL DEFAULT 0,
        engine_id TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX calls_started_at ON calls(started_at);
    CREATE INDEX calls_unfinished ON calls(engine_id) WHERE ended_at IS NULL;
    CREATE TABLE turns (
        call_sid TEXT NOT NULL,
        idx INTEGER NOT NULL,
        ts REAL NOT NULL,
        caller_text TEXT NOT NULL DEFAULT '',
        agent_text TEXT NOT NULL DEFAULT '',
        heard_text TEXT NOT NULL DEFAULT '',
        interrupted INTEGER NOT NULL DEFAULT 0,
        cached INTEGER NOT NULL DEFAULT 0,
        caller_audio_s REAL NOT NULL DEFAULT 0,
        agent_audio_s REAL NOT NULL DEFAULT 0,
        stt_s REAL,
        llm_first_token_s REAL,
        tts_first_audio_s REAL,
        engine_overhead_s REAL,
        voice_to_voice_s REAL,
        endpointing_s REAL,
        PRIMARY KEY (call_sid, idx)
    );
    CREATE INDEX turns_ts ON turns(ts);
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        call_sid TEXT,
        ts REAL NOT NULL,
        provider TEXT NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        audio_seconds REAL NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        cached_input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        characters INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        estimated INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX usage_call ON usage(call_sid);
    CREATE INDEX usage_ts ON usage(ts);
    CREATE TABLE actions (
        id INTEGER PRIMARY KEY,
        call_sid TEXT,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        args TEXT NOT NULL DEFAULT '{}',
        ok INTEGER NOT NULL DEFAULT 1,
        error TEXT
    );
    CREATE INDEX actions_call ON actions(call_sid);
    CREATE INDEX actions_ts ON actions(ts);
    """,
    # 2: the itemised bill. Each booking (a `usage` row: a provider call, or Twilio
    # minutes) gets its priced lines; money is read from here. Bookings made before
    # keep their cost as one line each, quantity 1 of the unit "booking".
    """
    CREATE TABLE cost_lines (
        id INTEGER PRIMARY KEY,
        usage_id INTEGER NOT NULL REFERENCES usage(id),
        call_sid TEXT,
        ts REAL NOT NULL,
        item TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        quantity REAL NOT NULL,
        unit TEXT NOT NULL,
        unit_price REAL NOT NULL,
        amount REAL NOT NULL,
        estimated INTEGER NOT NULL DEFAULT 0,
        unpriced INTEGER NOT NULL DEFAULT 0,
        cached INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX cost_lines_call ON cost_lines(call_sid);
    CREATE INDEX cost_lines_ts ON cost_lines(ts);
    INSERT INTO cost_lines (usage_id, call_sid, ts, item, provider, model, quantity, unit,
                            unit_price, amount, estimated, unpriced, cached)
    SELECT id, call_sid, ts,
           CASE kind WHEN 'llm' THEN 'agent' WHEN 'tts' THEN 'voice' ELSE kind END,
           provider, model, 1, 'booking', cost_usd, cost_usd, estimated, 0,
           provider LIKE '%:cache'
    FROM usage;
    """,
    # 3: the writes replayed from the journal (writer.py), each recorded in the same
    # transaction, so a replay cut short after its commit never applies one twice.
    """
    CREATE TABLE applied_writes (
        write_id TEXT PRIMARY KEY,
        applied_at REAL NOT NULL
    );
    """,
    # 4: the tools the agent called (issue 13); arguments as JSON, redacted by the hub.
    # The knowledge passages a turn was given (their ids, space-separated).
    """
    ALTER TABLE turns ADD COLUMN knowledge_ids TEXT;
    CREATE TABLE tool_calls (
        id INTEGER PRIMARY KEY,
        call_sid TEXT NOT NULL,
        ts REAL NOT NULL,
        turn INTEGER NOT NULL,
        round INTEGER NOT NULL DEFAULT 1,
        call_id TEXT NOT NULL,
        name TEXT NOT NULL,
        arguments TEXT NOT NULL DEFAULT '{}',
        outcome TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT '',
        latency_s REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX tool_calls_call ON tool_calls(call_sid);
    """,
    # 5: the experiment variant each call was assigned (issue 15), and at its end the
    # caller turns the engine did not understand (nothing else records them).
    """
    CREATE TABLE call_variants (
        call_sid TEXT NOT NULL,
        experiment TEXT NOT NULL,
        variant TEXT NOT NULL,
        ts REAL NOT NULL,
        misunderstood_turns INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (call_sid, experiment)
    );
    CREATE INDEX call_variants_experiment ON call_variants(experiment);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class HistoryError(Exception):
    """The history database cannot be opened or is from a newer version."""


def connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """A connection with the house settings (WAL, synchronous=NORMAL, busy timeout)."""
    if not create and not path.exists():
        raise HistoryError(f"history database not found: {path}")
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0,
                           check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def read_file(path: str | Path, plan: Any, hint: str = "") -> Any:
    """Run a read `plan` (engine/record/sql.py) on an existing history file, for a report;
    HistoryError, saying which file and why, when it cannot be opened or read (`hint`:
    a likely reason to add)."""
    from engine.record.sql import run_sqlite

    path = Path(path)
    try:
        conn = connect(path, create=False)
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot open history {path}: {exc}") from exc
    try:
        return run_sqlite(conn, plan)
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read history {path}{hint}: {exc}") from exc
    finally:
        conn.close()


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found before."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise HistoryError(f"history schema version {found} is newer than this engine "
                           f"({SCHEMA_VERSION}); upgrade the engine")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        # One transaction per step: the version only moves if the whole step applied.
        conn.executescript(f"BEGIN;\n{MIGRATIONS[version - 1]}\n"
                           f"PRAGMA user_version={version};\nCOMMIT;")
    return found
