"""This engine in the fleet: registered in Redis with a heartbeat, and the calls it owns.

Every `heartbeat_s` one pipelined round trip refreshes the engine's hash (name, address,
load, draining) and its expiry, its score in `{prefix}:engines` and the expiry of its
calls. A call costs two more operations: added when it starts, removed when it ends. The
keys layout is in redis_link.py.

A Redis outage never touches a call: operations fail fast, quietly (one log line per
outage), and the next heartbeat that gets through writes the whole set of calls again
(what changed meanwhile); so does the one after a beat that found fewer calls in Redis
than the engine owns (Redis restarted empty, or failed over and lost writes). After an outage this
engine watches others only once they have had the time to heartbeat again
(`dead_after_s` and a beat), so nobody is declared dead for an outage all shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine.config.fleet import FleetConfig
from engine.fleet.redis_link import FleetRedis
from engine.fleet.watcher import DeadEngineWatcher
from engine.log import get_logger
from engine.tasks import stop_task

log = get_logger(__name__)

# A dead engine's calls are kept this many heartbeat deadlines for the watchers to read.
_CALLS_KEPT_DEADLINES = 10


class OwnedCall(Protocol):
    """What the membership needs of a call (a CallSession)."""

    call_sid: str
    created_at: float  # unix seconds

    async def wait_ended(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class EngineCard:
    """How the fleet knows this engine."""

    engine_id: str  # per process start, as in its events
    name: str  # the stable engine.engine_id (or host:port)
    address: str  # where it is reached (engine.public_url, or host:port)


class FleetMembership:
    def __init__(self, link: FleetRedis, card: EngineCard, config: FleetConfig, *,
                 load: Callable[[], int], draining: Callable[[], bool],
                 watcher: DeadEngineWatcher | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.link = link
        self.card = card
        self.config = config
        self.watcher = watcher
        self._load = load
        self._draining = draining
        self._clock = clock
        self._calls: dict[str, float] = {}  # what this engine owns: sid -> started_at
        self._tasks: set[asyncio.Task[None]] = set()
        self._changes: list[tuple[str, float | None]] = []  # calls to add (start) / remove
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        self._dirty = True  # the calls in Redis may differ from ours: rewrite them
        self._watch_after = 0.0  # monotonic; no watching before (after an outage)
        self._declared_dead_logged = False
        self.started_at = clock()
        self.heartbeats = 0
        link.on_failure = self._mark_dirty

    def _mark_dirty(self) -> None:
        self._dirty = True

    @property
    def owned(self) -> dict[str, float]:
        return dict(self._calls)

    def health(self) -> dict[str, Any]:
        """/healthz's "fleet" section."""
        return {"engine_id": self.card.engine_id, "name": self.card.name,
                "registered": self.heartbeats > 0 and not self.link.down,
                "owned_calls": len(self._calls), "heartbeats": self.heartbeats,
                "redis_failures": self.link.failures}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.beat()
        self._loop = asyncio.get_running_loop().create_task(self._run(), name="fleet-heartbeat")
        log.info("fleet.joined", engine=self.card.engine_id, name=self.card.name,
                 address=self.card.address, registered=not self.link.down)

    async def stop(self) -> None:
        """Leave the fleet (the engine's calls have ended): its keys go at once, so no
        watcher mistakes a clean stop for a death."""
        await asyncio.gather(*(stop_task(task)
                               for task in [self._loop, *self._tasks, self._writer]))
        keys, engine_id = self.link.keys, self.card.engine_id

        async def leave(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.zrem(keys.engines, engine_id)
            pipe.delete(keys.engine(engine_id), keys.calls(engine_id))
            return await pipe.execute()

        left = await self.link.run(leave, "leave")
        log.info("fleet.left", engine=engine_id, deregistered=left is not None,
                 calls_left=len(self._calls))
        with contextlib.suppress(Exception):  # closing a dead connection may complain
            await self.link.aclose()

    # -- calls -----------------------------------------------------------------------------

    def track(self, call: OwnedCall) -> None:
        """Own `call` in the fleet from now until it ends."""
        task = asyncio.get_running_loop().create_task(self._own(call),
                                                      name=f"fleet-own-{call.call_sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _own(self, call: OwnedCall) -> None:
        sid = call.call_sid
        self._calls[sid] = call.created_at
        self._write(sid, call.created_at)
        try:
            await call.wait_ended()
        finally:
            self._calls.pop(sid, None)
        self._write(sid, None)

    def _write(self, sid: str, started_at: float | None) -> None:
        """Queue a call's addition (its start) or removal (None) for the writer."""
        self._changes.append((sid, started_at))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_changes(),
                                                                  name="fleet-calls")

    async def _write_changes(self) -> None:
        """Everything queued meanwhile goes in one pipelined round trip, in order, on one
        connection (a burst of calls must not open a connection each)."""
        key = self.link.keys.calls(self.card.engine_id)
        while self._changes:
            batch, self._changes = self._changes, []

            async def write(client: Any, batch: list[tuple[str, float | None]] = batch) -> Any:
                pipe = client.pipeline(transaction=False)
                for sid, started_at in batch:
                    if started_at is None:
                        pipe.hdel(key, sid)
                    else:
                        pipe.hset(key, sid, repr(started_at))
                return await pipe.execute()

            await self.link.run(write, "calls")  # a failure: the next beat rewrites all

    # -- heartbeat -------------------------------------------------------------------------

    async def _run(self) -> None:
        period = self.config.heartbeat_s
        wait = period  # start() made the first beat
        while True:
            await asyncio.sleep(wait)
            began = time.monotonic()
            alive = await self.beat()
            if alive and self.watcher is not None and began >= self._watch_after:
                await self.watcher.check()
            wait = max(0.0, period - (time.monotonic() - began))

    async def beat(self) -> bool:
        """One heartbeat; False when Redis did not take it."""
        keys, card, config = self.link.keys, self.card, self.config
        rewrite = dict(self._calls) if self._dirty else None
        self._dirty = False  # a failure from here on sets it again
        now = self._clock()

        async def heartbeat(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            calls = keys.calls(card.engine_id)
            if rewrite is not None:
                pipe.delete(calls)
                if rewrite:
                    pipe.hset(calls, mapping={s: repr(t) for s, t in rewrite.items()})
            pipe.hset(keys.engine(card.engine_id), mapping={
                "name": card.name, "address": card.address, "load": self._load(),
                "draining": int(self._draining()), "started_at": repr(self.started_at),
                "heartbeat_at": repr(now)})
            pipe.pexpire(keys.engine(card.engine_id), int(config.dead_after_s * 1000))
            pipe.zadd(keys.engines, {card.engine_id: now})
            pipe.pexpire(calls, int(config.dead_after_s * _CALLS_KEPT_DEADLINES * 1000))
            pipe.hlen(calls)
            pipe.exists(keys.lost(card.engine_id))
            return await pipe.execute()

        replies = await self.link.run(heartbeat, "heartbeat")
        if replies is None:
            return False
        self.heartbeats += 1
        if self.link.succeeded() is not None:
            # Others missed their beats too: give them the time to come back.
            self._watch_after = time.monotonic() + config.dead_after_s + config.heartbeat_s
        settled = not self._changes and (self._writer is None or self._writer.done())
        if settled and replies[-2] != len(self._calls):
            # Redis lost them (a restart, a failover) or a watcher took them: write them
            # again at the next beat (a call added meanwhile only costs a rewrite).
            self._dirty = True
        if replies[-1] and not self._declared_dead_logged:
            self._declared_dead_logged = True
            log.error("fleet.declared_dead", engine=card.engine_id,
                      detail="this engine missed its heartbeats for too long; the fleet "
                             "marked its calls lost while they went on")
        return True
