"""The report as text: a table for people, JSON (the figures and every cost line) or CSV
(one row per cost line, with a header) for a spreadsheet."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from engine.record.bill import BillLine

if TYPE_CHECKING:
    from engine.record.report import Report, ReportFormat

ITEM_LABELS = {"stt": "Speech-to-text", "agent": "Agent (language model)",
               "voice": "Voice (text-to-speech)", "phone": "Phone line (Twilio)",
               "media_stream": "Media Streams (Twilio)", "unitemized": "Unitemized"}
_WIDTH = 92  # the table's text width


def render(report: Report, format: ReportFormat) -> str:
    if format == "table":
        return _table(report)
    if format == "json":
        return json.dumps(_as_dict(report), indent=2) + "\n"
    if format == "csv":
        return _csv(report.lines)
    raise ValueError(f"unknown report format {format!r}: use table, json or csv")


# --- json and csv -----------------------------------------------------------------------


LINE_FIELDS = ("call_sid", "booking", "time", "item", "provider", "model", "quantity", "unit",
               "unit_price_usd", "amount_usd", "estimated", "unpriced", "cached")


def line_record(line: BillLine) -> dict[str, Any]:
    """One cost line as JSON and CSV carry it (`booking`: the lines of one request share
    it)."""
    return dict(zip(LINE_FIELDS, (
        line.call_sid or "", line.usage_id, datetime.fromtimestamp(line.ts, UTC).isoformat(),
        line.item, line.provider, line.model, line.quantity, line.unit, line.unit_price,
        line.amount, line.estimated, line.unpriced, line.cached), strict=True))


def _as_dict(report: Report) -> dict[str, Any]:
    data = asdict(report)
    data["period_start"] = report.period_start.isoformat()
    data["period_end"] = report.period_end.isoformat()
    data["lines"] = [line_record(line) for line in report.lines]
    return data


def _csv(lines: list[BillLine]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LINE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(line_record(line) for line in lines)
    return out.getvalue()


# --- the table --------------------------------------------------------------------------


def _usd(value: float | None) -> str:
    if value is None:
        return "-"
    sign, value = ("-", -value) if value < 0 else ("", value)
    # Per-call and per-minute figures are fractions of a cent: show them in full.
    return sign + (f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _duration(value: float | None) -> str:
    if value is None:
        return "-"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _span(days: float) -> str:
    """The projection's basis: "7 days", "1.5 days", "3 hours"."""
    count, unit = (days, "day") if days >= 1 else (days * 24, "hour")
    return f"{count:.3g} {unit}{'' if count == 1 else 's'}"


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


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


def _pairs(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in rows) + 3
    return [f"  {label:<{width}}{value}" for label, value in rows]


def _cost_section(r: Report) -> list[str]:
    rows = [(ITEM_LABELS.get(item, item), split.usd, split.per_call_usd,
             split.per_minute_usd) for item, split in r.cost_by_item.items()]
    rows += [("AI (speech-to-text + agent + voice)", r.ai_cost_usd, r.ai_cost_per_call_usd,
              r.ai_cost_per_minute_usd),
             ("All in", r.total_cost_usd, r.cost_per_call_usd, r.cost_per_minute_usd)]
    unpriced = "none" if not r.unpriced_lines else (
        f"{_plural(r.unpriced_lines, 'line')} ({', '.join(r.unpriced_models)})")
    month = r.period_end.astimezone(UTC).strftime("%B %Y")
    notes = [("Estimated (not reported by the provider)",
              f"{_usd(r.estimated_usd)} in {_plural(r.estimated_lines, 'line')}"),
             ("Unpriced (no price: counted as $0)", unpriced),
             ("Projected monthly bill", _usd(r.monthly_projection_usd)),
             ("  based on", f"{_usd(r.projection_daily_usd)} a day over the last "
                            f"{_span(r.projection_days)} x {r.projection_month_days} days "
                            f"({month})")]
    width = max(len(label) for label in [row[0] for row in rows] + [n[0] for n in notes]) + 3
    lines = [f"{'Cost':<{width + 2}}{'in all':>10}{'per call':>12}{'per call-minute':>18}"]
    lines += [f"  {label:<{width}}{_usd(usd):>10}{_usd(call):>12}{_usd(minute):>18}"
              for label, usd, call, minute in rows]
    return lines + [f"  {label:<{width}}{value}" for label, value in notes]


def _realtime_section(r: Report) -> list[str]:
    a = r.realtime_assumptions
    saving = ("- (no turns to compare)" if r.realtime_saving_pct is None
              or r.realtime_saving_usd is None
              else f"{_usd(r.realtime_saving_usd)} ({r.realtime_saving_pct:.1f}%)")
    compared = [
        ("Realtime API would have cost", f"{_usd(r.realtime_equivalent_usd)} "
                                         f"({_usd(r.realtime_per_minute_usd)} per call-minute)"),
        ("Our speech + AI cost", f"{_usd(r.ai_cost_usd)} "
                                 f"({_usd(r.ai_cost_per_minute_usd)} per call-minute)"),
        ("Saving", saving)]
    lines = ["Compared with the OpenAI Realtime API", *_pairs(compared)]
    if a:
        assumptions = (
            f"Assumptions: the caller's audio is {a['realtime_caller_tokens_per_minute']:g} "
            f"audio tokens a minute in at ${a['realtime_audio_in']:.2f} per 1M, the agent's "
            f"{a['realtime_agent_tokens_per_minute']:g} a minute out at "
            f"${a['realtime_audio_out']:.2f} per 1M (prices.realtime_*); the conversation is "
            f"re-billed as cached input (${a['realtime_audio_cached_in']:.2f} per 1M) every "
            "turn; the system prompt is left out, so it understates Realtime. Twilio's "
            "minutes are paid either way and left out of both.")
        lines += textwrap.wrap(assumptions, _WIDTH, initial_indent="  ",
                               subsequent_indent="  ", break_on_hyphens=False)
    return lines


def _table(r: Report) -> str:
    calls = [("Calls answered", f"{r.calls:,}"),
             ("Talk time", f"{r.total_minutes:,.1f} min"),
             ("Average call length", _duration(r.avg_duration_s)),
             ("Handed to a person", f"{r.escalations:,} ({_pct(r.escalation_rate)})")]
    if r.calls_ended_unexpectedly:
        calls.append(("Ended unexpectedly", f"{r.calls_ended_unexpectedly:,}"))
    if r.calls_in_progress:
        calls.append(("Still in progress", f"{r.calls_in_progress:,}"))
    speed = [("Average response time", _secs(r.avg_voice_to_voice_s)),
             ("95% of responses within", _secs(r.p95_voice_to_voice_s)),
             ("Answered wholly from cache", f"{_pct(r.cache_hit_rate)} of "
                                            f"{_plural(r.turns, 'turn')}"),
             ("Answer cache", f"{r.answer_cache_hits:,} of "
                              f"{_plural(r.agent_requests, 'agent request')}"),
             ("Audio cache", f"{r.audio_cache_hits:,} of "
                             f"{_plural(r.voice_requests, 'voice request')}")]
    out = [f"Switchboard report: {_period(r)}", "", "Calls", *_pairs(calls), "",
           *_cost_section(r), "", "Speed and quality", *_pairs(speed), "",
           *_realtime_section(r), "",
           "Phone and media-stream time is billed per started minute. --format json or csv "
           "lists every cost line."]
    return "\n".join(out) + "\n"
