"""History writes as data: what each write changes, so it can be journaled and replayed.

Each write method of CallHistory makes a `Write` (an operation and its JSON-able
arguments); `plan` says what it changes, as statements either backend runs (sql.py). A
write the database refuses goes to the journal (spool.py) as one JSON line and is applied
from there later, exactly once (the writer records its id in `applied_writes` in the same
transaction).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.record.bill import BillLine, insert_lines
from engine.record.database import END_REASON_UNEXPECTED
from engine.record.sql import Plan, Stmt

# The turn columns a `turn_completed` write carries, by name.
TURN_COLUMNS = ("idx", "caller_text", "agent_text", "heard_text", "interrupted", "cached",
                "caller_audio_s", "agent_audio_s", "stt_s", "llm_first_token_s",
                "tts_first_audio_s", "engine_overhead_s", "voice_to_voice_s", "endpointing_s",
                "knowledge_ids")
# The tool_calls columns a `tool_called` write carries, by name.
TOOL_CALL_COLUMNS = ("turn", "round", "call_id", "name", "arguments", "outcome", "summary",
                     "latency_s")
# The usage columns a `booking` write carries, by name.
USAGE_COLUMNS = ("provider", "kind", "model", "audio_seconds", "input_tokens",
                 "cached_input_tokens", "output_tokens", "characters", "cost_usd",
                 "estimated")


@dataclass(slots=True, frozen=True)
class Write:
    """One history write: `op` names what it does, `data` holds its JSON-able arguments."""

    op: str
    engine_id: str
    call_sid: str | None
    at: float  # when it happened (Unix seconds): a replay keeps the original times
    data: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def encode(self) -> bytes:
        """One journal line (without its newline)."""
        return json.dumps({"id": self.id, "op": self.op, "engine_id": self.engine_id,
                           "call_sid": self.call_sid, "at": self.at, "data": self.data},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, line: bytes) -> Write:
        """A journal line back; ValueError when it is not one."""
        try:
            raw = json.loads(line)
            write = cls(op=str(raw["op"]), engine_id=str(raw["engine_id"]),
                        call_sid=raw["call_sid"], at=float(raw["at"]), data=dict(raw["data"]),
                        id=str(raw["id"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a history write: {exc}") from None
        if write.op not in _PLANS:
            raise ValueError(f"unknown history write {write.op!r}")
        return write

    def booked(self) -> list[tuple[float, float]]:
        """The (time, USD) of each cost line this write books; none for other writes."""
        if self.op != "booking":
            return []
        return [(float(line["ts"]), float(line["amount"])) for line in self.data["lines"]]


def plan(write: Write) -> Plan[Any]:
    """What `write` changes (run inside the caller's transaction); its result, if any."""
    return _PLANS[write.op](write)


def record_applied(write_id: str) -> Plan[None]:
    """A replayed write's id, in its transaction: a replay is never applied twice."""
    yield Stmt("INSERT INTO applied_writes (write_id, applied_at) VALUES (?, ?)",
               (write_id, time.time()))


def applied_check(write_id: str) -> Plan[bool]:
    """Whether a journaled write was applied already."""
    found = yield Stmt("SELECT 1 FROM applied_writes WHERE write_id = ?", (write_id,),
                       fetch="value")
    return found is not None


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def _touch(w: Write) -> Plan[None]:
    # Also creates a stub row for a call whose start was never recorded.
    yield Stmt(
        "INSERT INTO calls (call_sid, started_at, last_activity_at, engine_id) "
        "VALUES (?, ?, ?, ?) ON CONFLICT(call_sid) DO UPDATE SET "
        "last_activity_at = greatest(calls.last_activity_at, excluded.last_activity_at)",
        (w.call_sid, w.at, w.at, w.engine_id))


def _call_started(w: Write) -> Plan[None]:
    d = w.data
    yield Stmt(
        "INSERT INTO calls (call_sid, from_number, to_number, started_at, "
        "last_activity_at, state, engine_id) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(call_sid) DO UPDATE SET from_number = excluded.from_number, "
        "to_number = excluded.to_number, started_at = excluded.started_at, "
        "state = excluded.state, engine_id = excluded.engine_id",
        (w.call_sid, d["from_number"], d["to_number"], w.at, w.at, d["state"], w.engine_id))


def _call_state(w: Write) -> Plan[None]:
    yield from _touch(w)
    yield Stmt("UPDATE calls SET state = ? WHERE call_sid = ?", (w.data["state"], w.call_sid))


def _turn_completed(w: Write) -> Plan[None]:
    yield from _touch(w)
    updates = ", ".join(f"{column} = excluded.{column}" for column in ("ts", *TURN_COLUMNS))
    yield Stmt(
        f"INSERT INTO turns (call_sid, ts, {', '.join(TURN_COLUMNS)}) "
        f"VALUES ({_placeholders(len(TURN_COLUMNS) + 2)}) "
        f"ON CONFLICT(call_sid, idx) DO UPDATE SET {updates}",
        # .get: a journal written before a column existed replays with it empty.
        (w.call_sid, w.at, *(w.data.get(column) for column in TURN_COLUMNS)))


def _booking(w: Write) -> Plan[None]:
    """A usage row (a provider call, or Twilio minutes), then its lines (which refer to it)."""
    if w.call_sid is not None:
        yield from _touch(w)
        # Booked after the call's end was written (a request read on for its usage):
        # the call's total grows with it.
        yield Stmt("UPDATE calls SET cost_usd = cost_usd + ? WHERE call_sid = ? "
                   "AND ended_at IS NOT NULL", (w.data["cost"], w.call_sid))
    usage = w.data["usage"]
    usage_id = yield Stmt(
        f"INSERT INTO usage (call_sid, ts, {', '.join(USAGE_COLUMNS)}) "
        f"VALUES ({_placeholders(len(USAGE_COLUMNS) + 2)}) RETURNING id",
        (w.call_sid, w.at, *(usage[column] for column in USAGE_COLUMNS)), fetch="value")
    yield from insert_lines(int(usage_id or 0), [BillLine(**line) for line in w.data["lines"]])


def _action_recorded(w: Write) -> Plan[None]:
    d = w.data
    if w.call_sid is not None:
        # Only a call the history knows is touched: a command refused for an unknown
        # call is audited without making up a row for it.
        yield Stmt("UPDATE calls SET last_activity_at = greatest(last_activity_at, ?), "
                   "escalated = greatest(escalated, ?) WHERE call_sid = ?",
                   (w.at, int(d["escalation"]), w.call_sid))
    yield Stmt("INSERT INTO actions (call_sid, ts, actor, action, args, ok, error) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)",
               (w.call_sid, w.at, d["actor"], d["action"], d["args"], int(d["ok"]),
                d["error"]))


def _tool_called(w: Write) -> Plan[None]:
    yield from _touch(w)
    yield Stmt(f"INSERT INTO tool_calls (call_sid, ts, {', '.join(TOOL_CALL_COLUMNS)}) "
               f"VALUES ({_placeholders(len(TOOL_CALL_COLUMNS) + 2)})",
               (w.call_sid, w.at, *(w.data[column] for column in TOOL_CALL_COLUMNS)))


def _call_ended(w: Write) -> Plan[None]:
    d = w.data
    yield from _touch(w)
    yield Stmt(
        "UPDATE calls SET ended_at = ?, duration_s = coalesce(?, greatest(0, ? - started_at)),"
        " end_reason = ?, state = ?, cost_usd = coalesce(?, (SELECT coalesce(sum(amount), 0) "
        "FROM cost_lines l WHERE l.call_sid = calls.call_sid)), "
        "escalated = greatest(escalated, ?) "
        "WHERE call_sid = ?",
        (w.at, d["duration_s"], w.at, d["end_reason"], d["state"], d["cost_usd"],
         int(d["escalated"]), w.call_sid))


def _variant_assigned(w: Write) -> Plan[None]:
    yield from _touch(w)
    yield Stmt("INSERT INTO call_variants (call_sid, experiment, variant, ts) "
               "VALUES (?, ?, ?, ?) ON CONFLICT(call_sid, experiment) DO UPDATE SET "
               "variant = excluded.variant, ts = excluded.ts",
               (w.call_sid, w.data["experiment"], w.data["variant"], w.at))


def _variant_outcome(w: Write) -> Plan[None]:
    yield Stmt("UPDATE call_variants SET misunderstood_turns = ? WHERE call_sid = ? "
               "AND experiment = ?",
               (int(w.data["misunderstood_turns"]), w.call_sid, w.data["experiment"]))


def _recover_unfinished(w: Write) -> Plan[list[str]]:
    """Close the engine's calls started by `at` that never got their end; their sids."""
    rows = yield Stmt("SELECT call_sid FROM calls WHERE ended_at IS NULL AND engine_id = ? "
                      "AND started_at <= ? ORDER BY started_at, call_sid",
                      (w.engine_id, w.at), fetch="rows")
    sids = [row[0] for row in rows]
    for sid in sids:
        yield Stmt(
            "UPDATE calls SET ended_at = last_activity_at, "
            "duration_s = greatest(0, last_activity_at - started_at), end_reason = ?, "
            "state = 'ended', cost_usd = (SELECT coalesce(sum(amount), 0) "
            "FROM cost_lines l WHERE l.call_sid = calls.call_sid) WHERE call_sid = ?",
            (END_REASON_UNEXPECTED, sid))
    return sids


_PLANS: dict[str, Callable[[Write], Plan[Any]]] = {
    "call_started": _call_started, "call_state": _call_state,
    "turn_completed": _turn_completed, "booking": _booking,
    "action_recorded": _action_recorded, "tool_called": _tool_called,
    "call_ended": _call_ended, "recover_unfinished": _recover_unfinished,
    "variant_assigned": _variant_assigned, "variant_outcome": _variant_outcome,
}
