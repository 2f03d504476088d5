"""Console CPU with 200 live calls: decode -> model -> flush, headless.

Drives the real SupervisorConsole (run_test, 160x48) from a source that replays a
pre-generated script of API frames (JSON, decoded by the client's own parser) at the
rate 200 calls produce: per call a turn every ~4 s (three caller partials, the final
line, the agent line, a latency, three usage items), call_updated now and then, and
churn (calls end, new ones start). Measures process CPU over the run, flush time
p50/p95, and how long key presses take while the data flows.

Usage: .venv/bin/python bench/bench_console.py [--calls 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator

from console.app import SupervisorConsole
from console.calls_table import CallsTable
from console.client import ConnectionChanged, SourceItem
from engine.bus.events import (
    CallEnded,
    CallStarted,
    CallUpdated,
    EventBase,
    StateChanged,
    TranscriptLine,
    TurnLatency,
    UsageCost,
    UsageKind,
)
from engine.supervision.api_schema import (
    SERVER_FRAME,
    CallSnapshot,
    CommandName,
    EventFrame,
    Hello,
    Reply,
    Snapshot,
    SpendTotals,
)

TURN_S = 4.0
KINDS: tuple[UsageKind, ...] = ("stt", "llm", "tts")
CALL_S = 180.0  # mean call length: ~1 call ends and one starts per second at 200 calls


class ScriptSource:
    """Replays (due_time, json) frames in real time, decoding like the real client."""

    readonly = False

    def __init__(self, snapshot_json: str, script: list[tuple[float, str]]) -> None:
        self.snapshot_json = snapshot_json
        self.script = script
        self.decoded = 0
        self.finished = asyncio.Event()

    async def frames(self) -> AsyncIterator[SourceItem]:
        yield ConnectionChanged("connected", "bench")
        yield Hello(engine_id="bench")
        snapshot = SERVER_FRAME.validate_json(self.snapshot_json)
        assert isinstance(snapshot, Snapshot)
        yield snapshot
        start = time.monotonic()
        for due, data in self.script:
            delay = start + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = SERVER_FRAME.validate_json(data)
            self.decoded += 1
            if isinstance(frame, EventFrame):
                yield frame
        self.finished.set()
        await asyncio.Event().wait()

    async def send_command(self, command: CommandName, call_sid: str, *,
                           text: str | None = None, number: str | None = None) -> Reply:
        return Reply(id="bench", ok=True)

    async def close(self) -> None:
        return None


Timeline = list[tuple[float, EventBase]]


def call_turns(rng: random.Random, sid: str, start: float, end: float,
               cost: dict[str, float], timeline: Timeline) -> None:
    """One call's turns from `start` to `end`: partial and final caller lines, the agent's
    answer, its latency, usage and now and then a call update."""
    t = start + rng.uniform(0, TURN_S)
    turn = 0
    words = ["I", "would", "like", "to", "check", "my", "order", "status"]
    while t < end:
        turn += 1
        for k in (2, 4, 6):
            timeline.append((t + k * 0.3, TranscriptLine(
                call_sid=sid, speaker="caller", text=" ".join(words[:k]),
                line_id=f"{sid}-c{turn}", final=False)))
        timeline.append((t + 2.2, TranscriptLine(call_sid=sid, speaker="caller",
                                                 text=" ".join(words),
                                                 line_id=f"{sid}-c{turn}")))
        timeline.append((t + 3.0, TranscriptLine(
            call_sid=sid, speaker="agent", line_id=f"{sid}-a{turn}",
            text="Your order shipped yesterday and arrives on Friday.")))
        timeline.append((t + 3.0, TurnLatency(call_sid=sid, turn=turn,
                                              voice_to_voice_s=rng.uniform(0.6, 1.8))))
        for kind in KINDS:
            cost[sid] = cost.get(sid, 0.0) + 0.001
            timeline.append((t + 3.1, UsageCost(
                call_sid=sid, provider="p", kind=kind, cost_usd=0.001,
                call_cost_usd=cost[sid], day_cost_usd=5.0 + t / 1000,
                month_projection_usd=150.0)))
        if turn % 3 == 0:
            timeline.append((t + 3.2, CallUpdated(call_sid=sid, turns=turn)))
        t += TURN_S


def build_script(calls: int, seconds: float, seed: int = 7
                 ) -> tuple[str, list[tuple[float, str]]]:
    rng = random.Random(seed)
    now = time.time()
    snapshot = Snapshot(server_time=now, cursor="0", calls=[
        CallSnapshot(call_sid=f"CA{i:05d}", from_number=f"+1555{i:07d}", state="ai",
                     started_at=now - rng.uniform(0, CALL_S), cost_cap_usd=0.5)
        for i in range(calls)], totals=SpendTotals(daily_budget_usd=20,
                                                   monthly_budget_usd=500))
    timeline: Timeline = []
    live = [c.call_sid for c in snapshot.calls]
    next_sid = calls
    cost: dict[str, float] = dict.fromkeys(live, 0.0)
    for sid in live:
        call_turns(rng, sid, 0.0, seconds, cost, timeline)
    # Churn: calls end at a steady rate and new ones replace them.
    t = 0.0
    while t < seconds:
        t += rng.expovariate(calls / CALL_S)
        ending = live.pop(rng.randrange(len(live)))
        timeline.append((t, CallEnded(call_sid=ending, reason="caller_hangup")))
        sid = f"CA{next_sid:05d}"
        next_sid += 1
        live.append(sid)
        timeline.append((t, CallStarted(call_sid=sid, from_number=f"+1666{next_sid:07d}")))
        timeline.append((t + 0.1, StateChanged(call_sid=sid, old="connected", new="ai")))
        call_turns(rng, sid, t + 0.5, seconds, cost, timeline)
    timeline = sorted(((due, ev) for due, ev in timeline if due < seconds),
                      key=lambda item: item[0])
    script = []
    for seq, (due, event) in enumerate(timeline, 1):
        stamped = event.model_copy(update={"engine_id": "bench", "seq": seq,
                                           "ts": now + due})
        frame = EventFrame.model_validate({"id": str(seq), "event": stamped.model_dump()})
        script.append((due, frame.model_dump_json()))
    return snapshot.model_dump_json(), script


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def run(calls: int, seconds: float) -> None:
    snapshot_json, script = build_script(calls, seconds)
    source = ScriptSource(snapshot_json, script)
    app = SupervisorConsole(source, watch_terminal=False)
    press_s: list[float] = []
    async with app.run_test(size=(160, 48)) as pilot:
        table = app.query_one(CallsTable)
        while table.row_count < calls:
            await pilot.pause(0.05)
        await pilot.pause(0.5)
        app.flush_times.clear()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        next_press = wall0 + 1.0
        while not source.finished.is_set():
            if time.perf_counter() >= next_press:
                # Time from the key event to the selection having moved (handled).
                key = "j" if len(press_s) % 4 < 2 else "k"
                before = app.selected_sid()
                t0 = time.perf_counter()
                app.simulate_key(key)
                # Polling at 1 ms is the measurement itself, not a wait for a signal.
                deadline = t0 + 2.0
                while app.selected_sid() == before and time.perf_counter() < deadline:
                    await asyncio.sleep(0.001)
                press_s.append(time.perf_counter() - t0)
                next_press += 1.0
            await asyncio.sleep(0.05)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        flushes = [t * 1000 for t in app.flush_times]
        events = source.decoded
        rows = table.row_count
    wall = wall1 - wall0
    cpu_pct = 100.0 * (cpu1 - cpu0) / wall
    print(f"calls={calls} seconds={wall:.1f} events={events} ({events / wall:.0f}/s) "
          f"rows_at_end={rows}")
    print(f"cpu={cpu_pct:.1f}% of one core (target < 25%)")
    print(f"flush_ms p50={pct(flushes, 0.5):.2f} p95={pct(flushes, 0.95):.2f} "
          f"max={max(flushes, default=0):.2f} n={len(flushes)}")
    print(f"key_press_ms p50={statistics.median(press_s) * 1000:.1f} "
          f"max={max(press_s) * 1000:.1f} n={len(press_s)} (key event -> selection moved)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.seconds))


if __name__ == "__main__":
    main()
