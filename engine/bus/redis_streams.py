"""Event bus on a Redis Stream, shared by every engine and console of a deployment.

Layout: one stream `{key_prefix}:events`, entries `data=<encoded event>`, appended with
`XADD … MAXLEN ~ maxlen`. Engines tell their events apart by `engine_id` (stamped by
events.EventStamper). Readers use plain XREAD (every reader sees every event), not
consumer groups, which would split events between readers.

Publishing: concurrent publish() calls are batched into one pipelined round trip (the
engine emits thousands of events per second at 200 calls). While Redis is unreachable,
events wait in a buffer of at most `buffer_max` (the oldest first) that is retried with
backoff and sent in order when Redis returns; publish() returns then. An event that
finds the buffer full is dropped at once (BusPublishError, counted): the publisher's seq
jumps, so readers see the drop as a gap with its exact count after the buffered events.
A batch re-sent after a round trip that failed but had landed is not read twice: readers
skip an engine's seq they already saw.

Reading: each subscription holds its own connection (a blocking XREAD ties up its
connection) and blocks for `block_ms`, below the socket timeout, so a dead connection is
noticed instead of hanging. On any Redis error it logs, backs off with jitter, reconnects
and goes on from its last id: nothing still in the stream is missed. Possible loss is
reported as a BusGap: the stream no longer holds the reader's cursor (trimmed while it
was away or behind, or Redis lost the stream), or an engine's seq jumped (its publishes
failed, or its events were trimmed before this reader got them). Undecodable entries are
logged and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from engine.bus.event_bus import (
    FROM_OLDEST,
    BusClosedError,
    BusError,
    BusHealth,
    BusPublishError,
)
from engine.bus.events import BusGap, Event, encode_event
from engine.bus.redis_reading import RedisStreamReading
from engine.bus.redis_replies import (
    format_id,
    text,
)
from engine.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")

_DROPS_LOGGED_EVERY = 1000  # while events are dropped, one warning per this many
_PING_TIMEOUT_S = 1.0


class RedisEventBus(RedisStreamReading):
    def __init__(self, url: str, *, key_prefix: str = "switchboard", maxlen: int = 100_000,
                 block_ms: int = 2_000, read_count: int = 500,
                 socket_timeout_s: float = 5.0, connect_timeout_s: float = 2.0,
                 publish_batch: int = 256, backoff_base_s: float = 0.1,
                 backoff_max_s: float = 5.0, client_name: str = "switchboard-bus",
                 buffer_max: int = 10_000) -> None:
        if maxlen < 1 or buffer_max < 1:
            raise ValueError(f"stream maxlen and buffer_max must be >= 1, got {maxlen}, "
                             f"{buffer_max}")
        self.stream_key = f"{key_prefix}:events"
        self._url = url
        self._maxlen = maxlen
        self._block_ms = block_ms
        self._read_count = read_count
        self._connect_timeout_s = connect_timeout_s
        # redis-py 8 defaults socket_timeout to 5 s; a blocking XREAD must return before
        # the socket times out, so readers get block time + margin.
        self._reader_socket_timeout_s = block_ms / 1000 + socket_timeout_s
        self._publish_batch = publish_batch
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self.client_name = client_name
        self.reader_client_name = f"{client_name}-reader"
        # One retry: reconnects once after an idle connection died (server restart),
        # but never stalls a caller through a series of retries.
        self._client: aioredis.Redis = aioredis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
            health_check_interval=30, client_name=client_name, retry=Retry(NoBackoff(), 1))
        self._pending: list[tuple[bytes, asyncio.Future[str]]] = []
        self._in_flight: list[tuple[bytes, asyncio.Future[str]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._buffer_max = buffer_max
        self._publish_failures = 0
        self._reachable = True
        self._last_error: str | None = None
        self._dropped = 0
        self._dropped_before_outage = 0
        self._closed = False
        self._closed_event = asyncio.Event()
        self._readers: set[aioredis.Redis] = set()

    # --- publishing ---------------------------------------------------------------

    async def publish(self, event: Event) -> str:
        if self._closed:
            raise BusClosedError("redis event bus is closed")
        if isinstance(event, BusGap):
            raise ValueError("BusGap is produced by subscriptions, it cannot be published")
        if len(self._pending) + len(self._in_flight) >= self._buffer_max:
            self._drop(1)
            raise BusPublishError(f"event buffer full ({self._buffer_max} waiting for "
                                  "Redis): event dropped")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((encode_event(event), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="event-bus-flush")
        return await future

    async def _flush(self) -> None:
        try:
            await self._flush_pending()
        except BaseException as exc:  # cancelled at shutdown: no caller may hang
            self._give_up(BusClosedError(f"event bus flush stopped: {exc!r}"))
            raise

    async def _flush_pending(self) -> None:
        # Everything queued while the previous round trip was in flight goes in the next.
        while self._pending:
            batch = self._pending[: self._publish_batch]
            del self._pending[: self._publish_batch]
            self._in_flight = batch
            pipe = self._client.pipeline(transaction=False)
            for payload, _ in batch:
                pipe.xadd(self.stream_key, {"data": payload}, maxlen=self._maxlen,
                          approximate=True)
            try:
                ids = await pipe.execute()
            except (RedisError, OSError) as exc:
                self._pending[:0] = batch  # first in line again: the order holds
                self._in_flight = []
                if not await self._wait_to_retry(exc):
                    return
                continue
            self._in_flight = []
            self._recovered()
            for (_, future), entry_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(text(entry_id))

    async def _wait_to_retry(self, exc: BaseException) -> bool:
        """After a failed round trip: wait out the backoff; False when the bus closed and
        the buffer was given up."""
        if self._closed:  # aclose already gave the buffer its last chance
            self._give_up(BusClosedError(f"bus closed while Redis was unreachable: {exc!r}"))
            return False
        self._publish_failures += 1
        if self._reachable:
            self._dropped_before_outage = self._dropped
        self._reachable = False
        self._last_error = repr(exc)
        delay = self._backoff(self._publish_failures)
        # One line per failed round trip, not per event: an outage must not flood the log.
        log.warning("bus.publish_failed", error=repr(exc), buffered=len(self._pending),
                    failures=self._publish_failures, retry_in_s=round(delay, 2))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed_event.wait(), timeout=delay)
        return True  # retried: once more at once if the bus closed meanwhile

    def _recovered(self) -> None:
        if self._reachable:
            return
        log.info("bus.publish_recovered", after_failures=self._publish_failures,
                 dropped=self._dropped - self._dropped_before_outage)
        self._publish_failures = 0
        self._reachable = True
        self._last_error = None

    def _drop(self, count: int) -> None:
        before = self._dropped
        self._dropped += count
        if before == self._dropped_before_outage or \
                before // _DROPS_LOGGED_EVERY != self._dropped // _DROPS_LOGGED_EVERY:
            log.warning("bus.events_dropped", dropped=self._dropped,
                        buffer_max=self._buffer_max, error=self._last_error)

    def _give_up(self, error: Exception) -> None:
        """Fail every event still waiting (the bus is closing): they are dropped."""
        waiting = self._in_flight + self._pending
        self._in_flight, self._pending = [], []
        unsent = [future for _, future in waiting if not future.done()]
        if unsent:
            self._drop(len(unsent))
            for future in unsent:
                future.set_exception(error)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._backoff_max_s, self._backoff_base_s * 2 ** min(failures - 1, 16))
        return random.uniform(ceiling / 2, ceiling)  # jitter: readers do not reconnect in step

    def health(self) -> BusHealth:
        return BusHealth(backend="redis", reachable=self._reachable,
                         buffered=len(self._pending) + len(self._in_flight),
                         dropped=self._dropped, last_error=self._last_error)

    async def check(self) -> BusHealth:
        # While events wait, the flusher's retries tell; otherwise a ping does.
        if not self._closed and not (self._pending or self._in_flight):
            try:
                await asyncio.wait_for(self._client.ping(), timeout=_PING_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                self._reachable, self._last_error = False, repr(exc)
            else:
                self._reachable, self._last_error = True, None
        return self.health()

    async def latest_id(self) -> str:
        try:
            info = await self._stream_info(self._client)
        except (RedisError, OSError) as exc:
            raise BusError(f"redis unreachable: {exc!r}") from exc
        return format_id(info.last_generated) if info else FROM_OLDEST

    # --- lifecycle ----------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        if self._flusher is not None and not self._flusher.done():
            # Let events already handed to publish() reach Redis (bounded wait).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._flusher), timeout=2.0)
        # Readers close their own connections when their iterators finish; close those
        # left suspended by a consumer that stopped iterating.
        for reader in list(self._readers):
            with contextlib.suppress(RedisError, OSError):
                await reader.aclose()
        self._readers.clear()
        await self._client.aclose()
