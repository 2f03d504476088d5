"""History SQL written once, run by either backend (SQLite or PostgreSQL).

A write kind or a read is a *plan*: a generator that yields `Stmt`s and is sent each one's
result, so what it does (and what it does with a result: a new row's id, the sids it
closes) is written once, while each backend runs the statements its own way (SQLite on
the writer thread, asyncpg on the loop). Statements use `?` placeholders and two
pseudo-functions each dialect spells its own way: `greatest(a, b)` (SQLite's scalar
`max`) and `utc_day(ts)` (the 'YYYY-MM-DD' UTC date of epoch seconds).
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")
Dialect = Literal["sqlite", "postgres"]
Fetch = Literal["none", "rows", "value"]


@dataclass(slots=True, frozen=True)
class Stmt:
    """One statement: `fetch` says what the plan is sent back (nothing, every row as a
    tuple, or the first column of the first row); `many` runs it once per args tuple."""

    sql: str
    args: Sequence[Any] = ()
    fetch: Fetch = "none"
    many: bool = False


Plan = Generator[Stmt, Any, T]
PlanFactory = Callable[[], Plan[T]]

_UTC_DAY = re.compile(r"utc_day\((\w+(?:\.\w+)?)\)")
_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=512)
def translate(sql: str, dialect: Dialect) -> str:
    """`sql` in the dialect's own spelling (cached: the statements are few and fixed)."""
    if dialect == "sqlite":
        sql = sql.replace("greatest(", "max(")
        return _UTC_DAY.sub(r"date(\1, 'unixepoch')", sql)
    sql = _UTC_DAY.sub(r"to_char(to_timestamp(\1) AT TIME ZONE 'UTC', 'YYYY-MM-DD')", sql)
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


def run_sqlite(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """Run `plan` on a SQLite connection (inside the caller's transaction)."""
    try:
        stmt = next(plan)
        while True:
            sql = translate(stmt.sql, "sqlite")
            if stmt.many:
                conn.executemany(sql, stmt.args)
                result: Any = None
            else:
                cursor = conn.execute(sql, stmt.args)
                result = (cursor.fetchall() if stmt.fetch == "rows" else
                          _first(cursor.fetchone()) if stmt.fetch == "value" else None)
            stmt = plan.send(result)
    except StopIteration as done:
        return done.value


class AsyncConnection(Protocol):
    """What a plan needs of an asyncpg connection."""

    async def execute(self, query: str, *args: Any) -> str: ...
    async def executemany(self, command: str, args: Any) -> None: ...
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...


async def run_postgres(conn: AsyncConnection, plan: Plan[T]) -> T:
    """Run `plan` on an asyncpg connection (inside the caller's transaction). NUMERIC
    values (money) come back as floats, as from SQLite."""
    try:
        stmt = next(plan)
        while True:
            sql = translate(stmt.sql, "postgres")
            result: Any = None
            if stmt.many:
                await conn.executemany(sql, stmt.args)
            elif stmt.fetch == "rows":
                result = [tuple(_plain(v) for v in row) for row in await conn.fetch(sql,
                                                                                    *stmt.args)]
            elif stmt.fetch == "value":
                result = _plain(await conn.fetchval(sql, *stmt.args))
            else:
                await conn.execute(sql, *stmt.args)
            stmt = plan.send(result)
    except StopIteration as done:
        return done.value


def _first(row: tuple[Any, ...] | None) -> Any:
    return None if row is None else row[0]


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value
