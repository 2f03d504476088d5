"""Where the fleet lives in Redis, and the one link to it every fleet part uses.

    {prefix}:engines              sorted set: engine id -> its last heartbeat (unix s)
    {prefix}:engine:<id>          hash: name, address, load, draining, started_at,
                                  heartbeat_at; expires `dead_after_s` after the last
                                  heartbeat, so Redis's own clock says who is alive
    {prefix}:engine:<id>:calls    hash: call sid -> started_at, the calls the engine owns
    {prefix}:lost:<id>            claim (SET NX) of the one watcher marking a dead
                                  engine's calls lost

Engine ids are per process start (events carry the same id), so a restarted engine is a
new member and never inherits the calls its previous process left behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from engine.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# The errors a fleet operation may meet while Redis is away or slow.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


@dataclass(frozen=True)
class FleetKeys:
    prefix: str

    @property
    def engines(self) -> str:
        return f"{self.prefix}:engines"

    def engine(self, engine_id: str) -> str:
        return f"{self.prefix}:engine:{engine_id}"

    def calls(self, engine_id: str) -> str:
        return f"{self.prefix}:engine:{engine_id}:calls"

    def lost(self, engine_id: str) -> str:
        return f"{self.prefix}:lost:{engine_id}"


def fleet_client(url: str, op_timeout_s: float, name: str) -> aioredis.Redis:
    """A client that fails fast: one reconnect after an idle connection died, never a
    series of retries that would hold a heartbeat past its turn."""
    client: aioredis.Redis = aioredis.from_url(
        url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s,
        client_name=name, decode_responses=True, retry=Retry(NoBackoff(), 1))
    return client


class FleetRedis:
    """The fleet's client, its keys, and whether Redis answers. Every operation is
    bounded by `op_timeout_s`; a failure returns None and is logged once per outage (the
    first failure logs, the next success says it is over)."""

    def __init__(self, client: aioredis.Redis, keys: FleetKeys, op_timeout_s: float) -> None:
        self.client = client
        self.keys = keys
        self.op_timeout_s = op_timeout_s
        self.down = False
        self.down_since = 0.0  # monotonic
        self.failures = 0
        # Told of every failure (the membership then rewrites its calls at the next beat).
        self.on_failure: Callable[[], None] = lambda: None

    async def run(self, op: Callable[[aioredis.Redis], Awaitable[T]], what: str) -> T | None:
        try:
            async with asyncio.timeout(self.op_timeout_s):
                return await op(self.client)
        except REDIS_FAILURES as exc:
            self.failed(what, exc)
            return None

    def failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        self.on_failure()
        if not self.down:
            self.down, self.down_since = True, time.monotonic()
            log.warning("fleet.redis_unreachable", op=what,
                        error=str(exc) or type(exc).__name__,
                        effect="heartbeats paused, calls go on, no engine declared dead")

    def succeeded(self) -> float | None:
        """After an operation that worked: how long the outage it ends lasted (None when
        there was none)."""
        if not self.down:
            return None
        self.down = False
        lasted = time.monotonic() - self.down_since
        log.info("fleet.redis_back", down_s=round(lasted, 1))
        return lasted

    async def aclose(self) -> None:
        await self.client.aclose()
