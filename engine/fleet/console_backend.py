"""One console for the whole fleet: the supervisor API backend of a fleet engine.

With the fleet on (`[fleet] enabled`, `redis.url`) and the Redis bus, an engine's
supervisor API serves every live call of the fleet (its own from its hub, the others'
from the shared stream: fleet_view.py), each marked with its owning engine, and runs
each command on the engine that owns the call (commands_relay.py). Hello says
`fleet: true`. Tokens, the read-only role and named supervisors are the attached
engine's, checked there before a command leaves it.
"""

from __future__ import annotations

from engine.config import Config
from engine.fleet.commands_relay import CommandRelay, FleetCommands, relay_client
from engine.fleet.fleet_view import RemoteCalls
from engine.fleet.membership import FleetMembership
from engine.hub import OpsHub
from engine.log import get_logger
from engine.supervision.api_schema import Hello, Snapshot
from engine.supervision.backend import CommandRunner
from engine.supervision.views import CallViews

log = get_logger(__name__)


class FleetConsoleBackend:
    """`SupervisorBackend` over the hub (this engine's calls) and the fleet's."""

    def __init__(self, hub: OpsHub, remote: RemoteCalls, relay: CommandRelay) -> None:
        self.hub = hub
        self.engine_id = hub.engine_id
        self.bus = hub.bus
        self.remote = remote
        self.relay = relay
        self._commands = FleetCommands(relay, hub.commands, self._is_local,
                                       remote.owner_of)

    def _is_local(self, call_sid: str) -> bool:
        registry = self.hub.registry
        return call_sid in self.hub.views or (
            registry is not None and registry.get_any(call_sid) is not None)

    @property
    def commands(self) -> CommandRunner:
        return self._commands

    def hello(self) -> Hello:
        return self.hub.hello().model_copy(update={"fleet": True})

    async def prepare_snapshot(self, cursor: str) -> None:
        """Before a snapshot pinned at `cursor`: the remote views have read that far."""
        await self.remote.caught_up(cursor)

    def snapshot(self) -> Snapshot:
        snapshot = self.hub.snapshot()
        ours = {call.call_sid for call in snapshot.calls}
        others = [c for c in self.remote.call_snapshots() if c.call_sid not in ours]
        return snapshot.model_copy(update={"calls": snapshot.calls + others})

    async def start(self) -> None:
        await self.remote.start()
        self.relay.start()

    async def stop(self) -> None:
        await self.relay.stop()
        await self.remote.stop()


def fleet_console(config: Config, hub: OpsHub,
                  membership: FleetMembership | None) -> FleetConsoleBackend | None:
    """The fleet console backend when the fleet is on with the Redis bus, else None."""
    if membership is None:
        return None
    if config.bus.backend != "redis":
        log.warning("fleet.console_local_only",
                    reason="bus.backend is not redis: consoles see this engine's calls only")
        return None
    link = membership.link
    remote = RemoteCalls(hub.bus, hub.engine_id,
                         CallViews(config, hub.ledger, hub.metrics, hub.engine_id),
                         replay_from=lambda: oldest_live_call(membership))
    relay = CommandRelay(relay_client(config.redis.url, config.fleet.redis_op_timeout_s),
                         link.keys, hub.engine_id, hub.commands,
                         op_timeout_s=config.fleet.redis_op_timeout_s,
                         reply_timeout_s=config.fleet.command_timeout_s)
    return FleetConsoleBackend(hub, remote, relay)


async def oldest_live_call(membership: FleetMembership) -> float | None:
    """The start (unix s) of the oldest call another live engine owns; None if none."""
    link, me = membership.link, membership.card.engine_id

    async def read(client: object) -> list[dict[str, str]]:
        engines = await client.zrange(link.keys.engines, 0, -1)  # type: ignore[attr-defined]
        pipe = client.pipeline(transaction=False)  # type: ignore[attr-defined]
        for engine_id in engines:
            if engine_id != me:
                pipe.hgetall(link.keys.calls(engine_id))
        return list(await pipe.execute())

    hashes = await link.run(read, "fleet_view_start")
    starts = [float(t) for calls in hashes or () for t in calls.values()
              if _is_number(t)]
    return min(starts) if starts else None


def _is_number(raw: str) -> bool:
    try:
        float(raw)
    except (TypeError, ValueError):
        return False
    return True
