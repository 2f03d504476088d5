"""The business report from the call history: volume, cost, speed, escalations, savings.

Read-only over the SQLite history. Costs come from the `usage` rows (the itemized
ledger), so the per-kind breakdown always adds up to the total; a call with a cost but no
usage rows counts as "unitemized". The Realtime comparison reprices each call's turns
(caller and agent audio lengths) with the configured Realtime prices, the same rule as
the live ledger (`RealtimeEstimator`), and compares it with our AI cost (STT + LLM +
TTS); the phone leg is paid either way and is left out of the comparison.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from engine.config import PricesConfig
from engine.log import get_logger
from engine.money.realtime import realtime_conversation_cost
from engine.record.database import END_REASON_UNEXPECTED, HistoryError, connect
from engine.record.metrics import percentile

log = get_logger(__name__)

# An average month (365.25 / 12 days), for the monthly projection.
DAYS_PER_MONTH = 30.4375
AI_KINDS = ("stt", "llm", "tts")
KIND_LABELS = {"phone": "Phone line (Twilio)", "stt": "Speech recognition",
               "llm": "Language model", "tts": "Voice (text-to-speech)",
               "unitemized": "Unitemized"}

ReportFormat = Literal["table", "json", "csv"]

_SINCE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([wdhm])\s*$", re.IGNORECASE)
_SINCE_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes"}


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


@dataclass(slots=True)
class Report:
    period_start: datetime
    period_end: datetime
    calls: int = 0
    calls_in_progress: int = 0
    calls_ended_unexpectedly: int = 0
    total_minutes: float = 0.0
    avg_duration_s: float | None = None
    total_cost_usd: float = 0.0
    cost_per_call_usd: float | None = None
    cost_per_minute_usd: float | None = None
    monthly_projection_usd: float = 0.0
    turns: int = 0
    avg_voice_to_voice_s: float | None = None
    p95_voice_to_voice_s: float | None = None
    escalations: int = 0
    escalation_rate: float | None = None  # fraction of calls, 0..1
    cached_turns: int = 0
    cache_hit_rate: float | None = None  # fraction of turns answered from cache, 0..1
    ai_cost_usd: float = 0.0  # STT + LLM + TTS
    realtime_equivalent_usd: float = 0.0
    realtime_saving_usd: float | None = None
    realtime_saving_pct: float | None = None  # percent, 0..100 (negative: Realtime cheaper)
    cost_by_kind: dict[str, float] = field(default_factory=dict)


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
    start_ts, end_ts = _ts(start), _ts(now)
    path = Path(db_path)
    try:
        conn = connect(path, create=False)
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot open history {path}: {exc}") from exc
    try:
        return _build(conn, Report(period_start=start, period_end=now), start_ts, end_ts,
                      prices)
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read history {path}: {exc}") from exc
    finally:
        conn.close()


def _build(conn: sqlite3.Connection, report: Report, start_ts: float, end_ts: float,
           prices: PricesConfig) -> Report:
    calls = conn.execute(
        "SELECT call_sid, started_at, ended_at, last_activity_at, duration_s, end_reason, "
        "cost_usd, escalated FROM calls WHERE started_at >= ? AND started_at <= ? "
        "ORDER BY started_at", (start_ts, end_ts)).fetchall()
    report.calls = len(calls)
    durations: list[float] = []
    itemized: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    for sid, kind, total in conn.execute(
            "SELECT u.call_sid, u.kind, sum(u.cost_usd) FROM usage u JOIN calls c "
            "ON c.call_sid = u.call_sid WHERE c.started_at >= ? AND c.started_at <= ? "
            "GROUP BY u.call_sid, u.kind", (start_ts, end_ts)):
        itemized[sid] = itemized.get(sid, 0.0) + total
        by_kind[kind] = by_kind.get(kind, 0.0) + total
    # Spend outside any call (e.g. warm-up) counts by when it happened.
    for kind, total in conn.execute(
            "SELECT kind, sum(cost_usd) FROM usage WHERE call_sid IS NULL AND ts >= ? "
            "AND ts <= ? GROUP BY kind", (start_ts, end_ts)):
        by_kind[kind] = by_kind.get(kind, 0.0) + total
    for sid, started, ended, last, duration, end_reason, cost, escalated in calls:
        if ended is None:
            report.calls_in_progress += 1
            duration = max(0.0, last - started)  # up to its last write
        elif end_reason == END_REASON_UNEXPECTED:
            report.calls_ended_unexpectedly += 1
        durations.append(duration or 0.0)
        report.escalations += int(bool(escalated))
        if sid not in itemized and cost:
            by_kind["unitemized"] = by_kind.get("unitemized", 0.0) + cost

    # Rounded to nano-dollars: REAL sums carry float noise far below a cent.
    report.cost_by_kind = {k: round(v, 9) for k, v in sorted(by_kind.items())}
    report.total_cost_usd = round(sum(by_kind.values()), 9)
    report.ai_cost_usd = round(sum(by_kind.get(k, 0.0) for k in AI_KINDS), 9)
    report.total_minutes = sum(durations) / 60.0
    if report.calls:
        report.avg_duration_s = sum(durations) / report.calls
        report.cost_per_call_usd = report.total_cost_usd / report.calls
        report.escalation_rate = report.escalations / report.calls
    if report.total_minutes > 0:
        report.cost_per_minute_usd = report.total_cost_usd / report.total_minutes
    report.monthly_projection_usd = _projection(conn, report.total_cost_usd, start_ts, end_ts)
    _turn_figures(conn, report, start_ts, end_ts, prices)
    return report


def _projection(conn: sqlite3.Connection, total: float, start_ts: float,
                end_ts: float) -> float:
    """Cost per day over the window, times an average month. When the history began
    inside the window, only the days since then count (floored at one hour)."""
    first = conn.execute("SELECT min(started_at) FROM calls").fetchone()[0]
    if first is None or total <= 0:
        return 0.0
    span_s = max(end_ts - max(start_ts, first), 3600.0)
    return total / (span_s / 86400.0) * DAYS_PER_MONTH


def _turn_figures(conn: sqlite3.Connection, report: Report, start_ts: float, end_ts: float,
                  prices: PricesConfig) -> None:
    rows = conn.execute(
        "SELECT t.call_sid, t.cached, t.voice_to_voice_s, t.caller_audio_s, t.agent_audio_s "
        "FROM turns t JOIN calls c ON c.call_sid = t.call_sid "
        "WHERE c.started_at >= ? AND c.started_at <= ? ORDER BY t.call_sid, t.idx",
        (start_ts, end_ts)).fetchall()
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
    report.realtime_equivalent_usd = sum(realtime_conversation_cost(turns, prices)
                                         for turns in per_call.values())
    if report.realtime_equivalent_usd > 0:
        report.realtime_saving_usd = report.realtime_equivalent_usd - report.ai_cost_usd
        report.realtime_saving_pct = (report.realtime_saving_usd
                                      / report.realtime_equivalent_usd * 100.0)


# --- rendering ----------------------------------------------------------------------


def render_report(report: Report, format: ReportFormat = "table") -> str:
    if format == "table":
        return _render_table(report)
    if format == "json":
        return json.dumps(_as_dict(report), indent=2) + "\n"
    if format == "csv":
        return _render_csv(report)
    raise ValueError(f"unknown report format {format!r}: use table, json or csv")


def _as_dict(report: Report) -> dict[str, Any]:
    data = asdict(report)
    data["period_start"] = report.period_start.isoformat()
    data["period_end"] = report.period_end.isoformat()
    return data


def _render_csv(report: Report) -> str:
    data = _as_dict(report)
    by_kind = data.pop("cost_by_kind")
    for kind in sorted(set(by_kind) | {"phone", *AI_KINDS}):
        data[f"cost_{kind}_usd"] = by_kind.get(kind, 0.0)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(data), lineterminator="\n")
    writer.writeheader()
    writer.writerow({k: "" if v is None else v for k, v in data.items()})
    return out.getvalue()


def _usd(value: float | None) -> str:
    if value is None:
        return "-"
    # Per-call and per-minute figures are fractions of a cent: show them in full.
    return f"${value:,.2f}" if abs(value) >= 1 or value == 0 else f"${value:.4f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _duration(value: float | None) -> str:
    if value is None:
        return "-"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _period(report: Report) -> str:
    span = report.period_end - report.period_start
    days = span.total_seconds() / 86400
    if days >= 1 and days == int(days):
        label = f"last {int(days)} day{'s' if days != 1 else ''}"
    else:
        label = f"last {span.total_seconds() / 3600:g} hours"
    fmt = "%Y-%m-%d %H:%M"
    return (f"{label} ({report.period_start.astimezone(UTC).strftime(fmt)} to "
            f"{report.period_end.astimezone(UTC).strftime(fmt)} UTC)")


def _render_table(r: Report) -> str:
    rows: list[tuple[str, str] | str] = ["Calls"]
    rows += [("Calls answered", f"{r.calls:,}"),
             ("Talk time", f"{r.total_minutes:,.1f} min"),
             ("Average call length", _duration(r.avg_duration_s)),
             ("Handed to a person", f"{r.escalations:,} ({_pct(r.escalation_rate)})")]
    if r.calls_ended_unexpectedly:
        rows.append(("Ended unexpectedly", f"{r.calls_ended_unexpectedly:,}"))
    if r.calls_in_progress:
        rows.append(("Still in progress", f"{r.calls_in_progress:,}"))
    rows += ["Cost",
             ("Total cost", _usd(r.total_cost_usd)),
             ("Cost per call", _usd(r.cost_per_call_usd)),
             ("Cost per minute", _usd(r.cost_per_minute_usd)),
             ("Projected monthly bill", _usd(r.monthly_projection_usd))]
    rows += [(f"  {KIND_LABELS.get(kind, kind)}", _usd(usd))
             for kind, usd in r.cost_by_kind.items()]
    rows += ["Speed and quality",
             ("Average response time", _secs(r.avg_voice_to_voice_s)),
             ("95% of responses within", _secs(r.p95_voice_to_voice_s)),
             ("Answered from cache", f"{_pct(r.cache_hit_rate)} of {r.turns:,} turns")]
    rows += ["Compared with the OpenAI Realtime API",
             ("Realtime API would have cost", _usd(r.realtime_equivalent_usd)),
             ("Our speech + AI cost", _usd(r.ai_cost_usd))]
    if r.realtime_saving_pct is not None and r.realtime_saving_usd is not None:
        rows.append(("Saving", f"{_usd(r.realtime_saving_usd)} ({r.realtime_saving_pct:.1f}%)"))
    else:
        rows.append(("Saving", "- (no turns to compare)"))
    width = max(len(row[0]) for row in rows if isinstance(row, tuple)) + 3
    lines = [f"Switchboard report: {_period(r)}", ""]
    for row in rows:
        if isinstance(row, str):
            lines += ["", row] if len(lines) > 2 else [row]
        else:
            lines.append(f"  {row[0]:<{width}}{row[1]}")
    lines.append("")
    lines.append("Phone time is billed per started minute; the Realtime comparison "
                 "leaves out the phone line, paid either way.")
    return "\n".join(lines) + "\n"
