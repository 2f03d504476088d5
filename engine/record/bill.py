"""The itemised bill as the history stores it: one `cost_lines` row per priced quantity.

Every booking is a `usage` row (what a provider reported, or Twilio minutes) with its
lines: an LLM call's input, cached input and output tokens, a transcription's audio
minutes, a voice's characters, the phone's and each media stream's started minutes. A
cache hit has one free line that says so. The lines of a booking add up to its cost, and
the history reads money from the lines only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from engine.money.prices import CostLine
from engine.providers.base import CACHE_SUFFIX, Usage
from engine.record.sql import Plan, Stmt

# What a line is for, in the bill's order; the first three are the AI's share.
ITEMS = ("stt", "agent", "voice", "phone", "media_stream")
AI_ITEMS = ("stt", "agent", "voice")
TwilioMinutes = Literal["phone", "media_stream"]
MINUTE_UNITS: dict[TwilioMinutes, str] = {"phone": "phone minute",
                                          "media_stream": "media stream minute"}

_COLUMNS = ("call_sid", "ts", "item", "provider", "model", "quantity", "unit", "unit_price",
            "amount", "estimated", "unpriced", "cached")
_SELECT = f"SELECT {', '.join(_COLUMNS)}, usage_id FROM cost_lines"
_INSERT = (f"INSERT INTO cost_lines (usage_id, {', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})")


@dataclass(slots=True, frozen=True)
class BillLine:
    """One stored line: `quantity` `unit`s at `unit_price` USD make `amount` USD."""

    call_sid: str | None  # None: spend outside any call (a warm-up)
    ts: float  # when it was booked (Unix seconds, UTC)
    item: str  # stt | agent | voice | phone | media_stream
    provider: str
    model: str
    quantity: float
    unit: str  # "1M input tokens", "audio minute", "1K characters", "phone minute", ...
    unit_price: float
    amount: float
    estimated: bool  # the provider did not report the quantity: estimated
    unpriced: bool  # no price for the model: counted at $0
    cached: bool  # served from the answer or audio cache: not billed
    usage_id: int = 0  # the booking (usage row) it itemises; 0 until stored


def usage_lines(call_sid: str | None, ts: float, usage: Usage,
                lines: Sequence[CostLine]) -> list[BillLine]:
    """A provider call's priced lines, as stored."""
    cached = usage.cached or usage.provider.endswith(CACHE_SUFFIX)
    return [BillLine(call_sid, ts, line.item, line.provider, line.model, float(line.quantity),
                     line.unit, float(line.unit_price), float(line.amount), line.estimated,
                     line.unpriced, cached) for line in lines]


def minutes_line(call_sid: str, ts: float, kind: TwilioMinutes, model: str, minutes: int,
                 unit_price: Decimal) -> BillLine:
    """Started Twilio minutes (the call's or one media stream's) as one line."""
    return BillLine(call_sid, ts, kind, "twilio", model, float(minutes), MINUTE_UNITS[kind],
                    float(unit_price), float(minutes * unit_price), False, False, False)


def insert_lines(usage_id: int, lines: Sequence[BillLine]) -> Plan[None]:
    """Store a booking's lines (a plan: sql.py)."""
    if lines:
        yield Stmt(_INSERT, [(usage_id, *_row(line)) for line in lines], many=True)


def read_lines(where: str, params: Sequence[Any]) -> Plan[list[BillLine]]:
    """The lines matching `where` (SQL over the cost_lines columns), oldest first."""
    rows = yield Stmt(f"{_SELECT} WHERE {where} ORDER BY ts, id", params, fetch="rows")
    return [BillLine(sid, ts, item, provider, model, quantity, unit, unit_price, amount,
                     bool(estimated), bool(unpriced), bool(cached), usage_id)
            for (sid, ts, item, provider, model, quantity, unit, unit_price, amount,
                 estimated, unpriced, cached, usage_id) in rows]


def _row(line: BillLine) -> tuple[Any, ...]:
    return (line.call_sid, line.ts, line.item, line.provider, line.model, line.quantity,
            line.unit, line.unit_price, line.amount, int(line.estimated), int(line.unpriced),
            int(line.cached))
