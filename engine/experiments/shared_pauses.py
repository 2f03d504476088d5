"""Paused variants shared by a fleet's engines through Redis, and kept across restarts.

With the fleet on (`[fleet] enabled` and `redis.url`), a pause or a resume on any engine
(a guard rail's or a supervisor's) is written to one Redis hash,
`{redis.key_prefix}:fleet:experiments:<experiment>:paused` (variant -> why), and every
engine reads it back every `sync_s`: a paused variant gets no new calls on any engine
within a couple of seconds, and an engine that restarts starts with the pauses in
force. The engine that paused raised the alert; the others log one line. While Redis
cannot be reached each engine keeps its own pauses (FleetRedis logs the outage once).
"""

from __future__ import annotations

import asyncio
import contextlib

from engine.experiments.assignment import Assigner
from engine.fleet.redis_link import FleetRedis
from engine.log import get_logger

log = get_logger(__name__)


class SharedPauses:
    def __init__(self, redis: FleetRedis, experiment: str, sync_s: float = 2.0) -> None:
        self.redis = redis
        self.experiment = experiment
        self.sync_s = sync_s
        self.key = f"{redis.keys.prefix}:experiments:{experiment}:paused"
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._writing: dict[str, int] = {}  # variant -> writes of this engine in flight

    def write(self, variant: str, why: str | None) -> None:
        """Record a pause (`why`) or a resume (None) for every engine (in the background;
        until it is written, this engine's reads leave that variant as it is here)."""
        self._writing[variant] = self._writing.get(variant, 0) + 1
        task = asyncio.get_running_loop().create_task(self._write(variant, why))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, variant: str, why: str | None) -> None:
        key = self.key
        try:
            if why is None:
                await self.redis.run(lambda r: r.hdel(key, variant), "experiment_resume")
            else:
                await self.redis.run(lambda r: r.hset(key, variant, why), "experiment_pause")
        finally:
            self._writing[variant] -= 1
            if not self._writing[variant]:
                del self._writing[variant]

    async def sync(self, assigner: Assigner) -> tuple[list[str], list[str]] | None:
        """Make `assigner`'s pauses the fleet's: (paused here now, resumed here now), or
        None when Redis did not answer (the local pauses stand)."""
        key = self.key
        shared = await self.redis.run(lambda r: r.hgetall(key), "experiment_pauses")
        if shared is None:
            return None
        self.redis.succeeded()
        # The fleet's client decodes replies (decode_responses=True): names are str.
        settled = {str(v): str(why) for v, why in shared.items() if v not in self._writing}
        paused = [v for v, why in settled.items() if assigner.pause(v, why)]
        resumed = [v for v in list(assigner.paused)
                   if v not in shared and v not in self._writing and assigner.resume(v)]
        for variant in paused:
            log.info("experiment.variant_paused_by_fleet", experiment=self.experiment,
                     variant=variant)
        for variant in resumed:
            log.info("experiment.variant_resumed_by_fleet", experiment=self.experiment,
                     variant=variant)
        return paused, resumed

    def start(self, assigner: Assigner) -> None:
        async def follow() -> None:
            while True:
                await self.sync(assigner)
                await asyncio.sleep(self.sync_s)

        self._task = asyncio.get_running_loop().create_task(follow())

    async def stop(self) -> None:
        if self._writes:  # a pause just made reaches the fleet before the engine goes
            await asyncio.wait(list(self._writes), timeout=2.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):  # closing a client whose Redis is gone
            await self.redis.aclose()
