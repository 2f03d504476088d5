"""Experiments in a fleet: a variant paused on one engine (a guard rail's or a
supervisor's pause) is paused on every engine within a sync, a resume likewise, and an
engine that starts later starts with the pauses in force (real Redis)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from engine.config import Config
from engine.config.experiments import ExperimentConfig
from engine.experiments.runner import ExperimentRunner
from engine.experiments.shared_pauses import SharedPauses
from engine.fleet.redis_link import FleetKeys, FleetRedis, fleet_client
from engine.hub import OpsHub

pytestmark = pytest.mark.redis

EXPERIMENT = ExperimentConfig.model_validate(
    {"name": "voice", "variants": [{"name": "A"}, {"name": "B", "system_prompt": "Be brief."}]})


def engine_runner(redis_url: str, prefix: str) -> tuple[ExperimentRunner, SharedPauses,
                                                        list[Any]]:
    """One engine's experiment runner with its hub (the alerts it publishes kept)."""
    hub = OpsHub.from_config(Config())
    published: list[Any] = []
    hub.publish = published.append  # type: ignore[method-assign]
    runner = ExperimentRunner(EXPERIMENT, {}, None, hub)  # type: ignore[arg-type]
    link = FleetRedis(fleet_client(redis_url, 1.0, "test-experiments"), FleetKeys(prefix), 1.0)
    return runner, SharedPauses(link, EXPERIMENT.name, sync_s=0.05), published


async def until(condition: Any, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_pause_on_one_engine_reaches_every_engine_and_outlives_a_restart(
        redis_url: str) -> None:
    prefix = f"sbtest-{uuid.uuid4().hex[:8]}:fleet"
    (first, first_shared, alerts), (second, second_shared, _) = (
        engine_runner(redis_url, prefix), engine_runner(redis_url, prefix))
    await first.share_pauses(first_shared)
    await second.share_pauses(second_shared)
    try:
        assert first.pause("B", "guard rail: escalation", "guard_rail") is None
        assert [a.kind for a in alerts] == ["variant_paused"]  # raised where it was paused
        await until(lambda: "B" in second.paused)
        assert second.paused == {"B": "guard rail: escalation"}
        # The other engine's callers of B now get A, as the pausing engine's do.
        numbers = [f"+1555030{n:04d}" for n in range(200)]
        assert {second.assigner.assign(n).variant for n in numbers} == {"A"}  # type: ignore[union-attr]

        # An engine that starts now starts with the pause in force.
        later, later_shared, _ = engine_runner(redis_url, prefix)
        await later.share_pauses(later_shared)
        assert later.paused == {"B": "guard rail: escalation"}
        await later.aclose()

        assert second.resume("B", "ana") is None  # a supervisor on the other engine
        await until(lambda: not first.paused)
        assert first.pause("B", "again", "ana") is None  # pausing again works everywhere
        await until(lambda: "B" in second.paused)
    finally:
        await first.aclose()
        await second.aclose()


async def test_without_redis_each_engine_keeps_its_own_pauses() -> None:
    runner, shared, _ = engine_runner("redis://127.0.0.1:1", "sbtest-down:fleet")
    await runner.share_pauses(shared)  # Redis unreachable: nothing applied, nothing raised
    try:
        assert runner.pause("B", "by hand", "ana") is None
        await asyncio.sleep(0.2)  # syncs fail quietly; the local pause stands
        assert runner.paused == {"B": "by hand"}
    finally:
        await runner.aclose()
