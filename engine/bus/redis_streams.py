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
from collections.abc import AsyncGenerator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from engine.bus.event_bus import (
    FROM_OLDEST,
    BusClosedError,
    BusError,
    BusHealth,
    BusPublishError,
)
from engine.bus.events import BusGap, Event, EventDecodeError, decode_event, encode_event
from engine.bus.redis_replies import (
    ZERO_ID,
    StreamId,
    StreamInfo,
    format_id,
    id_before,
    is_no_such_key,
    parse_info,
    parse_stream_id,
    stream_entries,
    text,
)
from engine.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")

_DROPS_LOGGED_EVERY = 1000  # while events are dropped, one warning per this many
_PING_TIMEOUT_S = 1.0


@dataclass(slots=True)
class _ReadPosition:
    """Where one subscription is: its cursor (None until pinned to the stream's newest
    id), whether the next read must check for trimming, and what it saw so far."""

    cursor: StreamId | None
    check: bool
    failures: int = 0
    last_seq: dict[str, int] = field(default_factory=dict)  # engine_id -> last seq seen


class _Closed(Exception):
    """The bus closed while a subscription was waiting on Redis."""


class RedisEventBus:
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

    # --- subscribing --------------------------------------------------------------

    def subscribe(self, after: str | None = None) -> AsyncGenerator[tuple[str, Event], None]:
        # Validate now so a bad cursor fails at the call, not at the first iteration.
        start = None if after is None else parse_stream_id(after)
        return self._iterate(start)

    async def _iterate(self, start: StreamId | None) -> AsyncGenerator[tuple[str, Event], None]:
        reader: aioredis.Redis = aioredis.from_url(
            self._url, socket_timeout=self._reader_socket_timeout_s,
            socket_connect_timeout=self._connect_timeout_s,
            client_name=self.reader_client_name, max_connections=2,
            retry=Retry(NoBackoff(), 0))  # this loop reconnects, from its own cursor
        self._readers.add(reader)
        closed_waiter = asyncio.ensure_future(self._closed_event.wait())
        # A given cursor may have been trimmed away meanwhile: verify on the first read.
        pos = _ReadPosition(cursor=start, check=start is not None and start != ZERO_ID)
        try:
            while not self._closed:
                try:
                    batch = await self._until_closed(closed_waiter,
                                                     self._next_batch(reader, pos))
                except _Closed:
                    return
                except (RedisError, OSError) as exc:
                    pos.failures += 1
                    delay = self._backoff(pos.failures)
                    log.warning("bus.reader_error", error=repr(exc),
                                cursor=format_id(pos.cursor) if pos.cursor else None,
                                failures=pos.failures, retry_in_s=round(delay, 2))
                    await asyncio.wait({closed_waiter}, timeout=delay)
                    pos.check = True
                    continue
                if batch is None:  # the cursor was just pinned to the stream's newest id
                    continue
                if pos.failures:
                    log.info("bus.reader_recovered", after_failures=pos.failures)
                    pos.failures = 0
                gap, entries = batch
                if gap is not None:
                    pos.last_seq.clear()  # the gap already reports this loss
                    yield gap
                for item in self._events(entries, pos):
                    yield item
                # A full batch means this reader is behind: check for trimming next time.
                pos.check = len(entries) >= self._read_count
        finally:
            closed_waiter.cancel()
            self._readers.discard(reader)
            with contextlib.suppress(RedisError, OSError):
                await reader.aclose()

    async def _next_batch(self, reader: aioredis.Redis, pos: _ReadPosition,
                          ) -> tuple[tuple[str, BusGap] | None, list[Any]] | None:
        """The entries after the cursor, and a gap to report before them; None when
        there was no cursor yet and it was just pinned to the stream's newest id."""
        if pos.cursor is None:
            info = await self._stream_info(reader)
            pos.cursor = info.last_generated if info else ZERO_ID
            return None
        if pos.check:
            info, entries = await self._checked_read(reader, pos.cursor)
            gap, pos.cursor, entries = self._find_gap(info, pos.cursor, entries)
            pos.check = False
            return gap, entries
        return None, await self._read(reader, pos.cursor, self._block_ms)

    def _events(self, entries: list[Any], pos: _ReadPosition,
                ) -> Iterator[tuple[str, Event]]:
        """Decoded events, moving the cursor; a BusGap first when an engine's seq jumped."""
        cursor = pos.cursor
        assert cursor is not None  # entries are read after a cursor
        for raw_id, fields in entries:
            entry_id = text(raw_id)
            previous, cursor = cursor, parse_stream_id(entry_id)
            pos.cursor = cursor
            event = self._decode_entry(entry_id, fields)
            if event is None:
                continue
            if event.seq > 0:
                seen = pos.last_seq.get(event.engine_id)
                if seen is not None and event.seq <= seen:
                    continue  # sent again after a round trip that failed but had landed
                if seen is not None and event.seq > seen + 1:
                    yield format_id(previous), BusGap(
                        engine_id=event.engine_id, missed_after=format_id(previous),
                        missed_until=entry_id, count=event.seq - seen - 1, reason="seq_jump")
                pos.last_seq[event.engine_id] = event.seq
            yield entry_id, event

    def _decode_entry(self, entry_id: str, fields: Any) -> Event | None:
        data = fields.get(b"data") if isinstance(fields, dict) else None
        if data is None:
            log.warning("bus.undecodable_entry", entry_id=entry_id, error="no 'data' field")
            return None
        try:
            return decode_event(data)
        except EventDecodeError as exc:
            log.warning("bus.undecodable_entry", entry_id=entry_id, error=str(exc))
            return None

    def _find_gap(self, info: StreamInfo | None, cursor: StreamId, entries: list[Any],
                  ) -> tuple[tuple[str, BusGap] | None, StreamId, list[Any]]:
        """After a (re)connect or while behind: does the stream still hold our cursor?"""
        if cursor == ZERO_ID:
            return None, cursor, entries
        after = format_id(cursor)
        if info is None or info.last_generated < cursor:
            # The stream is gone or was recreated (Redis restarted without persistence,
            # flushed, or failed over): whatever it held after our cursor is lost, and
            # its new ids may sort below our cursor, so start over from its beginning.
            log.warning("bus.stream_reset", cursor=after)
            gap = BusGap(missed_after=after, reason="stream_reset")
            return (FROM_OLDEST, gap), ZERO_ID, []
        if info.first_entry is not None and id_before(info.first_entry) > cursor:
            # Ids lie between our cursor and the first retained entry: entries there may
            # have been trimmed (MAXLEN) before we read them.
            first = format_id(info.first_entry)
            log.warning("bus.reader_trimmed", cursor=after, first_retained=first)
            gap = BusGap(missed_after=after, missed_until=first, reason="trimmed")
            return (format_id(id_before(info.first_entry)), gap), cursor, entries
        return None, cursor, entries

    async def _until_closed(self, closed_waiter: asyncio.Future[Any],
                            operation: Awaitable[T]) -> T:
        """Await `operation`, or raise _Closed as soon as the bus closes."""
        task = asyncio.ensure_future(operation)
        try:
            await asyncio.wait({task, closed_waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()  # cancelling a redis-py command drops its connection
                await asyncio.wait({task})
        if task.cancelled():
            raise _Closed
        return task.result()

    async def _read(self, reader: aioredis.Redis, cursor: StreamId,
                    block_ms: int | None) -> list[Any]:
        response = await reader.xread({self.stream_key: format_id(cursor)},
                                      count=self._read_count, block=block_ms)
        return stream_entries(response, self.stream_key)

    async def _checked_read(self, reader: aioredis.Redis, cursor: StreamId,
                            ) -> tuple[StreamInfo | None, list[Any]]:
        # MULTI: the stream's bounds and the entries after our cursor, atomically, so
        # nothing can be trimmed between the check and the read.
        pipe = reader.pipeline(transaction=True)
        pipe.xinfo_stream(self.stream_key)
        pipe.xread({self.stream_key: format_id(cursor)}, count=self._read_count)
        info_reply, read_reply = await pipe.execute(raise_on_error=False)
        info = parse_info(info_reply)
        if isinstance(read_reply, Exception):
            raise read_reply
        return info, stream_entries(read_reply, self.stream_key)

    async def _stream_info(self, client: aioredis.Redis) -> StreamInfo | None:
        try:
            reply = await client.xinfo_stream(self.stream_key)
        except ResponseError as exc:
            if is_no_such_key(exc):
                return None
            raise
        return parse_info(reply)

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
