"""`switchboard experiments`: each experiment's variants side by side, from the history.

Read-only, like `switchboard report`: this engine's SQLite file or the fleet's
PostgreSQL database. The experiments are those in config.toml (their control and
variant order) and any other the history holds (its first variant taken as control).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.config.experiments import ExperimentConfig
from engine.experiments.compare import METRICS, Comparison, Figure, Metric, Verdict, compare
from engine.experiments.outcomes import VariantOutcomes, experiments_in_history, read_outcomes
from engine.record.database import read_file
from engine.record.sql import Plan


@dataclass(slots=True)
class ExperimentsReport:
    period_start: datetime
    period_end: datetime
    comparisons: list[Comparison]


def _plan(configured: list[ExperimentConfig], start: float, end: float
          ) -> Plan[list[Comparison]]:
    names = yield from experiments_in_history(start, end)
    by_name = {e.name: e for e in configured}
    comparisons = []
    for name in [e.name for e in configured] + [n for n in names if n not in by_name]:
        outcomes: dict[str, VariantOutcomes] = yield from read_outcomes(name, start, end)
        exp = by_name.get(name)
        order = [v.name for v in exp.variants] if exp else sorted(outcomes)
        if not order:
            continue
        comparisons.append(compare(name, exp.control if exp else order[0], outcomes, order))
    return comparisons


def build_experiments_report(db_path: str | Path, configured: list[ExperimentConfig],
                             since: timedelta, now: datetime | None = None
                             ) -> ExperimentsReport:
    now = now or datetime.now(UTC)
    start = now - since
    found = read_file(db_path, _plan(configured, start.timestamp(), now.timestamp()),
                      " (an engine older than experiments wrote it?)")
    return ExperimentsReport(start, now, found)


async def build_fleet_experiments_report(dsn: str, configured: list[ExperimentConfig],
                                         since: timedelta, now: datetime | None = None,
                                         timeout_s: float = 10.0) -> ExperimentsReport:
    from engine.record.postgres_schema import read_dsn  # asyncpg: only for PostgreSQL

    now = now or datetime.now(UTC)
    start = now - since
    found = await read_dsn(dsn, _plan(configured, start.timestamp(), now.timestamp()),
                           timeout_s)
    return ExperimentsReport(start, now, found)


# -- output ------------------------------------------------------------------------------


def _fmt(metric: Metric, value: float | None) -> str:
    if value is None:
        return "-"
    if metric.kind == "rate":
        return f"{value:.1%}"
    if metric.unit == "usd":
        return f"${value:.4f}"
    if metric.unit == "s":
        return f"{value:.2f}s"
    return f"{value:.1f}" if metric.unit == "min" else f"{value:.0f}"


def _cell(metric: Metric, fig: Figure) -> str:
    text = _fmt(metric, fig.value)
    if fig.interval is not None and metric.kind != "count":
        text += f" [{_fmt(metric, fig.interval.low)}, {_fmt(metric, fig.interval.high)}]"
    return text


def _verdict_cell(v: Verdict | None) -> str:
    return "" if v is None else f"{v.text} ({v.test})"


def _table(report: ExperimentsReport) -> str:
    out = [f"Experiments, calls started {report.period_start:%Y-%m-%d %H:%M} to "
           f"{report.period_end:%Y-%m-%d %H:%M} UTC (95 % intervals in brackets)"]
    if not report.comparisons:
        out.append("no experiment calls in this window")
    for comp in report.comparisons:
        others = comp.variants[1:]
        header = ["metric", *(f"{v} (control)" if v == comp.control else v
                              for v in comp.variants), *(f"verdict {v}" for v in others)]
        rows = [header]
        for metric in METRICS:
            rows.append([metric.label,
                         *(_cell(metric, comp.figures[v][metric.key]) for v in comp.variants),
                         *(_verdict_cell(comp.verdicts[v].get(metric.key)) for v in others)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        out.append("")
        out.append(f"experiment {comp.experiment} (control {comp.control})")
        for row in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(out)


def _interval(i: Any) -> dict[str, float] | None:
    return None if i is None else {"estimate": i.estimate, "low": i.low, "high": i.high}


def _as_dict(report: ExperimentsReport) -> dict[str, Any]:
    return {"period_start": report.period_start.isoformat(),
            "period_end": report.period_end.isoformat(),
            "experiments": [{
                "name": c.experiment, "control": c.control, "variants": c.variants,
                "figures": {v: {k: {"value": f.value, "n": f.n,
                                    "interval": _interval(f.interval)}
                                for k, f in figs.items()} for v, figs in c.figures.items()},
                "verdicts": {v: {k: {"text": x.text, "test": x.test,
                                     "significant": x.significant, "direction": x.direction,
                                     "diff": x.diff, "diff_interval": _interval(x.diff_interval),
                                     "p_value": x.p_value, "more_calls": x.more_calls}
                                 for k, x in verdicts.items()}
                             for v, verdicts in c.verdicts.items()},
            } for c in report.comparisons]}


def _csv(report: ExperimentsReport) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["experiment", "variant", "control", "metric", "value", "low", "high",
                     "n", "verdict", "test", "p_value"])
    for c in report.comparisons:
        for v in c.variants:
            for metric in METRICS:
                f = c.figures[v][metric.key]
                verdict = c.verdicts.get(v, {}).get(metric.key)
                writer.writerow([
                    c.experiment, v, int(v == c.control), metric.key,
                    "" if f.value is None else f"{f.value:.6g}",
                    "" if f.interval is None else f"{f.interval.low:.6g}",
                    "" if f.interval is None else f"{f.interval.high:.6g}", f.n,
                    verdict.text if verdict else "", verdict.test if verdict else "",
                    "" if verdict is None or verdict.p_value is None
                    else f"{verdict.p_value:.4g}"])
    return buf.getvalue().rstrip("\n")


def render_experiments(report: ExperimentsReport, format: str = "table") -> str:
    if format == "json":
        return json.dumps(_as_dict(report), indent=2)
    if format == "csv":
        return _csv(report)
    return _table(report)
