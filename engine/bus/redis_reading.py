"""Reading the event stream from Redis: subscriptions, each on a connection of its own,
resuming from their last id after any error and reporting possible loss as a BusGap
(see redis_streams.py's docstring). A part of `RedisEventBus`, which owns the settings
and the connections this reads through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from engine.bus.event_bus import FROM_OLDEST
from engine.bus.events import BusGap, Event, EventDecodeError, decode_event
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


class RedisStreamReading:
    """The subscribing half of `RedisEventBus`."""

    stream_key: str
    reader_client_name: str
    _url: str
    _block_ms: int
    _read_count: int
    _connect_timeout_s: float
    _reader_socket_timeout_s: float
    _client: aioredis.Redis
    _closed: bool
    _closed_event: asyncio.Event
    _readers: set[aioredis.Redis]

    def _backoff(self, failures: int) -> float:
        raise NotImplementedError

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

