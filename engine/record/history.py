"""Durable call history in SQLite: calls, turns, usage with its cost lines (bill.py) and
supervisor actions.

The `async` write methods return once their write is committed (writer.py), so a turn
is on disk before the next one starts: a crash loses at most the turn in flight. Write
methods never raise (history must not break a call): a failed write is logged and
reported as False. The schema and its migrations are in database.py.

Several engines: give each engine a stable `engine_id`. They may share one data dir and
even one file (WAL + busy timeout make concurrent writers safe on a local disk), but a
per-engine file (`history-<engine_id>.sqlite3`) avoids lock waits; `recover_unfinished`
only touches calls of its own `engine_id`, so one engine's restart never closes another
engine's live calls.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from engine.log import get_logger
from engine.money.prices import CostLine
from engine.providers.base import Usage
from engine.record.bill import (
    BillLine,
    TwilioMinutes,
    insert_lines,
    minutes_line,
    read_lines,
    usage_lines,
)
from engine.record.database import END_REASON_UNEXPECTED, SCHEMA_VERSION, HistoryError
from engine.record.writer import HistoryWriter
from engine.session.records import TurnRecord

log = get_logger(__name__)


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


class CallHistory:
    """Async facade over the history's writer thread."""

    def __init__(self, path: str | Path, engine_id: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.engine_id = engine_id
        self.clock = clock
        self._writer = HistoryWriter(self.path, thread_name=f"history-writer-{engine_id}")

    # --- lifecycle ---

    async def open(self) -> None:
        """Create/upgrade the database and start the writer thread."""
        if self._writer.running:
            return
        found = await self._writer.open()
        log.info("history open", path=str(self.path), schema_version=SCHEMA_VERSION,
                 found_version=found, engine_id=self.engine_id)

    async def aclose(self) -> None:
        """Flush every queued write, then close the connection."""
        await self._writer.aclose()

    async def _write(self, what: str, call_sid: str | None,
                     job: Callable[[sqlite3.Connection], Any]) -> bool:
        try:
            await self._writer.submit(job)
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

    async def usage_recorded(self, call_sid: str | None, usage: Usage,
                             lines: Sequence[CostLine], at: float | None = None) -> bool:
        """One provider call: what it reported (a `usage` row) and its priced lines."""
        ts = self.clock() if at is None else at
        cost = float(sum((line.amount for line in lines), Decimal(0)))
        row = (call_sid, ts, usage.provider, usage.kind, usage.model, usage.audio_seconds,
               usage.input_tokens, usage.cached_input_tokens, usage.output_tokens,
               usage.characters, cost, int(usage.estimated))
        bill = usage_lines(call_sid, ts, usage, lines)
        return await self._write("usage_recorded", call_sid,
                                 lambda conn: self._book(conn, call_sid, ts, row, bill, cost))

    async def minutes_recorded(self, call_sid: str, kind: TwilioMinutes, model: str,
                               minutes: int, unit_price: Decimal, duration_s: float,
                               at: float | None = None) -> bool:
        """Twilio minutes just started, of the call (`kind` "phone", from the answer) or of
        one media stream: a `usage` row (audio_seconds = the duration so far) and a line."""
        ts = self.clock() if at is None else at
        line = minutes_line(call_sid, ts, kind, model, minutes, unit_price)
        row = (call_sid, ts, "twilio", kind, model, duration_s, 0, 0, 0, 0, line.amount, 0)
        return await self._write("minutes_recorded", call_sid,
                                 lambda conn: self._book(conn, call_sid, ts, row, [line],
                                                         line.amount))

    def _book(self, conn: sqlite3.Connection, call_sid: str | None, ts: float,
              row: tuple[Any, ...], lines: Sequence[BillLine], cost: float) -> None:
        """The usage row, then its lines (which refer to it)."""
        if call_sid is not None:
            self._touch(conn, call_sid, ts)
            # Booked after the call's end was written (a request read on for its usage):
            # the call's total grows with it.
            conn.execute("UPDATE calls SET cost_usd = cost_usd + ? WHERE call_sid = ? "
                         "AND ended_at IS NOT NULL", (cost, call_sid))
        cursor = conn.execute(
            "INSERT INTO usage (call_sid, ts, provider, kind, model, audio_seconds, "
            "input_tokens, cached_input_tokens, output_tokens, characters, cost_usd, "
            "estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        insert_lines(conn, int(cursor.lastrowid or 0), lines)

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
        `end_reason` "ended_unexpectedly" and the cost of its recorded lines.
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
                    "state = 'ended', cost_usd = (SELECT coalesce(sum(amount), 0) "
                    "FROM cost_lines l WHERE l.call_sid = calls.call_sid) WHERE call_sid = ?",
                    (END_REASON_UNEXPECTED, sid))
            return sids

        sids = await self._writer.submit(job)
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

        return await self._writer.submit(job)

    async def actions(self, call_sid: str) -> list[StoredAction]:
        """Supervisor actions and escalations on one call, oldest first (the audit trail)."""
        def job(conn: sqlite3.Connection) -> list[StoredAction]:
            rows = conn.execute(
                "SELECT ts, actor, action, args, ok, error FROM actions WHERE call_sid = ? "
                "ORDER BY id", (call_sid,)).fetchall()
            return [StoredAction(ts=r[0], actor=r[1], action=r[2], args=r[3], ok=bool(r[4]),
                                 error=r[5]) for r in rows]

        return await self._writer.submit(job)

    async def bill(self, call_sid: str) -> list[BillLine]:
        """One call's itemised bill, oldest line first (late bookings included)."""
        return await self._writer.submit(
            lambda conn: read_lines(conn, "call_sid = ?", (call_sid,)))

    async def daily_costs(self, since: date) -> dict[date, float]:
        """USD per UTC day from the cost lines, to seed the ledger's day totals."""
        start = datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp()

        def job(conn: sqlite3.Connection) -> dict[date, float]:
            rows = conn.execute(
                "SELECT date(ts, 'unixepoch') AS day, sum(amount) FROM cost_lines "
                "WHERE ts >= ? GROUP BY day", (start,)).fetchall()
            # Rounded to nano-dollars: REAL sums carry float noise far below a cent.
            return {date.fromisoformat(day): round(float(total), 9) for day, total in rows}

        return await self._writer.submit(job)
