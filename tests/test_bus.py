"""Event buses: the in-memory ring and Redis Streams (against a real redis-server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from engine.bus.event_bus import (
    FROM_OLDEST,
    BusClosedError,
    BusError,
    BusPublishError,
    make_event_bus,
)
from engine.bus.events import BusGap, Event, EventStamper, TranscriptLine
from engine.bus.memory import MemoryEventBus
from engine.bus.redis_streams import RedisEventBus
from engine.config import Config
from tests.conftest import BusFactory
from tests.redis_server import RedisServer


def line(i: int) -> TranscriptLine:
    return TranscriptLine(call_sid="CA1", speaker="caller", text=f"line {i}", line_id=str(i))


async def take(it: AsyncIterator[tuple[str, Event]], n: int,
               within_s: float = 10.0) -> list[tuple[str, Event]]:
    items: list[tuple[str, Event]] = []
    async with asyncio.timeout(within_s):
        async for item in it:
            items.append(item)
            if len(items) == n:
                break
    return items


def texts(items: list[tuple[str, Event]]) -> list[str]:
    return [ev.text for _, ev in items if isinstance(ev, TranscriptLine)]




# --- both backends ----------------------------------------------------------------


async def test_subscriber_gets_events_in_publish_order(make_bus: BusFactory) -> None:
    bus = await make_bus()
    sub = bus.subscribe(after=await bus.latest_id())
    ids = [await bus.publish(line(i)) for i in range(50)]
    got = await take(sub, 50)
    assert texts(got) == [f"line {i}" for i in range(50)]
    assert [entry_id for entry_id, _ in got] == ids
    assert len(set(ids)) == 50


async def test_every_subscriber_sees_everything(make_bus: BusFactory) -> None:
    bus = await make_bus()
    start = await bus.latest_id()
    subs = [bus.subscribe(after=start) for _ in range(3)]
    readers = [asyncio.create_task(take(sub, 100)) for sub in subs]
    for i in range(100):
        await bus.publish(line(i))
    results = await asyncio.gather(*readers)
    for got in results:
        assert texts(got) == [f"line {i}" for i in range(100)]


async def test_resume_after_a_cursor_misses_nothing(make_bus: BusFactory) -> None:
    bus = await make_bus()
    sub = bus.subscribe(after=await bus.latest_id())
    for i in range(10):
        await bus.publish(line(i))
    first = await take(sub, 4)
    await sub.aclose()  # the reader goes away...
    for i in range(10, 20):  # ...while the engine keeps publishing
        await bus.publish(line(i))
    resumed = await take(bus.subscribe(after=first[-1][0]), 16)
    assert texts(first) + texts(resumed) == [f"line {i}" for i in range(20)]


async def test_from_oldest_replays_what_is_retained(make_bus: BusFactory) -> None:
    bus = await make_bus()
    for i in range(5):
        await bus.publish(line(i))
    assert texts(await take(bus.subscribe(after=FROM_OLDEST), 5)) == [
        f"line {i}" for i in range(5)]


async def test_latest_id_pins_now(make_bus: BusFactory) -> None:
    bus = await make_bus()
    assert await bus.latest_id() == FROM_OLDEST
    last = ""
    for i in range(5):
        last = await bus.publish(line(i))
    assert await bus.latest_id() == last
    sub = bus.subscribe(after=last)
    await bus.publish(line(99))
    assert texts(await take(sub, 1)) == ["line 99"]


async def test_subscribe_without_cursor_sees_only_new_events(make_bus: BusFactory) -> None:
    bus = await make_bus()
    for i in range(3):
        await bus.publish(line(i))
    sub = bus.subscribe()
    first = asyncio.create_task(take(sub, 1))
    await asyncio.sleep(0.3)  # the reader is waiting
    await bus.publish(line(3))
    assert texts(await first) == ["line 3"]


async def test_slow_subscriber_does_not_block_the_publisher(make_bus: BusFactory) -> None:
    bus = await make_bus(maxlen=100_000)
    start = await bus.latest_id()
    stalled = bus.subscribe(after=start)
    await bus.publish(line(-1))
    assert texts(await take(stalled, 1)) == ["line -1"]  # then it never reads again
    fast = asyncio.create_task(take(bus.subscribe(after=start), 1001))
    began = time.perf_counter()
    for i in range(1000):
        await asyncio.wait_for(bus.publish(line(i)), timeout=2.0)
    elapsed = time.perf_counter() - began
    got = await fast
    assert texts(got)[1:] == [f"line {i}" for i in range(1000)]
    assert elapsed < 10.0
    await stalled.aclose()


async def test_close_ends_subscriptions_and_refuses_publishing(make_bus: BusFactory) -> None:
    bus = await make_bus()
    waiting = asyncio.create_task(take(bus.subscribe(after=await bus.latest_id()), 1))
    await asyncio.sleep(0.2)
    await bus.aclose()
    assert await asyncio.wait_for(waiting, timeout=3.0) == []
    with pytest.raises(BusClosedError):
        await bus.publish(line(0))


async def test_bus_gap_cannot_be_published(make_bus: BusFactory) -> None:
    bus = await make_bus()
    with pytest.raises(ValueError, match="BusGap"):
        await bus.publish(BusGap(missed_after="1"))


# --- in-memory ring ---------------------------------------------------------------


async def test_memory_subscriber_behind_the_ring_gets_an_exact_gap() -> None:
    bus = MemoryEventBus(maxlen=10)
    for i in range(25):
        bus.publish_nowait(line(i))
    got = await take(bus.subscribe(after=FROM_OLDEST), 11)
    gap_id, gap = got[0]
    assert isinstance(gap, BusGap)
    assert (gap.reason, gap.count, gap.missed_after, gap.missed_until) == (
        "overrun", 15, "0", "16")
    assert texts(got[1:]) == [f"line {i}" for i in range(15, 25)]
    # Resuming after the gap's id continues with the first retained event, no new gap.
    resumed = await take(bus.subscribe(after=gap_id), 1)
    assert texts(resumed) == ["line 15"]


async def test_memory_gap_while_a_subscriber_lags_mid_stream() -> None:
    bus = MemoryEventBus(maxlen=8)
    sub = bus.subscribe()
    for i in range(3):
        bus.publish_nowait(line(i))
    assert texts(await take(sub, 2)) == ["line 0", "line 1"]
    for i in range(3, 30):  # the subscriber sleeps through 27 events
        bus.publish_nowait(line(i))
    got = await take(sub, 9)
    assert isinstance(got[0][1], BusGap)
    assert got[0][1].count == 20  # ids 3..22 were overwritten unread
    assert texts(got[1:]) == [f"line {i}" for i in range(22, 30)]


async def test_memory_cursor_from_an_earlier_bus_restarts_with_a_gap() -> None:
    bus = MemoryEventBus()
    bus.publish_nowait(line(0))
    got = await take(bus.subscribe(after="500"), 2)
    assert isinstance(got[0][1], BusGap) and got[0][1].reason == "stream_reset"
    assert texts(got[1:]) == ["line 0"]


async def test_memory_cursor_from_a_restarted_engine_is_never_taken_as_ours() -> None:
    old = MemoryEventBus()
    old.publish_nowait(line(0))
    cursor = old.publish_nowait(line(1))  # the console saw 2 events of the old engine
    new = MemoryEventBus()  # the engine restarted; its stream already has more events
    for i in range(5):
        new.publish_nowait(line(10 + i))
    got = await take(new.subscribe(after=cursor), 6)
    assert isinstance(got[0][1], BusGap) and got[0][1].reason == "stream_reset"
    assert texts(got[1:]) == [f"line {10 + i}" for i in range(5)]  # nothing skipped


@pytest.mark.parametrize("cursor", ["abc", "-1", "1-2"])
def test_memory_rejects_bad_cursors(cursor: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        MemoryEventBus().subscribe(after=cursor)


async def test_memory_publish_throughput() -> None:
    bus = MemoryEventBus(maxlen=20_000)
    events = [line(i) for i in range(50_000)]
    sub = bus.subscribe()
    start = time.perf_counter()
    for event in events:
        await bus.publish(event)
    per_publish_us = (time.perf_counter() - start) / len(events) * 1e6
    print(f"memory bus publish: {per_publish_us:.2f} µs/event "
          f"({1e6 / per_publish_us:,.0f} events/s)")
    assert per_publish_us < 200  # O(1) with a wide margin; measured ~0.5 µs
    got = await take(sub, 20_001)
    assert isinstance(got[0][1], BusGap) and got[0][1].count == 30_000


def test_factory_picks_the_configured_backend() -> None:
    config = Config.model_validate({"bus": {"backend": "memory", "memory_maxlen": 42}})
    bus = make_event_bus(config)
    assert isinstance(bus, MemoryEventBus) and bus.maxlen == 42
    with pytest.raises(ValueError, match="REDIS_URL"):
        make_event_bus(Config.model_validate({"bus": {"backend": "redis"}}))
    redis_config = Config.model_validate({"bus": {"backend": "redis"}, "redis": {
        "url": "redis://127.0.0.1:1/0", "key_prefix": "acme"}})
    redis_bus = make_event_bus(redis_config)
    assert isinstance(redis_bus, RedisEventBus)
    assert redis_bus.stream_key == "acme:events"


# --- Redis Streams ----------------------------------------------------------------

def redis_bus(url: str, **kwargs: Any) -> RedisEventBus:
    kwargs.setdefault("key_prefix", f"test-{uuid.uuid4().hex[:8]}")
    kwargs.setdefault("block_ms", 500)
    return RedisEventBus(url, **kwargs)


async def kill_readers(url: str, name: str) -> int:
    client = aioredis.from_url(url, decode_responses=True)
    try:
        killed = 0
        for entry in await client.client_list():
            if entry.get("name") == name:
                killed += await client.client_kill_filter(_id=entry["id"])
        return killed
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_reader_survives_a_killed_connection(redis_url: str) -> None:
    bus = redis_bus(redis_url, client_name=f"kill-{uuid.uuid4().hex[:6]}")
    try:
        sub = bus.subscribe(after=await bus.latest_id())
        for i in range(10):
            await bus.publish(line(i))
        got = await take(sub, 10)
        with capture_logs() as logs:
            reading = asyncio.create_task(take(sub, 20))
            await asyncio.sleep(0.1)  # blocked in XREAD now
            assert await kill_readers(redis_url, bus.reader_client_name) >= 1
            for i in range(10, 30):
                await bus.publish(line(i))
            got += await reading
        assert texts(got) == [f"line {i}" for i in range(30)]
        assert not any(isinstance(ev, BusGap) for _, ev in got)
        assert any(entry["event"] == "bus.reader_error" for entry in logs)
    finally:
        await bus.aclose()


@pytest.mark.redis
async def test_redis_reader_survives_a_server_restart(redis_server: RedisServer) -> None:
    bus = redis_bus(redis_server.url, backoff_base_s=0.05, backoff_max_s=0.3)
    stamper = EventStamper("eng-restart")
    try:
        sub = bus.subscribe(after=await bus.latest_id())
        for i in range(5):
            await bus.publish(stamper.stamp(line(i)))
        got = await take(sub, 5)
        reading = asyncio.create_task(take(sub, 7, within_s=20))
        redis_server.stop()
        # Published while the server is down: kept in the buffer, sent when it is back.
        waiting = asyncio.create_task(bus.publish(stamper.stamp(line(100))))
        await asyncio.sleep(0.5)  # the reader and the flusher back off and retry meanwhile
        assert not waiting.done() and bus.health().buffered == 1
        assert not bus.health().reachable
        redis_server.start()
        await asyncio.wait_for(waiting, 10)
        for i in range(5, 10):
            await bus.publish(stamper.stamp(line(i)))
        after = await reading
    finally:
        await bus.aclose()
    assert texts(got) == [f"line {i}" for i in range(5)]
    gaps = [ev for _, ev in after if isinstance(ev, BusGap)]
    # The restarted server lost the stream: the reader says so, then reads the new one,
    # which starts with the event that waited for it.
    assert len(gaps) == 1 and gaps[0].reason in ("stream_reset", "trimmed", "seq_jump")
    assert texts(after) == ["line 100"] + [f"line {i}" for i in range(5, 10)]
    assert bus.health().dropped == 0


@pytest.mark.redis
async def test_redis_stream_is_trimmed_and_a_late_reader_is_told(redis_url: str) -> None:
    bus = redis_bus(redis_url, maxlen=50)
    try:
        first_id = await bus.publish(line(0))
        for i in range(1, 1000):
            await bus.publish(line(i))
        client = aioredis.from_url(redis_url)
        length = await client.xlen(bus.stream_key)
        await client.aclose()
        # MAXLEN ~ trims whole macro nodes (100 entries by default), never below maxlen.
        assert 50 <= length <= 50 + 100
        got = await take(bus.subscribe(after=first_id), 1 + length)
        gap = got[0][1]
        assert isinstance(gap, BusGap) and gap.reason == "trimmed"
        assert texts(got[1:]) == [f"line {i}" for i in range(1000 - length, 1000)]
        # Its id resumes after the gap without reporting it again.
        resumed = await take(bus.subscribe(after=got[0][0]), 1)
        assert texts(resumed) == [f"line {1000 - length}"]
    finally:
        await bus.aclose()


@pytest.mark.redis
async def test_redis_reports_a_seq_jump_as_a_gap(redis_url: str) -> None:
    bus = redis_bus(redis_url)
    stamper = EventStamper("eng-a")
    try:
        sub = bus.subscribe(after=await bus.latest_id())
        await bus.publish(stamper.stamp(line(1)))
        await bus.publish(stamper.stamp(line(2)))
        stamper.stamp(line(3))  # stamped, never stored: a lost publish
        stamper.stamp(line(4))
        await bus.publish(stamper.stamp(line(5)))
        got = await take(sub, 4)
    finally:
        await bus.aclose()
    assert texts(got) == ["line 1", "line 2", "line 5"]
    gap = got[2][1]
    assert isinstance(gap, BusGap)
    assert (gap.reason, gap.count, gap.engine_id) == ("seq_jump", 2, "eng-a")
    assert gap.missed_after == got[1][0] and gap.missed_until == got[3][0]


@pytest.mark.redis
async def test_redis_skips_undecodable_entries(redis_url: str) -> None:
    bus = redis_bus(redis_url)
    client = aioredis.from_url(redis_url)
    try:
        sub = bus.subscribe(after=await bus.latest_id())
        await client.xadd(bus.stream_key, {"data": b"{not json"})
        await client.xadd(bus.stream_key, {"data": b'{"type": "from_the_future"}'})
        await client.xadd(bus.stream_key, {"other": b"x"})
        await bus.publish(line(1))
        with capture_logs() as logs:
            got = await take(sub, 1)
    finally:
        await client.aclose()
        await bus.aclose()
    assert texts(got) == ["line 1"]
    assert [e["event"] for e in logs].count("bus.undecodable_entry") == 3


@pytest.mark.redis
async def test_redis_idle_reader_outlives_the_socket_timeout(redis_url: str) -> None:
    # redis-py's 5 s default socket timeout kills a longer blocking XREAD; here the
    # reader waits several block periods on a short socket timeout without an error.
    bus = redis_bus(redis_url, block_ms=300, socket_timeout_s=0.2)
    try:
        sub = bus.subscribe(after=await bus.latest_id())
        with capture_logs() as logs:
            reading = asyncio.create_task(take(sub, 1))
            await asyncio.sleep(1.5)
            await bus.publish(line(7))
            got = await reading
    finally:
        await bus.aclose()
    assert texts(got) == ["line 7"]
    assert not [e for e in logs if e["event"] == "bus.reader_error"]


async def test_redis_publish_waits_in_a_bounded_buffer_when_unreachable() -> None:
    # Port 1 on localhost: connection refused, no server needed.
    bus = RedisEventBus("redis://127.0.0.1:1/0", backoff_base_s=1.0, buffer_max=2)
    try:
        with capture_logs() as logs:
            waiting = [asyncio.create_task(bus.publish(line(i))) for i in range(2)]
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in waiting)  # buffered, not lost
            start = time.perf_counter()
            with pytest.raises(BusPublishError, match="buffer full"):  # beyond the bound
                await bus.publish(line(2))
            assert time.perf_counter() - start < 0.05  # at once, no network wait
            health = bus.health()
            assert not health.reachable and health.buffered == 2 and health.dropped == 1
        # One line per failed round trip (not per event), one for the drops.
        assert [e["event"] for e in logs].count("bus.publish_failed") == 1
        assert [e["event"] for e in logs].count("bus.events_dropped") == 1
        with pytest.raises(BusError, match="unreachable"):
            await bus.latest_id()
    finally:
        await bus.aclose()
    # Closed while Redis was still away: what waited is dropped, counted, and told.
    for task in waiting:
        with pytest.raises(BusError):
            await task
    assert bus.health().dropped == 3


def test_redis_rejects_bad_cursors() -> None:
    bus = RedisEventBus("redis://127.0.0.1:1/0")
    for cursor in ("abc", "1-x", "-5"):
        with pytest.raises(ValueError, match="stream id"):
            bus.subscribe(after=cursor)
