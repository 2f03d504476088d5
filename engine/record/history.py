"""Durable call history: calls, turns, usage with its cost lines (bill.py), supervisor
actions and the agent's tool calls; in SQLite (embedded, the default) or PostgreSQL (a
fleet's shared record: `CallHistory.postgres`, postgres.py).

The `async` write methods return once their write is durable (writer.py): committed,
or, while the database refuses writes (a full disk), in the journal it is replayed from
later, in order and once. So a turn is on disk before the next one starts: a crash loses
at most the turn in flight. Write methods never raise (history must not break a call):
they return False for a write that is not durable (held in memory while the journal
cannot be written either, dropped, or refused for good), which is logged. The schema
and its migrations are in database.py, the writes' SQL in writes.py.

Several engines: give each engine a stable `engine_id`. They may share one data dir and
even one file (WAL + busy timeout make concurrent writers safe on a local disk), but a
per-engine file (`history-<engine_id>.sqlite3`) avoids lock waits; `recover_unfinished`
only touches calls of its own `engine_id`, so one engine's restart never closes another
engine's live calls. Each engine spools to a journal of its own beside the database
(for PostgreSQL: in its data directory).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from engine.log import get_logger
from engine.money.prices import CostLine
from engine.providers.base import Usage
from engine.record.bill import BillLine, TwilioMinutes, minutes_line, read_lines, usage_lines
from engine.record.database import SCHEMA_VERSION, HistoryError
from engine.record.sql import Plan, PlanFactory, Stmt
from engine.record.writer import MEMORY_MAX, HistoryStats, HistoryWriter, Stored
from engine.record.writes import TOOL_CALL_COLUMNS, TURN_COLUMNS, Write
from engine.session.records import ToolCallRecord, TurnRecord

log = get_logger(__name__)

T = TypeVar("T")
HistoryBackend = Literal["sqlite", "postgres"]


class RecordWriter(Protocol):
    """What the history needs of a backend's writer (writer.py, postgres.py)."""

    @property
    def running(self) -> bool: ...
    async def open(self) -> int: ...
    async def aclose(self) -> None: ...
    def stats(self) -> HistoryStats: ...
    def pending(self) -> list[Write]: ...
    async def write(self, write: Write) -> tuple[Stored, Any]: ...
    async def read(self, job: PlanFactory[T]) -> T: ...


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
    """Async facade over the history's writer (SQLite's thread or PostgreSQL's task)."""

    def __init__(self, path: str | Path, engine_id: str = "",
                 clock: Callable[[], float] = time.time, memory_max: int = MEMORY_MAX,
                 dsn: str = "", pool_max: int = 4) -> None:
        """SQLite at `path`; with a `dsn`, PostgreSQL, journaling beside `path` (no
        database file is made there)."""
        self.path = Path(path)
        self.engine_id = engine_id
        self.clock = clock
        self.backend: HistoryBackend = "postgres" if dsn else "sqlite"
        self.journal = journal_path(self.path, engine_id)
        self._writer: RecordWriter
        if dsn:
            from engine.record.postgres import PostgresWriter  # asyncpg only when used

            self._writer = PostgresWriter(dsn, self.journal, memory_max, pool_max=pool_max)
        else:
            self._writer = HistoryWriter(self.path, self.journal,
                                         thread_name=f"history-writer-{engine_id}",
                                         memory_max=memory_max)

    @classmethod
    def postgres(cls, dsn: str, data_dir: str | Path, engine_id: str = "",
                 clock: Callable[[], float] = time.time, memory_max: int = MEMORY_MAX,
                 pool_max: int = 4) -> CallHistory:
        """The fleet's shared history in PostgreSQL; this engine's journal in `data_dir`."""
        return cls(Path(data_dir) / POSTGRES_JOURNAL_BASE, engine_id, clock, memory_max,
                   dsn=dsn, pool_max=pool_max)

    # --- lifecycle ---

    async def open(self) -> None:
        """Create/upgrade the database, replay what the journal holds, start the writer."""
        if self._writer.running:
            return
        found = await self._writer.open()
        log.info("history open", backend=self.backend, path=str(self.path),
                 schema_version=_schema_version(self.backend), found_version=found,
                 engine_id=self.engine_id)
        others = _other_journals(self.path, self.journal)
        if others:  # only an engine with their engine_id replays them
            log.warning("history.other_journals", journals=others, engine_id=self.engine_id,
                        detail="writes another engine id journaled wait there; start an "
                               "engine with that id on this data directory to replay them")

    async def aclose(self) -> None:
        """Flush every queued write, then close the connection."""
        await self._writer.aclose()

    def stats(self) -> HistoryStats:
        """Whether writes reach the database, wait in the journal or are at risk."""
        return self._writer.stats()

    async def _write(self, op: str, call_sid: str | None, at: float | None,
                     data: dict[str, Any]) -> bool:
        write = Write(op, self.engine_id, call_sid, self.clock() if at is None else at, data)
        try:
            stored, _ = await self._writer.write(write)
        except Exception as exc:  # refused for good (a bug): never raised into a call
            log.error("history write failed", what=op, call_sid=call_sid, error=str(exc))
            return False
        return stored in ("committed", "journaled")

    # --- writes ---

    async def call_started(self, call_sid: str, from_number: str = "", to_number: str = "",
                           started_at: float | None = None, state: str = "connected") -> bool:
        return await self._write("call_started", call_sid, started_at, {
            "from_number": from_number, "to_number": to_number, "state": state})

    async def call_state(self, call_sid: str, state: str, at: float | None = None) -> bool:
        return await self._write("call_state", call_sid, at, {"state": state})

    async def turn_completed(self, call_sid: str, turn: TurnRecord,
                             at: float | None = None) -> bool:
        t = turn.timings
        values = (turn.idx, turn.caller_text, turn.agent_text, turn.heard_text,
                  int(turn.interrupted), int(turn.cached), turn.caller_audio_s,
                  turn.agent_audio_s, t.stt, t.llm_first_token, t.tts_first_audio,
                  t.engine_overhead, t.voice_to_voice, t.endpointing,
                  " ".join(turn.knowledge_ids))
        return await self._write("turn_completed", call_sid, at,
                                 dict(zip(TURN_COLUMNS, values, strict=True)))

    async def usage_recorded(self, call_sid: str | None, usage: Usage,
                             lines: Sequence[CostLine], at: float | None = None) -> bool:
        """One provider call: what it reported (a `usage` row) and its priced lines."""
        ts = self.clock() if at is None else at
        cost = float(sum((line.amount for line in lines), Decimal(0)))
        return await self._book(call_sid, ts, {
            "provider": usage.provider, "kind": usage.kind, "model": usage.model,
            "audio_seconds": usage.audio_seconds, "input_tokens": usage.input_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "output_tokens": usage.output_tokens, "characters": usage.characters,
            "cost_usd": cost, "estimated": int(usage.estimated)},
            usage_lines(call_sid, ts, usage, lines), cost)

    async def minutes_recorded(self, call_sid: str, kind: TwilioMinutes, model: str,
                               minutes: int, unit_price: Decimal, duration_s: float,
                               at: float | None = None) -> bool:
        """Twilio minutes just started, of the call (`kind` "phone", from the answer) or of
        one media stream: a `usage` row (audio_seconds = the duration so far) and a line."""
        ts = self.clock() if at is None else at
        line = minutes_line(call_sid, ts, kind, model, minutes, unit_price)
        return await self._book(call_sid, ts, {
            "provider": "twilio", "kind": kind, "model": model, "audio_seconds": duration_s,
            "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0,
            "characters": 0, "cost_usd": line.amount, "estimated": 0}, [line], line.amount)

    async def _book(self, call_sid: str | None, ts: float, usage: dict[str, Any],
                    lines: Sequence[BillLine], cost: float) -> bool:
        return await self._write("booking", call_sid, ts, {
            "usage": usage, "lines": [asdict(line) for line in lines], "cost": cost})

    async def action_recorded(self, call_sid: str | None, actor: str, action: str,
                              args: dict[str, Any] | None = None, ok: bool = True,
                              error: str | None = None, escalation: bool = False,
                              at: float | None = None) -> bool:
        """A supervisor command or policy action; `escalation` marks the call escalated
        at once (so a call that crashes after a handoff still counts)."""
        return await self._write("action_recorded", call_sid, at, {
            "actor": actor, "action": action,
            "args": json.dumps(args or {}, default=str, sort_keys=True), "ok": ok,
            "error": error, "escalation": escalation})

    async def tool_called(self, call_sid: str, record: ToolCallRecord,
                          at: float | None = None) -> bool:
        """A tool the agent called (issue 13); its arguments come redacted by the hub."""
        return await self._write("tool_called", call_sid, at, {
            "turn": record.turn, "round": record.round, "call_id": record.call_id,
            "name": record.name,
            "arguments": json.dumps(record.arguments, default=str, sort_keys=True),
            "outcome": record.outcome, "summary": record.summary,
            "latency_s": record.latency_s})

    async def call_ended(self, call_sid: str, end_reason: str, cost_usd: float | None,
                         escalated: bool = False, ended_at: float | None = None,
                         duration_s: float | None = None, state: str = "ended") -> bool:
        return await self._write("call_ended", call_sid, ended_at, {
            "end_reason": end_reason, "cost_usd": cost_usd, "escalated": escalated,
            "duration_s": duration_s, "state": state})  # cost None: its lines' sum

    async def variant_assigned(self, call_sid: str, experiment: str, variant: str) -> bool:
        """The experiment variant a call got (engine/experiments)."""
        return await self._write("variant_assigned", call_sid, None, {
            "experiment": experiment, "variant": variant})

    async def variant_outcome(self, call_sid: str, experiment: str,
                              misunderstood_turns: int) -> bool:
        """What only the call knew at its end: the caller turns not understood."""
        return await self._write("variant_outcome", call_sid, None, {
            "experiment": experiment, "misunderstood_turns": misunderstood_turns})

    # --- startup and reads ---

    async def read(self, job: PlanFactory[T]) -> T:
        """Run a read plan (sql.py) on the history's own connection."""
        return await self._writer.read(job)

    async def recover_unfinished(self, now: float | None = None) -> list[str]:
        """Close this engine's calls that never got `call_ended` (the engine died).

        Run once at startup, before taking calls. Each is ended at its last write, with
        `end_reason` "ended_unexpectedly" and the cost of its recorded lines. While the
        database refuses writes this is journaled like any write (and [] returned).
        """
        write = Write("recover_unfinished", self.engine_id, None,
                      self.clock() if now is None else now)
        stored, sids = await self._writer.write(write)
        if stored != "committed":
            log.warning("history.recovery_deferred", stored=stored)
            return []
        for sid in sids:
            log.warning("call ended unexpectedly (recovered at startup)", call_sid=sid)
        return list(sids)

    async def get_call(self, call_sid: str) -> StoredCall | None:
        return await self._writer.read(lambda: _get_call(call_sid))

    async def actions(self, call_sid: str) -> list[StoredAction]:
        """Supervisor actions and escalations on one call, oldest first (the audit trail)."""
        return await self._writer.read(lambda: _actions(call_sid))

    async def tool_calls(self, call_sid: str) -> list[ToolCallRecord]:
        """The tools the agent called on one call, in order."""
        return await self._writer.read(lambda: _tool_calls(call_sid))

    async def bill(self, call_sid: str) -> list[BillLine]:
        """One call's itemised bill, oldest line first (late bookings included)."""
        return await self._writer.read(lambda: read_lines("call_sid = ?", (call_sid,)))

    async def daily_costs(self, since: date) -> dict[date, float]:
        """USD per UTC day from the cost lines, to seed the ledger's day totals: those in
        the database and those still waiting in the journal. PostgreSQL unreachable: the
        journal's only (logged)."""
        start = datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp()
        try:
            totals = await self._writer.read(lambda: self._daily_costs(start))
        except HistoryError as exc:
            log.warning("history.daily_costs_unavailable", error=str(exc),
                        detail="the budget starts from the journal's spend only")
            totals = _add_pending({}, self._writer.pending(), start)
        # Rounded to nano-dollars: REAL sums carry float noise far below a cent.
        return {day: round(total, 9) for day, total in totals.items()}

    def _daily_costs(self, start: float) -> Plan[dict[date, float]]:
        rows = yield Stmt("SELECT utc_day(ts) AS day, sum(amount) FROM cost_lines "
                          "WHERE ts >= ? GROUP BY day", (start,), fetch="rows")
        totals = {date.fromisoformat(day): float(total) for day, total in rows}
        # Read with the rows, on the writer: a write is in one or the other, never both.
        return _add_pending(totals, self._writer.pending(), start)


POSTGRES_JOURNAL_BASE = "history-postgres"


def _schema_version(backend: HistoryBackend) -> int:
    if backend == "postgres":
        from engine.record.postgres_schema import SCHEMA_VERSION as POSTGRES_VERSION

        return POSTGRES_VERSION
    return SCHEMA_VERSION


def _add_pending(totals: dict[date, float], pending: list[Write],
                 start: float) -> dict[date, float]:
    for write in pending:
        for ts, amount in write.booked():
            if ts >= start:
                day = datetime.fromtimestamp(ts, UTC).date()
                totals[day] = totals.get(day, 0.0) + amount
    return totals


def _get_call(call_sid: str) -> Plan[StoredCall | None]:
    rows = yield Stmt(
        "SELECT call_sid, from_number, to_number, started_at, ended_at, last_activity_at, "
        "duration_s, end_reason, state, cost_usd, escalated, engine_id FROM calls "
        "WHERE call_sid = ?", (call_sid,), fetch="rows")
    if not rows:
        return None
    row = rows[0]
    return StoredCall(
        call_sid=row[0], from_number=row[1], to_number=row[2], started_at=row[3],
        ended_at=row[4], last_activity_at=row[5], duration_s=row[6], end_reason=row[7],
        state=row[8], cost_usd=row[9], escalated=bool(row[10]), engine_id=row[11])


def _actions(call_sid: str) -> Plan[list[StoredAction]]:
    rows = yield Stmt("SELECT ts, actor, action, args, ok, error FROM actions "
                      "WHERE call_sid = ? ORDER BY id", (call_sid,), fetch="rows")
    return [StoredAction(ts=r[0], actor=r[1], action=r[2], args=r[3], ok=bool(r[4]),
                         error=r[5]) for r in rows]


def _tool_calls(call_sid: str) -> Plan[list[ToolCallRecord]]:
    rows = yield Stmt(f"SELECT {', '.join(TOOL_CALL_COLUMNS)} FROM tool_calls "
                      "WHERE call_sid = ? ORDER BY id", (call_sid,), fetch="rows")
    records = []
    for row in rows:
        r = dict(zip(TOOL_CALL_COLUMNS, row, strict=True))
        records.append(ToolCallRecord(
            turn=r["turn"], call_id=r["call_id"], name=r["name"],
            arguments=json.loads(r["arguments"]), outcome=r["outcome"], summary=r["summary"],
            latency_s=r["latency_s"], round=r["round"]))
    return records


def journal_path(database: Path, engine_id: str) -> Path:
    """The journal of one engine's writes to `database`, beside it."""
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", engine_id)
    return database.with_name(f"{database.name}.spool{'-' + tag if tag else ''}.jsonl")


def _other_journals(database: Path, own: Path) -> list[str]:
    """The journals of other engine ids beside `database` that still hold writes."""
    found = []
    for path in database.parent.glob(f"{database.name}.spool*.jsonl"):
        with contextlib.suppress(OSError):
            if path != own and path.stat().st_size:
                found.append(str(path))
    return sorted(found)
