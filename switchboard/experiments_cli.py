"""`switchboard experiments`: A/B experiments' variants side by side, with verdicts."""

from __future__ import annotations

import argparse
import asyncio
import sys

from engine.config import Config


def add_history_options(command: argparse.ArgumentParser, format_help: str) -> None:
    """--since, --format and --dsn: the options of a command that reports from the history
    (`switchboard report`, `switchboard experiments`)."""
    command.add_argument("--since", default="30d",
                         help="window: 30d, 12h, 90m, 2w (default 30d)")
    command.add_argument("--format", choices=["table", "json", "csv"], default="table",
                         help=format_help)
    command.add_argument("--dsn", default="", metavar="URL",
                         help="the fleet's PostgreSQL history (default: history.dsn when "
                              "history.backend is postgres, else this engine's SQLite file)")


def add_experiments_command(command: argparse.ArgumentParser) -> None:
    add_history_options(command, "table (default); json: figures, intervals and verdicts; "
                                 "csv: one row per variant and metric")


def run_experiments(config: Config, since_text: str, format: str, dsn: str) -> int:
    from engine.experiments.report import (
        build_experiments_report,
        build_fleet_experiments_report,
        render_experiments,
    )
    from engine.record.database import HistoryError
    from engine.record.report import parse_since

    try:
        since = parse_since(since_text)
    except ValueError as exc:
        print(f"switchboard experiments: {exc}", file=sys.stderr)
        return 2
    dsn = config.report_dsn(dsn)
    try:
        if dsn:  # the fleet's record: every engine's calls
            report = asyncio.run(build_fleet_experiments_report(dsn, config.experiments,
                                                                since))
        else:
            report = build_experiments_report(config.sqlite_history_path(),
                                              config.experiments, since)
    except HistoryError as exc:
        print(f"switchboard experiments: {exc}", file=sys.stderr)
        return 1
    print(render_experiments(report, format))
    return 0
