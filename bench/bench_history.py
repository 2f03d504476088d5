"""How long a history write keeps a call waiting, and how much the event loop is blocked.

Runs N concurrent calls each writing usage (with its cost lines) + a turn per step, as a
busy engine would, and reports the await latency of `turn_completed` (write + commit) and
the worst event-loop stall seen by a 1 ms ticker meanwhile.

    .venv/bin/python -m bench.bench_history --calls 20 --turns 50
    .venv/bin/python -m bench.bench_history --dsn postgresql://postgres@127.0.0.1:5432/test

With --dsn the history is PostgreSQL's, in a schema of the run's own (dropped after).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from engine.config import PricesConfig
from engine.money.prices import PriceTable
from engine.providers.base import Usage
from engine.record.history import CallHistory
from engine.record.metrics import percentile
from engine.session.records import TurnRecord, TurnTimings

USAGE = Usage("openai", "llm", "gpt-5.4-mini", input_tokens=900, output_tokens=40)
LINES = PriceTable(PricesConfig()).cost_lines(USAGE)  # an LLM call's two lines


async def one_call(history: CallHistory, sid: str, turns: int, waits: list[float]) -> None:
    await history.call_started(sid, "+15550001", "+15550002")
    for i in range(turns):
        await history.usage_recorded(sid, USAGE, LINES)
        started = time.perf_counter()
        await history.turn_completed(sid, TurnRecord(
            idx=i, caller_text="what are your opening hours", agent_text="We open at nine.",
            heard_text="We open at nine.", caller_audio_s=2.0, agent_audio_s=1.5,
            timings=TurnTimings(stt=0.2, llm_first_token=0.3, voice_to_voice=0.8)))
        waits.append(time.perf_counter() - started)
        await asyncio.sleep(0.005)  # the rest of the turn
    await history.call_ended(sid, "hangup", 0.01)


async def ticker(stop: asyncio.Event, stalls: list[float]) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        stalls.append(time.perf_counter() - before - 0.001)


@asynccontextmanager
async def scratch_schema(dsn: str) -> AsyncIterator[str]:
    """`dsn` with its search_path on a new schema, dropped afterwards."""
    import asyncpg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        yield f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def main(calls: int, turns: int, dsn: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if dsn:
            async with scratch_schema(dsn) as scratch:
                history = CallHistory.postgres(scratch, tmp, engine_id="bench")
                await run(history, calls, turns)
        else:
            await run(CallHistory(Path(tmp) / "bench.sqlite3", engine_id="bench"), calls,
                      turns)


async def run(history: CallHistory, calls: int, turns: int) -> None:
    await history.open()
    waits: list[float] = []
    stalls: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop, stalls))
    started = time.perf_counter()
    await asyncio.gather(*(one_call(history, f"CA{i:04d}", turns, waits)
                           for i in range(calls)))
    elapsed = time.perf_counter() - started
    stop.set()
    await tick
    await history.aclose()
    waits.sort()
    writes = calls * (2 + 2 * turns)
    print(f"{calls} calls x {turns} turns: {writes} writes in {elapsed:.2f} s "
          f"({writes / elapsed:,.0f} writes/s)")
    print(f"turn_completed await: median {statistics.median(waits) * 1000:.2f} ms, "
          f"p95 {(percentile(waits, 95) or 0) * 1000:.2f} ms, "
          f"p99 {(percentile(waits, 99) or 0) * 1000:.2f} ms")
    print(f"worst event-loop stall: {max(stalls) * 1000:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--dsn", default="", help="PostgreSQL instead of SQLite")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.turns, args.dsn))
