"""The fleet benchmark's command round trips (bench_fleet.py): a console attached to one
engine's supervisor API takes over every live call of the fleet in turn, says a line and
hands the call back, one command at a time as a supervisor would, and times each until
its reply (take_over and hand_back are state changes: their round trip is the routing's;
say returns once the line is synthesized and queued, so it adds the TTS's time). A call
another engine owns is routed through Redis to its owner (engine/fleet/commands_relay.py);
the reply names the engine that ran it, which must be the owner the snapshot named. Not
a benchmark itself."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from console.client import SupervisorClient
from engine.bus.events import CallState
from engine.supervision.api_schema import CommandName, Snapshot

SAY = "Thank you for waiting."
# One supervisor's visit to a call: what is sent, in order.
VISIT: tuple[tuple[CommandName, str | None], ...] = (
    ("take_over", None), ("say", SAY), ("hand_back", None))


async def command_round_trips(api_url: str, token: str, until: float,
                              names: dict[str, str]) -> list[dict[str, Any]]:
    """Commands until `until` (monotonic); one record per command. `names` maps engine
    ids to the bench's engine names."""
    client = SupervisorClient(api_url, token, reply_timeout_s=5.0)
    first: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()

    async def follow() -> None:
        async for item in client.frames():
            if isinstance(item, Snapshot) and not first.done():
                first.set_result(item)

    task = asyncio.create_task(follow())
    records: list[dict[str, Any]] = []
    try:
        snapshot = await asyncio.wait_for(first, 15)
        attached = client.hello.engine_id if client.hello else ""
        live = [(c.call_sid, c.engine_id or attached) for c in snapshot.calls
                if c.state not in (CallState.ENDED, CallState.CONNECTED)]
        # Owners in turn (a, b, c, a, …): a short phase still reaches every engine.
        taken: dict[str, int] = {}
        order = []
        for sid, owner in live:
            order.append((taken.get(owner, 0), owner, sid))
            taken[owner] = taken.get(owner, 0) + 1
        calls = [(sid, owner) for _, owner, sid in sorted(order)]
        while calls and time.monotonic() < until:
            for sid, owner in calls:
                if time.monotonic() >= until:
                    break
                for command, text in VISIT:
                    began = time.perf_counter()
                    reply = await client.send_command(command, sid, text=text)
                    took_ms = (time.perf_counter() - began) * 1000
                    records.append({"command": command, "owner": names.get(owner, owner),
                                    "local": owner == attached, "ok": reply.ok,
                                    "error": reply.error, "ms": took_ms,
                                    "ran_on": names.get(reply.engine_id, reply.engine_id)})
    finally:
        await client.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return records

