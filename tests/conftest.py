"""Shared fixtures. Redis fixtures start a real redis-server (or use REDIS_URL); they skip
when none exists, unless SWITCHBOARD_REQUIRE_REDIS=1 (set by .ci/run) makes them fail.
PostgreSQL fixtures use the server on 127.0.0.1:5432 (a database per run, a schema per
test); likewise mandatory with SWITCHBOARD_REQUIRE_POSTGRES=1."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import structlog

from engine.bus.event_bus import EventBus
from engine.bus.memory import MemoryEventBus
from engine.bus.redis_streams import RedisEventBus
from tests.history_backends import history_backend  # noqa: F401
from tests.postgres_server import postgres_database, postgres_dsn  # noqa: F401
from tests.redis_server import redis_server, redis_url  # noqa: F401

BusFactory = Callable[..., Awaitable[EventBus]]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def make_bus(request: pytest.FixtureRequest) -> AsyncIterator[BusFactory]:
    """Each test runs on both buses: in-process, and Redis Streams on a real server."""
    buses: list[EventBus] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    async def factory(maxlen: int = 1000, block_ms: int = 500) -> EventBus:
        bus: EventBus
        if request.param == "memory":
            bus = MemoryEventBus(maxlen=maxlen)
        else:
            bus = RedisEventBus(url, key_prefix=prefix, maxlen=maxlen, block_ms=block_ms)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.aclose()


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A test that configures logging (the demo, the CLI) must not change what the next
    test's `capture_logs` sees."""
    yield
    structlog.reset_defaults()
