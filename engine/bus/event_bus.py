"""The event bus interface and the factory that picks a backend from the configuration.

Semantics shared by every backend:
- `publish` appends one (already stamped, see events.EventStamper) event and returns its
  id. Ids are opaque cursors of one bus: pass them back to `subscribe(after=...)`, do not
  parse or compare them.
- `subscribe(after)` yields `(id, event)` in publish order, starting after `after`
  (exclusive). `after=None`: only events published from the first iteration on;
  `FROM_OLDEST`: everything still retained. Use `latest_id()` to pin "now" first, e.g.
  take the cursor, build a snapshot, then subscribe after that cursor.
- Every subscriber sees every event (a fan-out log, not a work queue) and has its own
  cursor: a slow subscriber never blocks the publisher or other subscribers.
- Loss is never silent: when a subscriber fell behind what the bus retains (or the Redis
  stream was lost), it receives a `BusGap` event in the stream at that point, whose id is
  a cursor to resume after without seeing the gap again. Refetch a snapshot on a gap.
- A backend that is unreachable does not lose events at once: they wait in a bounded
  buffer and are sent in order when it returns; beyond the bound they are dropped,
  counted (`health().dropped`) and seen by readers as a gap.
- A subscription is an async generator: `await sub.aclose()` one you stop reading before
  the bus closes (a Redis subscription holds a connection of its own).
- `aclose()` ends all subscriptions (their iterators finish) and rejects later publishes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from engine.bus.events import Event

if TYPE_CHECKING:
    from engine.config import Config

# Subscribe from the oldest retained event (valid for both backends).
FROM_OLDEST = "0"


class BusError(Exception):
    """Base class of bus failures."""


class BusClosedError(BusError):
    """The bus was closed; nothing more can be published."""


class BusPublishError(BusError):
    """The event was dropped: Redis is unreachable and the buffer is full. The engine
    logs and goes on; readers see the hole as a seq jump (BusGap)."""


@dataclass(slots=True, frozen=True)
class BusHealth:
    """Whether events reach the backend; counts are since the bus was made."""

    backend: str  # "memory" | "redis"
    reachable: bool
    buffered: int = 0  # events waiting for the backend
    dropped: int = 0  # events lost: buffer full, or the bus closed with them unsent
    last_error: str | None = None


@runtime_checkable
class EventBus(Protocol):
    async def publish(self, event: Event) -> str:
        """Append a stamped event; returns its id. Raises BusPublishError/BusClosedError."""
        ...

    def subscribe(self, after: str | None = None) -> AsyncGenerator[tuple[str, Event], None]:
        """Events after `after` (exclusive), in order, until the bus closes."""
        ...

    async def latest_id(self) -> str:
        """The id of the newest event, or FROM_OLDEST when there is none. Raises BusError
        when the backend is unreachable."""
        ...

    def health(self) -> BusHealth:
        """As last seen (no I/O): for metrics."""
        ...

    async def check(self) -> BusHealth:
        """As it is now: asks the backend (bounded wait) when nothing else did lately."""
        ...

    async def aclose(self) -> None: ...


def make_event_bus(config: Config) -> EventBus:
    """The bus selected by `config.bus.backend` ("memory" or "redis")."""
    backend = config.bus.backend
    if backend == "memory":
        from engine.bus.memory import MemoryEventBus

        return MemoryEventBus(maxlen=config.bus.memory_maxlen)
    if backend == "redis":
        if not config.redis.url:
            raise ValueError("bus.backend is 'redis' but redis.url (env REDIS_URL) is empty")
        # Imported lazily: the embedded default never loads the Redis client.
        from engine.bus.redis_streams import RedisEventBus

        return RedisEventBus(config.redis.url, key_prefix=config.redis.key_prefix,
                             maxlen=config.bus.stream_maxlen,
                             buffer_max=config.bus.buffer_max)
    raise ValueError(f"unknown bus backend {backend!r}; expected 'memory' or 'redis'")
