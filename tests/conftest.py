"""Shared fixtures. Redis fixtures start a real redis-server (or use REDIS_URL); they skip
when none exists, unless SWITCHBOARD_REQUIRE_REDIS=1 (set by .ci/run) makes them fail."""

from collections.abc import Iterator

import pytest
import structlog

from tests.redis_server import redis_server, redis_url  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A test that configures logging (the demo, the CLI) must not change what the next
    test's `capture_logs` sees."""
    yield
    structlog.reset_defaults()
