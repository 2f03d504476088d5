"""Several engines, one Redis: the same code with other backends. Both engines publish to
one stream (a console reading Redis sees every call) and share one response cache."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.bus.events import CallEnded, CallStarted, Event
from engine.bus.redis_streams import RedisEventBus
from engine.sim.scenario import Scenario, Step
from tests.harness import base_sections, make_local_engine, running_engine

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def test_two_engines_share_the_event_stream_and_the_cache(
        tmp_path: Path, redis_url: str) -> None:
    prefix = f"sb-test-{id(tmp_path)}"
    sections = base_sections()
    sections["bus"] = {"backend": "redis"}
    sections["cache"] = {"backend": "redis"}
    sections["redis"] = {"url": redis_url, "key_prefix": prefix}
    reader = RedisEventBus(redis_url, key_prefix=prefix, maxlen=10_000)
    seen: list[Event] = []

    async def read() -> None:
        async for _, event in reader.subscribe(after="0"):
            seen.append(event)

    reading = asyncio.create_task(read())
    try:
        async with running_engine(tmp_path / "a", make_engine=make_local_engine,
                                  **sections) as a, \
                running_engine(tmp_path / "b", make_engine=make_local_engine,
                               **sections) as b:
            first = await a.caller().run(Scenario(name="a", from_number="+15550100041",
                                                  steps=[Step(say="Where are you located?")]))
            hits_before = b.engine.deps.cache.stats().audio.hits
            second = await b.caller().run(Scenario(name="b", from_number="+15550100042",
                                                   steps=[Step(say="Where are you located?")]))
            hits_after = b.engine.deps.cache.stats().audio.hits
            engine_ids = {a.engine.hub.engine_id, b.engine.hub.engine_id}
            await asyncio.sleep(0.5)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await reader.aclose()
    assert first.error is None and second.error is None
    started = {e.from_number: e.engine_id for e in seen if isinstance(e, CallStarted)}
    assert started.keys() >= {"+15550100041", "+15550100042"}
    assert set(started.values()) == engine_ids  # one stream, both engines
    assert sum(isinstance(e, CallEnded) for e in seen) == 2
    # Engine B replayed the greeting and the answer engine A had synthesized.
    assert hits_after - hits_before >= 2
