"""What the two load benches share (bench_calls.py, bench_turns.py).

Each is a coordinator that starts an engine process and caller processes (the same
script, run as `SCRIPT --worker SPEC OUT`), measures, and prints a table and a JSON line.
A caller process places one SimulatedCaller per start time in its spec (one clock,
CLOCK_MONOTONIC, for every process on the machine) and writes what they got to OUT.
The engine can be pinned to a core of its own and every process reniced.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes import LoopLag

if TYPE_CHECKING:
    import aiohttp

    from engine.sim.call_result import CallResult
    from engine.sim.caller import SimulatedCaller
    from engine.sim.scenario import Scenario

WorkerMain = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_ready(line: str | bytes, log_path: Path) -> None:
    """The engine process's first line on stdout says it is ready, or it failed."""
    if ('"ready"' if isinstance(line, str) else b'"ready"') not in line:
        raise RuntimeError(f"engine did not start: {line!r}; see {log_path}")


# -- CPUs and priorities ---------------------------------------------------------------


def renice(pids: list[int], niceness: int | None) -> None:
    """--nice: every process of the bench at this niceness (below 0 needs root), so other
    work on a shared machine takes less of their CPUs."""
    if niceness is not None:
        for pid in pids:
            os.setpriority(os.PRIO_PROCESS, pid, niceness)


# The CPUs this bench may use, read once: pinning narrows this process's own affinity,
# and a later level must still pin its engine to the first of all of them.
CPUS = sorted(os.sched_getaffinity(0))


def pin_processes(engine_pid: int, others: list[int]) -> bool:
    """The engine alone on the first CPU, everything else on the rest (when there are
    two or more): the engine's CPU and latency are one core's."""
    cpus = CPUS
    if len(cpus) < 2:
        return False
    os.sched_setaffinity(engine_pid, {cpus[0]})
    for pid in [os.getpid(), *others]:
        os.sched_setaffinity(pid, set(cpus[1:]))
    return True


# -- caller processes ----------------------------------------------------------------------


def worker_command(script: str, tmp: Path, name: str, spec: dict[str, Any]) -> list[str]:
    """Write a caller process's spec; the command line that runs it."""
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    return [sys.executable, script, "--worker", str(spec_path), str(tmp / f"{name}.out.json")]


def worker_output(tmp: Path, name: str) -> dict[str, Any]:
    output: dict[str, Any] = json.loads((tmp / f"{name}.out.json").read_text())
    return output


def run_if_worker(worker_main: WorkerMain) -> bool:
    """In a caller process (`--worker SPEC OUT`): run `worker_main(spec)`, write its
    result to OUT and return True. In the coordinator: False."""
    if not (len(sys.argv) == 4 and sys.argv[1] == "--worker"):
        return False
    spec = json.loads(Path(sys.argv[2]).read_text())
    result = asyncio.run(worker_main(spec))
    Path(sys.argv[3]).write_text(json.dumps(result))
    return True


async def place_calls(start_times: list[float],
                      make_caller: Callable[[aiohttp.ClientSession], SimulatedCaller],
                      scenario: Scenario, hang_up_at: float | None = None,
                      lag: LoopLag | None = None,
                      ) -> tuple[list[CallResult], list[float]]:
    """Start one caller per start time (monotonic), each on a socket of its own; with
    `hang_up_at`, every caller hangs up then. Returns their results and the lag samples
    of this process's event loop (ms) over the run (`lag`'s, when given: its stalls)."""
    import aiohttp

    lag = lag or LoopLag()
    lag_task = lag.start()
    callers: list[SimulatedCaller] = []
    runs: list[asyncio.Task[CallResult]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for start_at in start_times:
            delay = start_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            caller = make_caller(http)
            callers.append(caller)
            runs.append(asyncio.create_task(caller.run(scenario)))
        if hang_up_at is not None:
            await asyncio.sleep(max(0.0, hang_up_at - time.monotonic()))
            await asyncio.gather(*(c.hang_up() for c in callers), return_exceptions=True)
        results = await asyncio.gather(*runs)
    lag_task.cancel()
    return results, lag.samples_ms


# -- the coordinator's output --------------------------------------------------------------


def report(result: dict[str, Any], json_only: bool,
           print_table: Callable[[dict[str, Any]], None]) -> int:
    """The table (unless --json-only), then the whole result as one JSON line."""
    if not json_only:
        print_table(result)
    print(json.dumps(result))
    return 0
