"""Call ownership on a real redis-server: engines register with heartbeats, a silent one
is declared dead within 10 s and its calls are marked lost exactly once even with two
watchers, and a Redis outage declares nobody dead."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from engine.bus.events import CallEnded, EventBase
from engine.config.fleet import FleetConfig
from engine.fleet.lost import LOST_REASON, LostCallMarker
from engine.fleet.membership import EngineCard, FleetMembership
from engine.fleet.redis_link import FleetKeys, FleetRedis, fleet_client
from engine.fleet.watcher import DeadEngineWatcher, OnLost
from engine.record.history import CallHistory
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


class Call:
    """A call as the membership sees it: a sid, a start, an end to wait for."""

    def __init__(self, sid: str) -> None:
        self.call_sid = sid
        self.created_at = time.time()
        self._ended = asyncio.Event()

    def end(self) -> None:
        self._ended.set()

    async def wait_ended(self, timeout: float | None = None) -> bool:
        await self._ended.wait()
        return True


@asynccontextmanager
async def fleet(url: str, config: FleetConfig, on_lost: OnLost,
                names: list[str]) -> AsyncIterator[dict[str, FleetMembership]]:
    """One membership per name on one key prefix, each with its own client and watcher."""
    keys = FleetKeys(f"test-{uuid.uuid4().hex[:8]}:fleet")
    members: dict[str, FleetMembership] = {}
    for name in names:
        link = FleetRedis(fleet_client(url, config.redis_op_timeout_s, f"test-{name}"), keys,
                          config.redis_op_timeout_s)
        watcher = DeadEngineWatcher(link, name, on_lost, claim_ttl_s=60)
        members[name] = FleetMembership(link, EngineCard(name, f"{name}-stable", f"http://{name}"),
                                        config, load=lambda: 0, draining=lambda: False,
                                        watcher=watcher)
    for member in members.values():  # their beats out of step, as engines' are
        await member.start()
        await asyncio.sleep(config.heartbeat_s / len(names))
    try:
        yield members
    finally:
        for member in members.values():
            await member.stop()


def crash(member: FleetMembership) -> None:
    """The engine stops heartbeating without leaving (a crash, a kill -9)."""
    assert member._loop is not None
    member._loop.cancel()


async def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_dead_engines_calls_are_marked_lost_once_within_10_s(
        tmp_path: Path, redis_url: str) -> None:
    history = CallHistory(tmp_path / "history.sqlite3", engine_id="shared")
    await history.open()
    published: list[EventBase] = []
    marker = LostCallMarker(published.append, history)
    config = FleetConfig(enabled=True)  # the shipped heartbeat and deadline
    calls = [Call(f"CA{uuid.uuid4().hex}") for _ in range(3)]
    for call in calls:
        await history.call_started(call.call_sid, "+15550100001", "+15550100000")
    try:
        async with fleet(redis_url, config, marker, ["a", "b", "c"]) as members:
            a = members["a"]
            for call in calls:
                a.track(call)
            done = Call(f"CA{uuid.uuid4().hex}")  # one that ends before the crash
            a.track(done)
            await asyncio.sleep(0.1)
            done.end()
            raw = aioredis.from_url(redis_url, decode_responses=True)
            keys = a.link.keys
            await wait_for(lambda: a.owned.keys() == {c.call_sid for c in calls}, 2)
            await asyncio.sleep(0.2)
            engine = await raw.hgetall(keys.engine("a"))
            owned = await raw.hgetall(keys.calls("a"))
            assert engine["name"] == "a-stable" and engine["address"] == "http://a"
            assert set(owned) == {c.call_sid for c in calls}
            assert await raw.zscore(keys.engines, "a") is not None
            crashed_at = time.monotonic()
            crash(a)
            lost_ids = {c.call_sid for c in calls}
            await wait_for(lambda: {e.call_sid for e in published} >= lost_ids, 12)
            detected_s = time.monotonic() - crashed_at
            await asyncio.sleep(2 * config.heartbeat_s)  # the other watcher had its turn
            assert await raw.zscore(keys.engines, "a") is None
            assert not await raw.exists(keys.calls("a"))
            await raw.aclose()
        watchers = [members["b"].watcher, members["c"].watcher]
        assert sorted(len(w.declared) for w in watchers if w) == [0, 1]
        ended = [e for e in published if isinstance(e, CallEnded)]
        assert sorted(e.call_sid for e in ended) == sorted(lost_ids)  # once each
        assert all(e.reason == LOST_REASON for e in ended)
        assert detected_s < 10.0, f"declared dead after {detected_s:.1f} s"
        for call in calls:
            stored = await history.get_call(call.call_sid)
            assert stored is not None and stored.end_reason == LOST_REASON
            assert stored.ended_at is not None
    finally:
        await history.aclose()


async def test_a_clean_stop_leaves_the_fleet_and_marks_nothing_lost(redis_url: str) -> None:
    published: list[EventBase] = []
    config = FleetConfig(enabled=True, heartbeat_s=0.2, dead_after_s=0.6)
    async with fleet(redis_url, config, LostCallMarker(published.append, None),
                     ["a", "b"]) as members:
        a = members["a"]
        call = Call("CA" + "1" * 32)
        a.track(call)
        await asyncio.sleep(0.2)
        call.end()
        await asyncio.sleep(0.1)
        await a.stop()
        await asyncio.sleep(1.5)
        b_watcher = members["b"].watcher
        assert b_watcher is not None and b_watcher.declared == []
        members.pop("a")
    assert published == []


class CuttableLink:
    """A TCP relay to Redis that can be cut: the engines lose Redis while Redis, and its
    clock, run on (their keys expire meanwhile), as in a network partition."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer),
                             return_exceptions=True)

    def cut_all(self) -> None:
        self.cut = True
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut_all()
        if self._server is not None:
            self._server.close()


async def test_a_redis_outage_declares_nobody_dead(redis_server: RedisServer) -> None:
    published: list[EventBase] = []
    config = FleetConfig(enabled=True, heartbeat_s=0.2, dead_after_s=0.8,
                         redis_op_timeout_s=0.3)
    link = CuttableLink(redis_server.port)
    url = await link.start()
    with capture_logs() as logs:
        async with fleet(url, config, LostCallMarker(published.append, None),
                         ["a", "b"]) as members:
            call_a, call_b = Call("CA" + "a" * 32), Call("CA" + "b" * 32)
            members["a"].track(call_a)
            members["b"].track(call_b)
            await asyncio.sleep(0.5)
            raw = aioredis.from_url(redis_server.url, decode_responses=True)
            keys = members["a"].link.keys
            link.cut_all()  # no engine reaches Redis; their keys expire
            await asyncio.sleep(1.5)
            assert not await raw.exists(keys.engine("a"), keys.engine("b"))
            link.cut = False
            await asyncio.sleep(2.5)  # both engines back, watching again
            assert all(m.link.down is False for m in members.values())
            assert set(await raw.zrange(keys.engines, 0, -1)) == {"a", "b"}
            assert set(await raw.hgetall(keys.calls("a"))) == {call_a.call_sid}
            # Redis restarted empty: the next beats write everything again.
            await raw.aclose()
            link.cut_all()
            redis_server.restart()
            link.cut = False
            await asyncio.sleep(1.5)
            raw = aioredis.from_url(redis_server.url, decode_responses=True)
            assert set(await raw.zrange(keys.engines, 0, -1)) == {"a", "b"}
            assert set(await raw.hgetall(keys.calls("b"))) == {call_b.call_sid}
            await raw.aclose()
            for member in members.values():
                assert member.watcher is not None and member.watcher.declared == []
    await link.stop()
    assert published == []
    outages = [e for e in logs if e["event"] == "fleet.redis_unreachable"]
    assert 2 <= len(outages) <= 4  # once per engine per outage (the cut, the restart)
    assert len([e for e in logs if e["event"] == "fleet.redis_back"]) == len(outages)
