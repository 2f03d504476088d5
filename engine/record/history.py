"""Durable call history in SQLite: calls, turns, usage and supervisor actions.

Durability: WAL journal with `synchronous=NORMAL`, every write committed as soon as it is
taken from the queue (writes that arrive together share one commit). A committed write
survives the process being killed (kill -9); only an OS crash or power loss can lose the
last commits. The `async` write methods return once their write is committed, so a turn
is on disk before the next one starts: a crash loses at most the turn in flight.

Threading: one writer thread owns the sqlite3 connection; the event loop only enqueues
and awaits. Write methods never raise (history must not break a call): a failed write is
logged and reported as False.

Several engines: give each engine a stable `engine_id`. They may share one data dir and
even one file (WAL + busy timeout make concurrent writers safe on a local disk), but a
per-engine file (`history-<engine_id>.sqlite3`) avoids lock waits; `recover_unfinished`
only touches calls of its own `engine_id`, so one engine's restart never closes another
engine's live calls. Do not put the file on a network filesystem (WAL needs shared
memory).

Timestamps are Unix epoch seconds (REAL, UTC).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

from engine.log import get_logger
from engine.providers.base import Usage
from engine.session.records import TurnRecord

log = get_logger(__name__)

T = TypeVar("T")

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


@dataclass(slots=True, frozen=True)
class StoredCall:
    call_sid: str
    from_number: str
    to_number: str
    started_at: float
    ended_at: float | None
    last_activity_at: float
    duration_s: float | None
    end_reason: str | None
    state: str
    cost_usd: float | None
    escalated: bool
    engine_id: str


@dataclass(slots=True, frozen=True)
class StoredAction:
    ts: float
    actor: str
    action: str
    args: str  # JSON
    ok: bool
    error: str | None


_Job = Callable[[sqlite3.Connection], Any]


class CallHistory:
    """Async facade over the single SQLite writer thread."""

    def __init__(self, path: str | Path, engine_id: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.engine_id = engine_id
        self.clock = clock
        self._queue: queue.SimpleQueue[tuple[_Job, concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- lifecycle ---

    async def open(self) -> None:
        """Create/upgrade the database and start the writer thread."""
        if self._thread is not None:
            return
        self._closed = False
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name=f"history-writer-{self.engine_id}", daemon=True)
        self._thread.start()
        try:
            found = await asyncio.wrap_future(ready)
        except BaseException:
            self._thread = None
            raise
        log.info("history open", path=str(self.path), schema_version=SCHEMA_VERSION,
                 found_version=found, engine_id=self.engine_id)

    async def aclose(self) -> None:
        """Flush every queued write, then close the connection."""
        thread = self._thread
        if thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path, create=True)
            found = migrate(conn)
        except BaseException as exc:  # reported to open(), which raises it
            ready.set_exception(HistoryError(f"cannot open history {self.path}: {exc}"))
            return
        ready.set_result(found)
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            # Group commit: whatever queued up while we were busy shares one commit.
            while len(batch) < 256:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(conn, batch)

    @staticmethod
    def _run_batch(conn: sqlite3.Connection,
                   batch: list[tuple[_Job, concurrent.futures.Future[Any]]]) -> None:
        results: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job, fut in batch:
                # A savepoint per job: one bad write never undoes its neighbours.
                conn.execute("SAVEPOINT job")
                try:
                    results.append((fut, job(conn), None))
                    conn.execute("RELEASE job")
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((fut, None, exc))
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN/COMMIT failed (disk full, locked too long)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            results = [(fut, None, exc) for _, fut in batch]
        for fut, value, error in results:
            try:
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)
            except concurrent.futures.InvalidStateError:
                pass  # cancelled by its waiter; the write itself still happened

    async def _submit(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._closed:
            raise HistoryError("history is not open")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((job, fut))
        # Shielded: a cancelled caller (call torn down) must not drop a queued write.
        return await asyncio.shield(asyncio.wrap_future(fut))

    async def _write(self, what: str, call_sid: str | None,
                     job: Callable[[sqlite3.Connection], Any]) -> bool:
        try:
            await self._submit(job)
        except (sqlite3.Error, HistoryError, ValueError, TypeError) as exc:
            log.error("history write failed", what=what, call_sid=call_sid, error=str(exc))
            return False
        return True

    # --- writes ---

    def _touch(self, conn: sqlite3.Connection, call_sid: str, at: float) -> None:
        # Also creates a stub row for a call whose start was never recorded.
        conn.execute(
            "INSERT INTO calls (call_sid, started_at, last_activity_at, engine_id) "
            "VALUES (?, ?, ?, ?) ON CONFLICT(call_sid) DO UPDATE SET "
            "last_activity_at = max(last_activity_at, excluded.last_activity_at)",
            (call_sid, at, at, self.engine_id))

    async def call_started(self, call_sid: str, from_number: str = "", to_number: str = "",
                           started_at: float | None = None, state: str = "connected") -> bool:
        at = self.clock() if started_at is None else started_at

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO calls (call_sid, from_number, to_number, started_at, "
                "last_activity_at, state, engine_id) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(call_sid) DO UPDATE SET from_number = excluded.from_number, "
                "to_number = excluded.to_number, started_at = excluded.started_at, "
                "state = excluded.state, engine_id = excluded.engine_id",
                (call_sid, from_number, to_number, at, at, state, self.engine_id))

        return await self._write("call_started", call_sid, job)

    async def call_state(self, call_sid: str, state: str, at: float | None = None) -> bool:
        ts = self.clock() if at is None else at

        def job(conn: sqlite3.Connection) -> None:
            self._touch(conn, call_sid, ts)
            conn.execute("UPDATE calls SET state = ? WHERE call_sid = ?", (state, call_sid))

        return await self._write("call_state", call_sid, job)

    async def turn_completed(self, call_sid: str, turn: TurnRecord,
                             at: float | None = None) -> bool:
        ts = self.clock() if at is None else at
        t = turn.timings
        row = (call_sid, turn.idx, ts, turn.caller_text, turn.agent_text, turn.heard_text,
               int(turn.interrupted), int(turn.cached), turn.caller_audio_s,
               turn.agent_audio_s, t.stt, t.llm_first_token, t.tts_first_audio,
               t.engine_overhead, t.voice_to_voice, t.endpointing)

        def job(conn: sqlite3.Connection) -> None:
            self._touch(conn, call_sid, ts)
            conn.execute(
                "INSERT OR REPLACE INTO turns (call_sid, idx, ts, caller_text, agent_text, "
                "heard_text, interrupted, cached, caller_audio_s, agent_audio_s, stt_s, "
                "llm_first_token_s, tts_first_audio_s, engine_overhead_s, voice_to_voice_s, "
                "endpointing_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

        return await self._write("turn_completed", call_sid, job)

    async def usage_recorded(self, call_sid: str | None, usage: Usage, cost_usd: float,
                             at: float | None = None) -> bool:
        ts = self.clock() if at is None else at
        row = (call_sid, ts, usage.provider, usage.kind, usage.model, usage.audio_seconds,
               usage.input_tokens, usage.cached_input_tokens, usage.output_tokens,
               usage.characters, cost_usd, int(usage.estimated))
        return await self._write("usage_recorded", call_sid,
                                 lambda conn: self._insert_usage(conn, call_sid, ts, row))

    async def phone_recorded(self, call_sid: str, duration_s: float, cost_usd: float,
                             at: float | None = None) -> bool:
        """The Twilio leg as a usage row (kind "phone", audio_seconds = call duration)."""
        ts = self.clock() if at is None else at
        row = (call_sid, ts, "twilio", "phone", "voice", duration_s, 0, 0, 0, 0, cost_usd, 0)
        return await self._write("phone_recorded", call_sid,
                                 lambda conn: self._insert_usage(conn, call_sid, ts, row))

    def _insert_usage(self, conn: sqlite3.Connection, call_sid: str | None, ts: float,
                      row: tuple[Any, ...]) -> None:
        if call_sid is not None:
            self._touch(conn, call_sid, ts)
        conn.execute(
            "INSERT INTO usage (call_sid, ts, provider, kind, model, audio_seconds, "
            "input_tokens, cached_input_tokens, output_tokens, characters, cost_usd, "
            "estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    async def action_recorded(self, call_sid: str | None, actor: str, action: str,
                              args: dict[str, Any] | None = None, ok: bool = True,
                              error: str | None = None, escalation: bool = False,
                              at: float | None = None) -> bool:
        """A supervisor command or policy action; `escalation` marks the call escalated
        at once (so a call that crashes after a handoff still counts)."""
        ts = self.clock() if at is None else at
        args_json = json.dumps(args or {}, default=str, sort_keys=True)

        def job(conn: sqlite3.Connection) -> None:
            if call_sid is not None:
                self._touch(conn, call_sid, ts)
                if escalation:
                    conn.execute("UPDATE calls SET escalated = 1 WHERE call_sid = ?",
                                 (call_sid,))
            conn.execute("INSERT INTO actions (call_sid, ts, actor, action, args, ok, error) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (call_sid, ts, actor, action, args_json, int(ok), error))

        return await self._write("action_recorded", call_sid, job)

    async def call_ended(self, call_sid: str, end_reason: str, cost_usd: float,
                         escalated: bool = False, ended_at: float | None = None,
                         duration_s: float | None = None, state: str = "ended") -> bool:
        at = self.clock() if ended_at is None else ended_at

        def job(conn: sqlite3.Connection) -> None:
            self._touch(conn, call_sid, at)
            conn.execute(
                "UPDATE calls SET ended_at = ?, duration_s = coalesce(?, max(0, ? - started_at)),"
                " end_reason = ?, state = ?, cost_usd = ?, escalated = max(escalated, ?) "
                "WHERE call_sid = ?",
                (at, duration_s, at, end_reason, state, cost_usd, int(escalated), call_sid))

        return await self._write("call_ended", call_sid, job)

    # --- startup and reads ---

    async def recover_unfinished(self, now: float | None = None) -> list[str]:
        """Close this engine's calls that never got `call_ended` (the engine died).

        Run once at startup, before taking calls. Each is ended at its last write, with
        `end_reason` "ended_unexpectedly" and the cost of its recorded usage.
        """
        cutoff = self.clock() if now is None else now

        def job(conn: sqlite3.Connection) -> list[str]:
            sids = [r[0] for r in conn.execute(
                "SELECT call_sid FROM calls WHERE ended_at IS NULL AND engine_id = ? "
                "AND started_at <= ?", (self.engine_id, cutoff))]
            for sid in sids:
                conn.execute(
                    "UPDATE calls SET ended_at = last_activity_at, "
                    "duration_s = max(0, last_activity_at - started_at), end_reason = ?, "
                    "state = 'ended', cost_usd = (SELECT coalesce(sum(cost_usd), 0) "
                    "FROM usage WHERE usage.call_sid = calls.call_sid) WHERE call_sid = ?",
                    (END_REASON_UNEXPECTED, sid))
            return sids

        sids = await self._submit(job)
        for sid in sids:
            log.warning("call ended unexpectedly (recovered at startup)", call_sid=sid)
        return sids

    async def get_call(self, call_sid: str) -> StoredCall | None:
        def job(conn: sqlite3.Connection) -> StoredCall | None:
            row = conn.execute(
                "SELECT call_sid, from_number, to_number, started_at, ended_at, "
                "last_activity_at, duration_s, end_reason, state, cost_usd, escalated, "
                "engine_id FROM calls WHERE call_sid = ?", (call_sid,)).fetchone()
            if row is None:
                return None
            return StoredCall(
                call_sid=row[0], from_number=row[1], to_number=row[2], started_at=row[3],
                ended_at=row[4], last_activity_at=row[5], duration_s=row[6],
                end_reason=row[7], state=row[8], cost_usd=row[9], escalated=bool(row[10]),
                engine_id=row[11])

        return await self._submit(job)

    async def actions(self, call_sid: str) -> list[StoredAction]:
        """Supervisor actions and escalations on one call, oldest first (the audit trail)."""
        def job(conn: sqlite3.Connection) -> list[StoredAction]:
            rows = conn.execute(
                "SELECT ts, actor, action, args, ok, error FROM actions WHERE call_sid = ? "
                "ORDER BY id", (call_sid,)).fetchall()
            return [StoredAction(ts=r[0], actor=r[1], action=r[2], args=r[3], ok=bool(r[4]),
                                 error=r[5]) for r in rows]

        return await self._submit(job)

    async def daily_costs(self, since: date) -> dict[date, float]:
        """USD per UTC day from the usage rows, to seed `SpendLedger.restore_day_totals`."""
        start = datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp()

        def job(conn: sqlite3.Connection) -> dict[date, float]:
            rows = conn.execute(
                "SELECT date(ts, 'unixepoch') AS day, sum(cost_usd) FROM usage "
                "WHERE ts >= ? GROUP BY day", (start,)).fetchall()
            # Rounded to nano-dollars: REAL sums carry float noise far below a cent.
            return {date.fromisoformat(day): round(float(total), 9) for day, total in rows}

        return await self._submit(job)
