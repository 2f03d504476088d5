"""The business report from the call history: volume, the itemised cost, speed,
escalations, the monthly projection and the OpenAI Realtime comparison.

Read-only over the history: an engine's SQLite file (`build_report`) or the fleet's
PostgreSQL database, every engine's calls (`build_fleet_report`); the same queries (plans,
sql.py) on both. Money comes from the cost lines (bill.py), so the
split into speech-to-text, agent, voice, phone and media-stream always adds up to the
total; a call with a cost but no lines counts as "unitemized". The window holds the
calls that started in it, with all their lines (late ones too), and the spend outside
any call booked in it. Per call-minute figures divide by the calls' talk time.

The monthly projection is the average daily spend over the last `PROJECTION_DAYS` days
(fewer when the window or the history is shorter; at least an hour) times the days of
the month the window ends in. The Realtime comparison reprices each call's turns (caller
and agent audio lengths) with the configured Realtime prices, the live ledger's rule
(`RealtimeEstimator`), against our AI cost (speech-to-text + agent + voice); Twilio's
phone and media-stream minutes are paid either way and stay out of it.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from engine.config import PricesConfig
from engine.log import get_logger
from engine.money.realtime import realtime_conversation_cost
from engine.record.bill import AI_ITEMS, ITEMS, BillLine, read_lines
from engine.record.database import END_REASON_UNEXPECTED, read_file
from engine.record.metrics import percentile
from engine.record.report_output import render
from engine.record.sql import Plan, Stmt

log = get_logger(__name__)

PROJECTION_DAYS = 7
UNITEMIZED = "unitemized"

ReportFormat = Literal["table", "json", "csv"]

_SINCE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([wdhm])\s*$", re.IGNORECASE)
_SINCE_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes"}
_REALTIME_KEYS = ("realtime_audio_in", "realtime_audio_cached_in", "realtime_audio_out",
                  "realtime_caller_tokens_per_minute", "realtime_agent_tokens_per_minute")


def parse_since(text: str) -> timedelta:
    """"30d", "12h", "90m" or "2w" -> timedelta; ValueError on anything else."""
    match = _SINCE_RE.match(text or "")
    if match is None:
        raise ValueError(f"invalid period {text!r}: use a number and a unit "
                         "(w, d, h or m), e.g. 30d, 12h, 90m")
    amount = float(match.group(1))
    if amount <= 0:
        raise ValueError(f"invalid period {text!r}: must be greater than zero")
    return timedelta(**{_SINCE_UNITS[match.group(2).lower()]: amount})


@dataclass(slots=True, frozen=True)
class CostSplit:
    """One row of the cost table: in all, per call and per call-minute (USD)."""

    usd: float
    per_call_usd: float | None
    per_minute_usd: float | None


@dataclass(slots=True)
class Report:
    period_start: datetime
    period_end: datetime
    calls: int = 0
    calls_in_progress: int = 0
    calls_ended_unexpectedly: int = 0
    total_minutes: float = 0.0
    avg_duration_s: float | None = None
    total_cost_usd: float = 0.0  # all in: AI, phone and media streams
    cost_per_call_usd: float | None = None
    cost_per_minute_usd: float | None = None
    ai_cost_usd: float = 0.0  # speech-to-text + agent + voice
    ai_cost_per_call_usd: float | None = None
    ai_cost_per_minute_usd: float | None = None
    # Every item of ITEMS (and "unitemized" when some call has a cost without lines).
    cost_by_item: dict[str, CostSplit] = field(default_factory=dict)
    estimated_usd: float = 0.0  # in lines whose quantity the provider did not report
    estimated_lines: int = 0
    unpriced_lines: int = 0  # counted at $0: no price for their model
    unpriced_models: list[str] = field(default_factory=list)  # "provider model"
    monthly_projection_usd: float = 0.0
    projection_days: float = 0.0  # the days the daily average is taken over
    projection_daily_usd: float = 0.0
    projection_month_days: int = 0  # the days of the month the window ends in
    turns: int = 0
    avg_voice_to_voice_s: float | None = None
    p95_voice_to_voice_s: float | None = None
    escalations: int = 0
    escalation_rate: float | None = None  # fraction of calls, 0..1
    cached_turns: int = 0  # answer and every sentence of it from the caches
    cache_hit_rate: float | None = None  # fraction of turns, 0..1
    agent_requests: int = 0
    answer_cache_hits: int = 0  # agent requests answered from the answer cache
    voice_requests: int = 0
    audio_cache_hits: int = 0  # sentences replayed from the audio cache
    realtime_equivalent_usd: float = 0.0
    realtime_per_minute_usd: float | None = None
    realtime_saving_usd: float | None = None
    realtime_saving_pct: float | None = None  # percent, 0..100 (negative: Realtime cheaper)
    realtime_assumptions: dict[str, float] = field(default_factory=dict)  # prices.realtime_*
    lines: list[BillLine] = field(default_factory=list)


def _ts(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("report times must be timezone-aware (UTC)")
    return moment.timestamp()


def build_report(db_path: str | Path, since: timedelta, now: datetime | None = None,
                 prices: PricesConfig | None = None) -> Report:
    """Summarize the calls that started in the last `since` before `now` (aware UTC)."""
    now = now or datetime.now(UTC)
    prices = prices or PricesConfig()
    start = now - since
    report: Report = read_file(db_path, _build(Report(period_start=start, period_end=now),
                                               prices))
    return report


async def build_fleet_report(dsn: str, since: timedelta, now: datetime | None = None,
                             prices: PricesConfig | None = None,
                             timeout_s: float = 10.0) -> Report:
    """`build_report` over the fleet's PostgreSQL history: every engine's calls."""
    from engine.record.postgres_schema import read_dsn  # asyncpg: only for PostgreSQL

    now = now or datetime.now(UTC)
    report: Report = await read_dsn(
        dsn, _build(Report(period_start=now - since, period_end=now),
                    prices or PricesConfig()), timeout_s)
    return report


def _build(report: Report, prices: PricesConfig) -> Plan[Report]:
    start_ts, end_ts = _ts(report.period_start), _ts(report.period_end)
    calls = yield Stmt(
        "SELECT call_sid, started_at, ended_at, last_activity_at, duration_s, end_reason, "
        "cost_usd, escalated FROM calls WHERE started_at >= ? AND started_at <= ? "
        "ORDER BY started_at", (start_ts, end_ts), fetch="rows")
    report.lines = yield from read_lines(
        "call_sid IN (SELECT call_sid FROM calls WHERE started_at >= ? AND "
        "started_at <= ?) OR (call_sid IS NULL AND ts >= ? AND ts <= ?)",
        (start_ts, end_ts, start_ts, end_ts))
    itemized = {line.call_sid for line in report.lines}
    unitemized = 0.0
    durations: list[float] = []
    report.calls = len(calls)
    for sid, started, ended, last, duration, end_reason, cost, escalated in calls:
        if ended is None:
            report.calls_in_progress += 1
            duration = max(0.0, last - started)  # up to its last write
        elif end_reason == END_REASON_UNEXPECTED:
            report.calls_ended_unexpectedly += 1
        durations.append(duration or 0.0)
        report.escalations += int(bool(escalated))
        if sid not in itemized and cost:
            unitemized += cost
    report.total_minutes = sum(durations) / 60.0
    if report.calls:
        report.avg_duration_s = sum(durations) / report.calls
        report.escalation_rate = report.escalations / report.calls
    _costs(report, unitemized)
    yield from _projection(report, start_ts, end_ts)
    yield from _turn_figures(report, start_ts, end_ts, prices)
    return report


def _split(report: Report, usd: float) -> CostSplit:
    # Rounded to nano-dollars: REAL sums carry float noise far below a cent.
    usd = round(usd, 9)
    minutes = report.total_minutes
    return CostSplit(usd, usd / report.calls if report.calls else None,
                     usd / minutes if minutes > 0 else None)


def _costs(report: Report, unitemized: float) -> None:
    """The split by item, the totals, and what is estimated or unpriced."""
    by_item = dict.fromkeys(ITEMS, 0.0)
    unpriced: set[str] = set()
    for line in report.lines:
        by_item[line.item] = by_item.get(line.item, 0.0) + line.amount
        if line.estimated:
            report.estimated_lines += 1
            report.estimated_usd += line.amount
        if line.unpriced:
            report.unpriced_lines += 1
            unpriced.add(f"{line.provider} {line.model}")
    if unitemized:
        by_item[UNITEMIZED] = unitemized
    report.cost_by_item = {item: _split(report, usd) for item, usd in by_item.items()}
    everything = _split(report, sum(by_item.values()))
    report.total_cost_usd = everything.usd
    report.cost_per_call_usd, report.cost_per_minute_usd = (everything.per_call_usd,
                                                            everything.per_minute_usd)
    ai = _split(report, sum(by_item[item] for item in AI_ITEMS))
    report.ai_cost_usd = ai.usd
    report.ai_cost_per_call_usd, report.ai_cost_per_minute_usd = (ai.per_call_usd,
                                                                  ai.per_minute_usd)
    report.estimated_usd = round(report.estimated_usd, 9)
    report.unpriced_models = sorted(unpriced)
    for item, hits, requests in (("agent", "answer_cache_hits", "agent_requests"),
                                 ("voice", "audio_cache_hits", "voice_requests")):
        bookings = {line.usage_id: line.cached for line in report.lines if line.item == item}
        setattr(report, requests, len(bookings))
        setattr(report, hits, sum(bookings.values()))


def _projection(report: Report, start_ts: float, end_ts: float) -> Plan[None]:
    """The last days' average daily spend times the days of the month."""
    first = yield Stmt("SELECT min(t) FROM (SELECT min(started_at) AS t FROM calls "
                       "UNION ALL SELECT min(ts) FROM cost_lines) AS firsts", fetch="value")
    end = report.period_end.astimezone(UTC)
    report.projection_month_days = calendar.monthrange(end.year, end.month)[1]
    if first is None:
        return
    since = max(end_ts - PROJECTION_DAYS * 86400.0, start_ts, first)
    span_s = max(end_ts - since, 3600.0)
    spent = yield Stmt("SELECT coalesce(sum(amount), 0) FROM cost_lines WHERE ts >= ? "
                       "AND ts <= ?", (since, end_ts), fetch="value")
    report.projection_days = span_s / 86400.0
    report.projection_daily_usd = round(spent / report.projection_days, 9)
    report.monthly_projection_usd = round(
        report.projection_daily_usd * report.projection_month_days, 9)


def _turn_figures(report: Report, start_ts: float, end_ts: float,
                  prices: PricesConfig) -> Plan[None]:
    rows = yield Stmt(
        "SELECT t.call_sid, t.cached, t.voice_to_voice_s, t.caller_audio_s, t.agent_audio_s "
        "FROM turns t JOIN calls c ON c.call_sid = t.call_sid "
        "WHERE c.started_at >= ? AND c.started_at <= ? ORDER BY t.call_sid, t.idx",
        (start_ts, end_ts), fetch="rows")
    report.turns = len(rows)
    report.cached_turns = sum(1 for r in rows if r[1])
    if rows:
        report.cache_hit_rate = report.cached_turns / len(rows)
    v2v = sorted(r[2] for r in rows if r[2] is not None)
    if v2v:
        report.avg_voice_to_voice_s = sum(v2v) / len(v2v)
        report.p95_voice_to_voice_s = percentile(v2v, 95)
    per_call: dict[str, list[tuple[float, float]]] = {}
    for sid, _cached, _v2v, caller_s, agent_s in rows:
        per_call.setdefault(sid, []).append((caller_s, agent_s))
    report.realtime_assumptions = {key: getattr(prices, key) for key in _REALTIME_KEYS}
    report.realtime_equivalent_usd = sum(realtime_conversation_cost(turns, prices)
                                         for turns in per_call.values())
    if report.total_minutes > 0:
        report.realtime_per_minute_usd = report.realtime_equivalent_usd / report.total_minutes
    if report.realtime_equivalent_usd > 0:
        report.realtime_saving_usd = report.realtime_equivalent_usd - report.ai_cost_usd
        report.realtime_saving_pct = (report.realtime_saving_usd
                                      / report.realtime_equivalent_usd * 100.0)


def render_report(report: Report, format: ReportFormat = "table") -> str:
    """The report as text: a table for people, or JSON (the figures and every line) or
    CSV (one row per line) for a spreadsheet."""
    return render(report, format)
