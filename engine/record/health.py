"""What /healthz says of the history and the bus: a section each, and what is wrong in
words for its `degraded` list (the status is not "ok" while the history spools or fails,
or the bus cannot reach Redis)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from engine.bus.event_bus import BusHealth
from engine.record.writer import HistoryStats


def history_section(stats: HistoryStats | None, degraded: list[str]) -> dict[str, Any]:
    """The history's section ({"status": "off"} without one)."""
    if stats is None:
        return {"status": "off"}
    if stats.status == "failing":
        degraded.append(f"history failing: {stats.in_memory} writes held in memory only, "
                        f"the journal cannot be written ({stats.journal_error})")
    elif stats.status == "spooling":
        degraded.append(f"history spooling: {stats.backlog} writes in the journal wait for "
                        f"the {stats.backend} database ({stats.last_error})")
    return asdict(stats)


def bus_section(health: BusHealth, degraded: list[str]) -> dict[str, Any]:
    if not health.reachable:
        degraded.append(f"bus unreachable: {health.buffered} events buffered, "
                        f"{health.dropped} dropped ({health.last_error})")
    return asdict(health)
