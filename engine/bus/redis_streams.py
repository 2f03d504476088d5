"""Event bus on a Redis Stream, shared by every engine and console of a deployment.

Layout: one stream `{key_prefix}:events`, entries `data=<encoded event>`, appended with
`XADD … MAXLEN ~ maxlen`. Engines tell their events apart by `engine_id` (stamped by
events.EventStamper). Readers use plain XREAD (every reader sees every event), not
consumer groups, which would split events between readers.

Publishing: concurrent publish() calls are batched into one pipelined round trip (the
engine emits thousands of events per second at 200 calls). While Redis is unreachable,
publish fails fast with BusPublishError for a backoff period rather than stalling calls.

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
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from engine.bus.event_bus import FROM_OLDEST, BusClosedError, BusError, BusPublishError
from engine.bus.events import BusGap, Event, EventDecodeError, decode_event, encode_event
from engine.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")
StreamId = tuple[int, int]
_ZERO: StreamId = (0, 0)
_MAX_SEQ = 2**64 - 1


def parse_stream_id(value: str) -> StreamId:
    """'1700000000000-3' -> (1700000000000, 3); '0' -> (0, 0). ValueError otherwise."""
    ms, sep, seq = value.partition("-")
    try:
        parsed = (int(ms), int(seq) if sep else 0)
    except ValueError:
        raise ValueError(f"invalid Redis stream id {value!r}") from None
    if parsed[0] < 0 or parsed[1] < 0:
        raise ValueError(f"invalid Redis stream id {value!r}")
    return parsed


def _format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def _id_before(stream_id: StreamId) -> StreamId:
    ms, seq = stream_id
    if seq > 0:
        return ms, seq - 1
    return (ms - 1, _MAX_SEQ) if ms > 0 else _ZERO


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class _StreamInfo:
    last_generated: StreamId
    first_entry: StreamId | None  # None: the stream is empty


class _Closed(Exception):
    """The bus closed while a subscription was waiting on Redis."""


class RedisEventBus:
    def __init__(self, url: str, *, key_prefix: str = "switchboard", maxlen: int = 100_000,
                 block_ms: int = 2_000, read_count: int = 500,
                 socket_timeout_s: float = 5.0, connect_timeout_s: float = 2.0,
                 publish_batch: int = 256, backoff_base_s: float = 0.1,
                 backoff_max_s: float = 5.0, client_name: str = "switchboard-bus") -> None:
        if maxlen < 1:
            raise ValueError(f"stream maxlen must be >= 1, got {maxlen}")
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
        self._publish_failures = 0
        self._down_until = 0.0  # loop time before which publish fails fast
        self._closed = False
        self._closed_event = asyncio.Event()
        self._readers: set[aioredis.Redis] = set()

    # --- publishing ---------------------------------------------------------------

    async def publish(self, event: Event) -> str:
        if self._closed:
            raise BusClosedError("redis event bus is closed")
        if isinstance(event, BusGap):
            raise ValueError("BusGap is produced by subscriptions, it cannot be published")
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            raise BusPublishError("redis unreachable; event dropped (retrying shortly)")
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append((encode_event(event), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="event-bus-flush")
        return await future

    async def _flush(self) -> None:
        try:
            await self._flush_pending()
        except BaseException as exc:  # cancelled at shutdown: no caller may hang
            self._fail_pending(BusClosedError(f"event bus flush stopped: {exc!r}"),
                               self._in_flight + self._pending)
            self._pending = []
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
                self._publish_failed(exc, batch + self._pending)
                self._pending = []
                return
            if self._publish_failures:
                log.info("bus.publish_recovered", after_failures=self._publish_failures)
                self._publish_failures = 0
            for (_, future), entry_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(_text(entry_id))

    def _publish_failed(self, exc: BaseException,
                        failed: list[tuple[bytes, asyncio.Future[str]]]) -> None:
        self._publish_failures += 1
        delay = self._backoff(self._publish_failures)
        self._down_until = asyncio.get_running_loop().time() + delay
        # One line per failed round trip, not per event: an outage must not flood the log.
        log.warning("bus.publish_failed", error=repr(exc), dropped=len(failed),
                    failures=self._publish_failures, retry_in_s=round(delay, 2))
        self._fail_pending(BusPublishError(f"redis publish failed: {exc!r}"), failed)

    @staticmethod
    def _fail_pending(error: Exception,
                      failed: list[tuple[bytes, asyncio.Future[str]]]) -> None:
        for _, future in failed:
            if not future.done():
                future.set_exception(error)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._backoff_max_s, self._backoff_base_s * 2 ** min(failures - 1, 16))
        return random.uniform(ceiling / 2, ceiling)  # jitter: readers do not reconnect in step

    async def latest_id(self) -> str:
        try:
            info = await self._stream_info(self._client)
        except (RedisError, OSError) as exc:
            raise BusError(f"redis unreachable: {exc!r}") from exc
        return _format_id(info.last_generated) if info else FROM_OLDEST

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
        cursor = start  # None: resolved to the stream's newest id on the first read
        # A given cursor may have been trimmed away meanwhile: verify on the first read.
        check = start is not None and start != _ZERO
        last_seq: dict[str, int] = {}  # engine_id -> last seq seen, to spot lost events
        failures = 0
        try:
            while not self._closed:
                gap: tuple[str, BusGap] | None = None
                try:
                    if cursor is None:
                        info = await self._until_closed(closed_waiter,
                                                        self._stream_info(reader))
                        cursor = info.last_generated if info else _ZERO
                        continue
                    if check:
                        info, entries = await self._until_closed(
                            closed_waiter, self._checked_read(reader, cursor))
                        gap, cursor, entries = self._find_gap(info, cursor, entries)
                        check = False
                    else:
                        entries = await self._until_closed(
                            closed_waiter, self._read(reader, cursor, self._block_ms))
                except _Closed:
                    return
                except (RedisError, OSError) as exc:
                    failures += 1
                    delay = self._backoff(failures)
                    log.warning("bus.reader_error", error=repr(exc), cursor=_format_id(cursor)
                                if cursor else None, failures=failures,
                                retry_in_s=round(delay, 2))
                    await asyncio.wait({closed_waiter}, timeout=delay)
                    check = True
                    continue
                if failures:
                    log.info("bus.reader_recovered", after_failures=failures)
                    failures = 0
                if gap is not None:
                    last_seq.clear()  # the gap already reports this loss
                    yield gap
                for raw_id, fields in entries:
                    entry_id = _text(raw_id)
                    previous = cursor
                    cursor = parse_stream_id(entry_id)
                    event = self._decode_entry(entry_id, fields)
                    if event is None:
                        continue
                    if event.seq > 0:
                        seen = last_seq.get(event.engine_id)
                        if seen is not None and event.seq > seen + 1:
                            yield _format_id(previous), BusGap(
                                engine_id=event.engine_id, missed_after=_format_id(previous),
                                missed_until=entry_id, count=event.seq - seen - 1,
                                reason="seq_jump")
                        last_seq[event.engine_id] = event.seq
                    yield entry_id, event
                # A full batch means this reader is behind: check for trimming next time.
                check = len(entries) >= self._read_count
        finally:
            closed_waiter.cancel()
            self._readers.discard(reader)
            with contextlib.suppress(RedisError, OSError):
                await reader.aclose()

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

    def _find_gap(self, info: _StreamInfo | None, cursor: StreamId, entries: list[Any],
                  ) -> tuple[tuple[str, BusGap] | None, StreamId, list[Any]]:
        """After a (re)connect or while behind: does the stream still hold our cursor?"""
        if cursor == _ZERO:
            return None, cursor, entries
        after = _format_id(cursor)
        if info is None or info.last_generated < cursor:
            # The stream is gone or was recreated (Redis restarted without persistence,
            # flushed, or failed over): whatever it held after our cursor is lost, and
            # its new ids may sort below our cursor, so start over from its beginning.
            log.warning("bus.stream_reset", cursor=after)
            gap = BusGap(missed_after=after, reason="stream_reset")
            return (FROM_OLDEST, gap), _ZERO, []
        if info.first_entry is not None and _id_before(info.first_entry) > cursor:
            # Ids lie between our cursor and the first retained entry: entries there may
            # have been trimmed (MAXLEN) before we read them.
            first = _format_id(info.first_entry)
            log.warning("bus.reader_trimmed", cursor=after, first_retained=first)
            gap = BusGap(missed_after=after, missed_until=first, reason="trimmed")
            return (_format_id(_id_before(info.first_entry)), gap), cursor, entries
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
        response = await reader.xread({self.stream_key: _format_id(cursor)},
                                      count=self._read_count, block=block_ms)
        return self._entries(response)

    async def _checked_read(self, reader: aioredis.Redis, cursor: StreamId,
                            ) -> tuple[_StreamInfo | None, list[Any]]:
        # MULTI: the stream's bounds and the entries after our cursor, atomically, so
        # nothing can be trimmed between the check and the read.
        pipe = reader.pipeline(transaction=True)
        pipe.xinfo_stream(self.stream_key)
        pipe.xread({self.stream_key: _format_id(cursor)}, count=self._read_count)
        info_reply, read_reply = await pipe.execute(raise_on_error=False)
        info = self._parse_info(info_reply)
        if isinstance(read_reply, Exception):
            raise read_reply
        return info, self._entries(read_reply)

    async def _stream_info(self, client: aioredis.Redis) -> _StreamInfo | None:
        try:
            reply = await client.xinfo_stream(self.stream_key)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        return self._parse_info(reply)

    def _parse_info(self, reply: Any) -> _StreamInfo | None:
        if isinstance(reply, ResponseError) and "no such key" in str(reply).lower():
            return None
        if isinstance(reply, Exception):
            raise reply
        first = reply.get("first-entry")
        return _StreamInfo(
            last_generated=parse_stream_id(_text(reply["last-generated-id"])),
            first_entry=parse_stream_id(_text(first[0])) if first else None)

    def _entries(self, response: Any) -> list[Any]:
        if not response:
            return []
        if isinstance(response, dict):  # RESP3
            for key, value in response.items():
                if _text(key) == self.stream_key:
                    return list(value[0] if value and isinstance(value[0], list) else value)
            return []
        for key, entries in response:  # RESP2: [[key, [(id, fields), ...]]]
            if _text(key) == self.stream_key:
                return list(entries)
        return []

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
