"""A real PostgreSQL for tests: the server on 127.0.0.1:5432 (or SWITCHBOARD_TEST_POSTGRES),
a database of this run's own (`sb_test_<random>`, dropped at the end) and a schema of
each test's own in it, so runs and tests never see each other's rows.

Fixtures for conftest.py:
- `postgres_database`: the run's database DSN (session-wide).
- `postgres_dsn`: a DSN whose search_path is a fresh schema (one per test).
Both skip when no server answers, unless SWITCHBOARD_REQUIRE_POSTGRES=1 (CI): then they
fail, so a broken CI image cannot pass by skipping every PostgreSQL test.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

REQUIRE_ENV = "SWITCHBOARD_REQUIRE_POSTGRES"
SERVER_ENV = "SWITCHBOARD_TEST_POSTGRES"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but {reason}")
    pytest.skip(f"no PostgreSQL: {reason}")


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _admin(dsn: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        _unavailable("asyncpg is not installed")
    server = os.environ.get(SERVER_ENV, DEFAULT_SERVER)
    name = f"sb_test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin(server, f"CREATE DATABASE {name}"))
    except Exception as exc:
        _unavailable(f"cannot create a database on {server}: {exc}")
    try:
        yield with_database(server, name)
    finally:
        asyncio.run(_admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
async def postgres_dsn(postgres_database: str) -> AsyncIterator[str]:
    """A DSN to a schema of this test's own (asyncpg passes `search_path` to the server)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    await _admin(postgres_database, f"CREATE SCHEMA {schema}")
    yield f"{postgres_database}?search_path={schema}"
    await _admin(postgres_database, f"DROP SCHEMA {schema} CASCADE")
