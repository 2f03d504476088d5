"""What the supervisor API needs from the engine: the `SupervisorBackend` port, and who acts.

The engine's hub implements it (call views for hello and snapshot, its supervisor
commands as the command runner); the API's tests implement it over a dict of calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from engine.bus.event_bus import EventBus
from engine.supervision.api_schema import Command, Hello, Reply, Snapshot
from engine.supervision.tokens import Role


@dataclass(frozen=True, slots=True)
class Actor:
    """Who sends a console's commands: the name of the token the console authenticated
    with (what the audit trail records), its role, and the name the console claimed for
    itself in X-Switchboard-Actor ("" if none): recorded as a claim, never trusted."""

    name: str
    role: Role
    claimed: str = ""


class CommandRunner(Protocol):
    """Performs supervisor commands and audits every one, performed or refused, once: a
    log line, a CommandAudit event and a row in the history's actions."""

    async def execute(self, command: Command, actor: Actor) -> Reply:
        """Perform one command; Reply(ok=True), or Reply(ok=False, error=<why>) having
        changed nothing."""
        ...

    def refuse(self, command: Command, actor: Actor, error: str) -> Reply:
        """Audit a command the API refused before it ran (its token may not act, its
        arguments are invalid, too many are pending); its Reply(ok=False, error)."""
        ...


class SupervisorBackend(Protocol):
    """What the engine provides to the API (implemented by the engine's wiring)."""

    engine_id: str
    bus: EventBus

    @property
    def commands(self) -> CommandRunner: ...

    def snapshot(self) -> Snapshot:
        """Every live and recently ended call, and the spend totals, from live state.
        Leave `cursor` empty: the API sets it."""
        ...

    def hello(self) -> Hello:
        """Engine id, transfer destinations, default queue number (`readonly` is set by
        the API)."""
        ...
