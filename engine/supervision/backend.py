"""What the supervisor API needs from the engine: the `SupervisorBackend` port.

The engine's hub implements it (call views for hello and snapshot, supervisor commands
for execute); the API's tests implement it over a dict of calls.
"""

from __future__ import annotations

from typing import Protocol

from engine.bus.event_bus import EventBus
from engine.supervision.api_schema import Command, Hello, Reply, Snapshot


class SupervisorBackend(Protocol):
    """What the engine provides to the API (implemented by the engine's wiring)."""

    engine_id: str
    bus: EventBus

    def snapshot(self) -> Snapshot:
        """Every live and recently ended call, and the spend totals, from live state.
        Leave `cursor` empty: the API sets it."""
        ...

    async def execute(self, command: Command, actor: str) -> Reply:
        """Perform one command; Reply(ok=True) or Reply(ok=False, error=<why>) having
        changed nothing. Audits it (call history + a CommandAudit event)."""
        ...

    def hello(self) -> Hello:
        """Engine id, transfer destinations, default queue number (`readonly` is set by
        the API)."""
        ...
