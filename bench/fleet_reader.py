"""The fleet benchmark's event reader: one subscription to the fleet's Redis stream, in a
process of its own as a console would be, noting when each event arrived.

Run by bench/bench_fleet.py (not usually by hand):
  .venv/bin/python bench/fleet_reader.py REDIS_URL KEY_PREFIX OUT

It reads through the engine's own Redis reading code (engine/bus/redis_reading.py: plain
XREAD, blocking, from the stream's newest entry on). Per event it keeps the engine, the
type, the publisher's stamp `ts` and the arrival time (both unix seconds, one machine's
clock), plus the reason of a CallEnded. Prints "ready" once subscribed; at SIGTERM it
writes everything to OUT as JSON and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.bus.events import BusGap, CallEnded
from engine.bus.redis_streams import RedisEventBus


async def read(url: str, key_prefix: str) -> dict[str, Any]:
    bus = RedisEventBus(url, key_prefix=key_prefix, block_ms=1000, client_name="bench-reader")
    records: list[list[Any]] = []  # [engine_id, type, ts, arrival, call_sid, end reason]
    gaps: list[dict[str, Any]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def follow() -> None:
        stream = bus.subscribe()
        print(json.dumps({"ready": True}), flush=True)
        async for _, event in stream:
            now = time.time()
            if isinstance(event, BusGap):
                gaps.append(event.model_dump(mode="json"))
                continue
            reason = event.reason if isinstance(event, CallEnded) else None
            records.append([event.engine_id, event.type, event.ts, now,
                            getattr(event, "call_sid", ""), reason])

    task = loop.create_task(follow())
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await bus.aclose()
    return {"events": records, "gaps": gaps}


def main() -> int:
    url, key_prefix, out = sys.argv[1:4]
    Path(out).write_text(json.dumps(asyncio.run(read(url, key_prefix))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
