"""A dead engine's calls are marked lost together, not one after another: with a slow
history (each marking takes a while), 20 calls must not add up to 20 markings' time and
push the last `lost` past the fleet's 10 s (bench/bench_fleet.py measured 2.2 s for 20
calls on a loaded machine before)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from engine.fleet.redis_link import FleetKeys, FleetRedis, fleet_client
from engine.fleet.watcher import DeadEngineWatcher, LostCall

pytestmark = pytest.mark.redis

MARKING_S = 0.3  # one call's marking (its history update) on a slow record
CALLS = 20


async def test_a_dead_engines_calls_are_marked_together(redis_url: str) -> None:
    keys = FleetKeys(f"test-{uuid.uuid4().hex[:8]}:fleet")
    raw = aioredis.from_url(redis_url, decode_responses=True)
    sids = [f"CA{n:032d}" for n in range(CALLS)]
    # An engine that was a member and owned calls, whose card has expired: dead.
    await raw.zadd(keys.engines, {"dead": time.time() - 10})
    await raw.hset(keys.calls("dead"), mapping={sid: repr(time.time() - 30) for sid in sids})
    marked: list[tuple[str, float]] = []

    async def slow_marking(call: LostCall) -> None:
        marked.append((call.call_sid, time.monotonic()))  # the event goes out first
        await asyncio.sleep(MARKING_S)  # then the history update

    link = FleetRedis(fleet_client(redis_url, 1.0, "test-watcher"), keys, 1.0)
    watcher = DeadEngineWatcher(link, "alive", slow_marking)
    try:
        began = time.monotonic()
        await watcher.check()
        took = time.monotonic() - began
    finally:
        await link.aclose()
        await raw.delete(keys.engines, keys.calls("dead"), keys.lost("dead"))
        await raw.aclose()
    assert sorted(sid for sid, _ in marked) == sids
    assert watcher.calls_marked == CALLS and watcher.declared == ["dead"]
    # Every call's event within one marking of the first; sequentially: 19 x 0.3 s later.
    assert max(at for _, at in marked) - min(at for _, at in marked) < MARKING_S
    assert took < 3 * MARKING_S + 1.0, f"{CALLS} markings took {took:.2f} s"
