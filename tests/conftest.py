"""Shared fixtures. Redis fixtures start a real redis-server (or use REDIS_URL); they skip
when none exists, unless SWITCHBOARD_REQUIRE_REDIS=1 (set by .ci/run) makes them fail."""

from tests.redis_server import redis_server, redis_url  # noqa: F401
