"""Which engines of the fleet died, and who marks their calls lost.

Every engine watches, after each heartbeat of its own that got through (an engine that
cannot reach Redis judges nobody). A member of `{prefix}:engines` whose key has expired
has been silent for `dead_after_s` by Redis's clock, so clocks of other machines do not
matter. The first watcher to `SET NX` the engine's `lost` claim handles it: each call the
engine owned is handed to `on_lost` once, then the engine's entries go. The claim
outlives the handling, so a slower watcher that saw the same death finds it taken.

If Redis fails between the claim and the end of the handling, the claim expires after
`claim_ttl_s` and another watcher starts over (calls already marked may then be marked
twice: consumers treat a second end of an ended call as a no-op).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from engine.fleet.redis_link import FleetRedis
from engine.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class LostCall:
    call_sid: str
    engine_id: str  # the dead engine that owned it
    started_at: float  # unix seconds
    last_seen: float  # the dead engine's last heartbeat (unix seconds)


OnLost = Callable[[LostCall], Awaitable[None]]


class DeadEngineWatcher:
    def __init__(self, link: FleetRedis, engine_id: str, on_lost: OnLost, *,
                 claim_ttl_s: float = 120.0, clock: Callable[[], float] = time.time) -> None:
        self.link = link
        self.engine_id = engine_id
        self.on_lost = on_lost
        self.claim_ttl_s = claim_ttl_s
        self._clock = clock
        self.declared: list[str] = []  # the dead engines this watcher handled
        self.calls_marked = 0

    async def check(self) -> None:
        """Find the members whose key expired; handle those this watcher claims."""
        keys = self.link.keys
        members: Any = await self.link.run(
            lambda c: c.zrange(keys.engines, 0, -1, withscores=True), "watch")
        others = [(str(m), float(s)) for m, s in members or () if m != self.engine_id]
        if not others:
            return

        async def alive(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            for member, _ in others:
                pipe.exists(keys.engine(member))
            return await pipe.execute()

        flags = await self.link.run(alive, "watch")
        if flags is None:
            return
        for (member, last_seen), is_alive in zip(others, flags, strict=True):
            if not is_alive:
                await self._handle_dead(member, last_seen)

    async def _handle_dead(self, engine_id: str, last_seen: float) -> None:
        keys = self.link.keys
        claimed = await self.link.run(
            lambda c: c.set(keys.lost(engine_id), self.engine_id, nx=True,
                            ex=max(1, int(self.claim_ttl_s))), "claim")
        if not claimed:  # another watcher has it (or Redis failed: tried next beat)
            return
        calls = await self.link.run(lambda c: c.hgetall(keys.calls(engine_id)), "read_calls")
        if calls is None:
            return
        log.warning("fleet.engine_dead", engine=engine_id, calls=len(calls),
                    silent_s=round(self._clock() - last_seen, 1), handled_by=self.engine_id)

        async def mark(sid: str, started: Any) -> None:
            try:
                await self.on_lost(LostCall(sid, engine_id, _seconds(started), last_seen))
                self.calls_marked += 1
            except Exception:  # one call's marking must not stop the others'
                log.exception("fleet.mark_lost_failed", call_sid=sid)

        # All at once: one by one, each call waited for the previous one's history update
        # (20 calls took 2 s on a loaded machine, past the 10 s the fleet promises).
        await asyncio.gather(*(mark(str(sid), started) for sid, started in calls.items()))

        async def forget(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.zrem(keys.engines, engine_id)
            pipe.delete(keys.calls(engine_id), keys.engine(engine_id))
            return await pipe.execute()

        await self.link.run(forget, "forget_dead")
        self.declared.append(engine_id)


def _seconds(raw: Any) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return 0.0
