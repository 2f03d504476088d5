"""The history test-suite runs on both backends: `history_backend` is SQLite (a file in
the test's tmp dir) and PostgreSQL (a schema of the test's own on the real server; marked
`postgres`). Tests make histories with `make`, read the stored rows back with `rows`
(the same SQL on both, spelled for each by engine.record.sql) and build the report with
`report`."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine.record.history import CallHistory
from engine.record.report import Report, build_fleet_report, build_report
from engine.record.sql import Dialect, translate
from engine.record.writer import MEMORY_MAX


@dataclass(slots=True)
class HistoryBackend:
    kind: Dialect
    data_dir: Path
    dsn: str = ""  # PostgreSQL's

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "history.sqlite3"

    def make(self, engine_id: str = "", clock: Callable[[], float] = time.time,
             memory_max: int = MEMORY_MAX) -> CallHistory:
        if self.kind == "postgres":
            return CallHistory.postgres(self.dsn, self.data_dir, engine_id, clock, memory_max)
        return CallHistory(self.sqlite_path, engine_id, clock, memory_max)

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows straight from the database (money as float, as the history reads it)."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as conn:
                return conn.execute(translate(sql, "sqlite"), args).fetchall()
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            records = await conn.fetch(translate(sql, "postgres"), *args)
        finally:
            await conn.close()
        return [tuple(float(v) if isinstance(v, Decimal) else v for v in r) for r in records]

    async def report(self, since: timedelta, now: datetime, **kwargs: Any) -> Report:
        if self.kind == "postgres":
            return await build_fleet_report(self.dsn, since, now=now, **kwargs)
        return build_report(self.sqlite_path, since, now=now, **kwargs)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def history_backend(request: pytest.FixtureRequest, tmp_path: Path) -> HistoryBackend:
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        return HistoryBackend("postgres", tmp_path / "data", dsn)
    return HistoryBackend("sqlite", tmp_path / "data")
