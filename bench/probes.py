"""What the load benches measure about their processes: CPU time, memory and load from
/proc, event-loop lag, loop stalls (where the loop was, and whether it ran or waited for a
CPU) and garbage-collector pauses. Shared by bench_calls.py, bench_turns.py and their
engine processes (bench_engine_proc.py, bench_turns_engine.py), so all report alike."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- /proc readings ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB / 1024


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- in-process probes ---------------------------------------------------------------------

# A loop wake-up later than this is a stall (issue 12's target: none over 20 ms).
STALL_MS = 20.0


def runqueue_wait_ms() -> float:
    """How long this process's main thread (the event loop's) has waited for a CPU while
    runnable: the kernel's `run_delay` (/proc/self/schedstat), 0 where not available."""
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


_TICK_MS = 1000 / CLK_TCK


def steal_ms(cpus: set[int]) -> float:
    """Time the hypervisor ran something else on `cpus` (/proc/stat's steal, in 10 ms
    ticks): the guest counts it as its own running time."""
    total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                fields = line.split()
                if int(fields[0][3:]) in cpus:
                    total += int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0.0
    return total * _TICK_MS


class LoopLag:
    """How late this process's event loop wakes a sleeper: its own scheduling delay. A
    stall is kept with the machine's share of it: the time the loop's thread waited for a
    CPU, and the time the hypervisor took the process's CPUs (steal)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        # (monotonic time, lag ms, ms waiting for a CPU, ms stolen) for lags over 20 ms
        self.stalls: list[tuple[float, float, float, float]] = []
        self._cpus = os.sched_getaffinity(0)

    def start(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            waited, stolen = runqueue_wait_ms(), steal_ms(self._cpus)
            await asyncio.sleep(self.interval_s)
            lag_ms = (loop.time() - due) * 1000
            self.samples_ms.append(lag_ms)
            if lag_ms > STALL_MS:
                self.stalls.append((round(time.monotonic(), 3), round(lag_ms, 1),
                                    round(runqueue_wait_ms() - waited, 1),
                                    round(steal_ms(self._cpus) - stolen, 1)))

    def summary(self) -> dict[str, Any]:
        if not self.samples_ms:
            return {}
        arr = np.array(self.samples_ms)
        return {"p50_ms": round(float(np.percentile(arr, 50)), 2),
                "p99_ms": round(float(np.percentile(arr, 99)), 2),
                "max_ms": round(float(arr.max()), 2), "samples": len(arr),
                "stalls_over_20ms": len(self.stalls), "stalls": self.stalls[-20:],
                "stall_times": [at for at, *_ in self.stalls]}

    def reset(self) -> None:
        self.samples_ms.clear()
        self.stalls.clear()


class StallWatchdog:
    """Debug aid (--watch-stalls): where the loop was when it stalled, and whether the
    process was running (CPU time) or waiting for a CPU during the stall."""

    def __init__(self, threshold_s: float = STALL_MS / 1000) -> None:
        self.threshold_s = threshold_s
        self.beat = time.monotonic()
        self.reports: list[dict[str, Any]] = []
        self._main = threading.main_thread().ident

    def start(self) -> asyncio.Task[None]:
        """The loop's heartbeat task, and the thread that watches it."""
        self.beat = time.monotonic()
        threading.Thread(target=self.watch, daemon=True).start()
        return asyncio.get_running_loop().create_task(self.heartbeat())

    async def heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(0.005)

    def watch(self) -> None:
        while True:
            time.sleep(0.01)
            stalled = time.monotonic() - self.beat
            if stalled < self.threshold_s:
                continue
            cpu0, wall0 = time.process_time(), time.monotonic()
            frame = sys._current_frames().get(self._main or 0)
            stack = traceback.format_stack(frame, limit=12) if frame is not None else []
            beat = self.beat
            while self.beat == beat and time.monotonic() - wall0 < 1.0:
                time.sleep(0.002)
            wall = time.monotonic() - wall0
            self.reports.append({"at": round(wall0, 3), "stalled_ms": round(stalled * 1000),
                                 "rest_ms": round(wall * 1000),
                                 "cpu_ms_in_rest": round((time.process_time() - cpu0) * 1000),
                                 "stack": [ln.strip().replace("\n", " | ")
                                           for ln in stack[-6:]]})


class GcPauses:
    """Collector pauses in this process (a full collection stops every call): each with
    the objects it traversed (a full one: the whole old generation) and the garbage it
    found (cycles that reference counting could not free)."""

    def __init__(self) -> None:
        # (gen, at, wall ms, cpu ms, objects traversed, garbage found)
        self.pauses: list[tuple[int, float, float, float, int, int]] = []
        self._t0 = 0.0
        self._c0 = 0.0
        self._size = 0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gen = int(info["generation"])
            # What a full collection traverses (counted before its clock starts).
            self._size = len(gc.get_objects(2)) if gen == 2 else gc.get_count()[0]
            self._t0 = time.perf_counter()
            self._c0 = time.thread_time()
        else:
            ms = (time.perf_counter() - self._t0) * 1000
            cpu_ms = (time.thread_time() - self._c0) * 1000
            self.pauses.append((int(info["generation"]), round(time.monotonic(), 3),
                                round(ms, 2), round(cpu_ms, 2), self._size,
                                int(info["collected"])))

    def summary(self) -> dict[str, Any]:
        by_gen: dict[str, Any] = {}
        for gen in (0, 1, 2):
            ms = [p[2] for p in self.pauses if p[0] == gen]
            if ms:
                by_gen[f"gen{gen}"] = {"count": len(ms), "max_ms": round(max(ms), 2),
                                       "total_ms": round(sum(ms), 1),
                                       "garbage": sum(p[5] for p in self.pauses if p[0] == gen)}
        by_gen["longest"] = sorted(self.pauses, key=lambda p: -p[2])[:5]
        by_gen["tracked_objects"] = len(gc.get_objects())
        by_gen["frozen_objects"] = gc.get_freeze_count()
        return by_gen

    def reset(self) -> None:
        self.pauses.clear()


async def gc_census(after_s: float, url: str, out: Path) -> None:
    """Debug (--gc-census): what the engine's collector tracks, `after_s` in (the ramp
    over, every call in its turns), fetched from the bench engine and written to `out`."""
    import aiohttp

    await asyncio.sleep(after_s)
    async with aiohttp.ClientSession() as http, http.get(url + "/bench/gc-census") as resp:
        body = json.dumps(await resp.json(), indent=1)
    await asyncio.to_thread(out.write_text, body)
