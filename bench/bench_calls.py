"""N concurrent simulated calls against one engine process: pacing quality and cost per call.

Run: .venv/bin/python bench/bench_calls.py [--calls 200] [--duration 30] [--ramp 5]
                                            [--processes 2] [--json-only]

One engine process (bench/bench_engine_proc.py: the real Engine, signatures on, every
call plays speech-like audio without a break, no speech models) and `--processes` caller
processes, each running its share of SimulatedCallers (engine/sim/caller.py: signed
webhook, signed WebSocket, 20 ms line-silence frames sent in real time, received audio
played out in real time, marks echoed). Calls start spread over `--ramp` seconds; after
`--settle` seconds with all calls up, a `--duration` second steady-state window is
measured; then the engine stops queueing audio, the last frames drain and every caller
hangs up. What each figure means is in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AUTH_TOKEN = "bench-auth-token-5f0c2a9e7d314b68"
ACCOUNT_SID = "AC" + "b3" * 16
FRAME_S = 0.020
SPURT_GAP_S = 0.100  # a longer silence between frames starts a new talk spurt
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the caller side (one worker process) ------------------------------------------------


class LoopLag:
    """How late this process's event loop wakes a 50 ms sleeper."""

    def __init__(self) -> None:
        self.samples_ms: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.05
            await asyncio.sleep(0.05)
            self.samples_ms.append((loop.time() - due) * 1000)


async def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    from engine.log import configure_logging
    from engine.sim.caller import CallResult, SimulatedCaller
    from engine.sim.scenario import Scenario

    configure_logging("error", "json")
    # Only pauses: the callers send line silence and never need espeak.
    scenario = Scenario(name="bench-silence", wait_for_greeting=False, hangup_at_end=False,
                        steps=[])
    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run())
    connector = aiohttp.TCPConnector(limit=0)  # one socket per call, no pool cap
    callers: list[SimulatedCaller] = []
    runs: list[asyncio.Task[CallResult]] = []
    async with aiohttp.ClientSession(connector=connector) as http:
        loop = asyncio.get_running_loop()
        mono_to_loop = loop.time() - time.monotonic()
        for start_at in spec["start_times"]:
            delay = start_at + mono_to_loop - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            caller = SimulatedCaller(spec["url"], AUTH_TOKEN, ACCOUNT_SID, post_status=False,
                                     session=http)
            callers.append(caller)
            runs.append(asyncio.create_task(caller.run(scenario)))
        await asyncio.sleep(max(0.0, spec["hangup_at"] - time.monotonic()))
        await asyncio.gather(*(c.hang_up() for c in callers), return_exceptions=True)
        results = await asyncio.gather(*runs)
    lag_task.cancel()
    lag_samples = lag.samples_ms
    return {
        "calls": [{"call_sid": r.call_sid, "arrivals": r.arrivals,
                   "frames_received": r.frames_received, "frames_sent": r.frames_sent,
                   "marks_received": len(r.marks_received), "marks_echoed": len(r.marks_echoed),
                   "bad_frames": len(r.bad_frames_received), "ended_by": r.ended_by,
                   "error": r.error} for r in results],
        "loop_lag_ms": lag_samples,
    }


def run_worker(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(worker_main(spec))
    Path(out_path).write_text(json.dumps(result))
    return 0


# -- figures -------------------------------------------------------------------------------


@dataclass
class CallFigures:
    jitter_ms: list[npt.NDArray[np.float64]] = field(default_factory=list)
    steady_jitter_ms: list[npt.NDArray[np.float64]] = field(default_factory=list)
    late_frames: int = 0
    underruns: int = 0
    silence_ms: float = 0.0
    spurts: int = 0

    def summary(self, calls: int) -> dict[str, Any]:
        jitter = np.concatenate(self.jitter_ms) if self.jitter_ms else np.array([])
        steady = np.concatenate(self.steady_jitter_ms) if self.steady_jitter_ms else np.array([])
        return {
            "jitter_ms": {"p50": pct(jitter, 50), "p99": pct(jitter, 99),
                          "max": round(float(jitter.max()), 2) if len(jitter) else None,
                          "samples": len(jitter)},
            "steady_jitter_ms": {"p50": pct(steady, 50), "p99": pct(steady, 99),
                                 "max": round(float(steady.max()), 2) if len(steady) else None},
            "late_frames": self.late_frames, "silence_ms": round(self.silence_ms, 1),
            "spurts_per_call": round(self.spurts / max(1, calls), 2),
        }


def analyse_arrivals(arrivals: list[float], lead_frames: int, window: tuple[float, float],
                     fig: CallFigures) -> None:
    """Jitter within talk spurts, and underruns of a real-time playout buffer."""
    if not arrivals:
        return
    a = np.asarray(arrivals)
    gaps = np.diff(a)
    # Index of each frame within its talk spurt; a new spurt starts after a long gap.
    new_spurt = np.concatenate(([True], gaps > SPURT_GAP_S))
    spurt_id = np.cumsum(new_spurt) - 1
    spurt_start = np.flatnonzero(new_spurt)
    index_in_spurt = np.arange(len(a)) - spurt_start[spurt_id]
    fig.spurts += len(spurt_start)
    # Gap i is between frames i and i+1; it counts unless frame i+1 is in the lead burst.
    counted = index_in_spurt[1:] > lead_frames
    jitter = np.abs(gaps[counted] - FRAME_S) * 1000
    fig.jitter_ms.append(jitter)
    in_window = (a[1:][counted] >= window[0]) & (a[1:][counted] <= window[1])
    fig.steady_jitter_ms.append(jitter[in_window])
    # Playout as Twilio does it: frames play back to back from the first arrival; a frame
    # arriving after its slot has begun is late (the caller heard a gap), and playback
    # restarts from it.
    base = float(a[0])
    k = 0
    for t in a[1:]:
        k += 1
        due = base + k * FRAME_S
        if t > due:
            fig.late_frames += 1
            fig.underruns += 1
            fig.silence_ms += (t - due) * 1000
            base, k = float(t), 0


def pct(values: npt.NDArray[np.float64], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if len(values) else float("nan")


# -- the coordinator -----------------------------------------------------------------------


def http_json(url: str, method: str = "GET", timeout: float = 30.0) -> dict[str, Any]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine_cmd = [sys.executable, str(ROOT / "bench" / "bench_engine_proc.py"), "--port",
                  str(port), "--auth-token", AUTH_TOKEN, "--data-dir", str(tmp / "data"),
                  "--chunk-s", str(args.chunk_s)]
    if args.lead_ms is not None:
        engine_cmd += ["--lead-ms", str(args.lead_ms)]
    if args.gc_freeze:
        engine_cmd += ["--gc-freeze"]
    if args.watch_stalls:
        engine_cmd += ["--watch-stalls"]
    if args.cprofile:
        engine_cmd += ["--cprofile", args.cprofile]
    engine_log = open(tmp / "engine.log", "w")  # noqa: SIM115 - lives as long as the engine
    engine = subprocess.Popen(engine_cmd, stdout=subprocess.PIPE, stderr=engine_log, text=True)
    if args.engine_nice:
        os.setpriority(os.PRIO_PROCESS, engine.pid, args.engine_nice)
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cpus) >= 2
    if pin:  # the engine gets a core of its own; the callers share the others
        os.sched_setaffinity(engine.pid, {cpus[0]})
    workers: list[subprocess.Popen[bytes]] = []
    try:
        assert engine.stdout is not None
        line = engine.stdout.readline()
        if '"ready"' not in line:
            raise RuntimeError(f"engine did not start: {line!r}; see {tmp / 'engine.log'}")
        http_json(url + "/healthz")
        rss_idle = rss_mb(engine.pid)
        lead_frames = round((args.lead_ms or 80) / 1000 / FRAME_S)

        # One timeline in CLOCK_MONOTONIC, shared by every process on this machine.
        n, procs = args.calls, max(1, min(args.processes, args.calls))
        t0 = time.monotonic() + 1.5  # time for the workers to import and connect
        starts = [t0 + args.ramp * i / max(1, n) for i in range(n)]
        window_start = t0 + args.ramp + args.settle
        quiesce_at = window_start + args.duration
        hangup_at = quiesce_at + args.drain
        for k in range(procs):
            spec = {"url": url, "start_times": starts[k::procs], "hangup_at": hangup_at}
            spec_path, out_path = tmp / f"worker{k}.spec.json", tmp / f"worker{k}.out.json"
            spec_path.write_text(json.dumps(spec))
            workers.append(subprocess.Popen([sys.executable, __file__, "--worker",
                                             str(spec_path), str(out_path)]))
            if pin:
                os.sched_setaffinity(workers[-1].pid, set(cpus[1:]))

        sleep_until(window_start)
        load_start = loadavg()
        http_json(url + "/bench/reset-lag", "POST")
        wall0 = time.monotonic()
        eng_cpu0 = cpu_seconds(engine.pid)
        wrk_cpu0 = [cpu_seconds(w.pid) for w in workers]
        sleep_until(quiesce_at)
        wall1 = time.monotonic()
        eng_cpu1 = cpu_seconds(engine.pid)
        wrk_cpu1 = [cpu_seconds(w.pid) for w in workers]
        rss_busy = rss_mb(engine.pid)
        load_end = loadavg()
        mid_stats = http_json(url + "/bench/stats")
        http_json(url + "/bench/quiesce", "POST")

        for w in workers:
            if w.wait(timeout=args.duration + args.ramp + 120) != 0:
                raise RuntimeError(f"caller process exited with {w.returncode}")
        stats = http_json(url + "/bench/stats?send_times=1")
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        if engine.poll() is None:
            engine.terminate()
            try:
                engine.communicate(timeout=10)  # drains its final stats line
            except subprocess.TimeoutExpired:
                engine.kill()
        engine_log.close()

    outs = [json.loads((tmp / f"worker{k}.out.json").read_text()) for k in range(len(workers))]
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    calls = [c for o in outs for c in o["calls"]]
    window = (wall0, wall1)
    heard, produced = CallFigures(), CallFigures()
    lost = 0
    mismatched = 0
    engine_calls = stats["calls"]
    send_times: dict[str, list[float]] = stats.get("send_times", {})
    for c in calls:
        analyse_arrivals(c["arrivals"], lead_frames, window, heard)
        analyse_arrivals(send_times.get(c["call_sid"], []), lead_frames, window, produced)
        sent = engine_calls.get(c["call_sid"], {}).get("frames_sent", 0)
        diff = sent - c["frames_received"]
        lost += diff
        mismatched += diff != 0
    failed = [c for c in calls if c["error"] or c["ended_by"] != "caller"]
    lag = np.array([x for o in outs for x in o["loop_lag_ms"]])
    window_s = wall1 - wall0
    eng_cpu = eng_cpu1 - eng_cpu0
    frames_sent = sum(v["frames_sent"] for v in engine_calls.values())
    frames_in = sum(v["frames_in"] for v in engine_calls.values())
    wrk_pct = [round((b - a) / window_s * 100, 1) for a, b in zip(wrk_cpu0, wrk_cpu1,
                                                                    strict=True)]
    return {
        "calls": n, "caller_processes": procs, "pinned": pin,
        "engine_nice": args.engine_nice, "gc_freeze": args.gc_freeze, "duration_s": args.duration,
        "ramp_s": args.ramp, "lead_ms": args.lead_ms or 80, "window_s": round(window_s, 2),
        "loadavg_start": load_start, "loadavg_end": load_end,
        "calls_connected": sum(1 for c in calls if c["frames_received"] > 0),
        "calls_failed": len(failed),
        "failures": sorted({f"{c['ended_by']}: {c['error']}" for c in failed})[:5],
        "at_callers": heard.summary(len(calls)),
        "at_engine": produced.summary(len(calls)),
        "frames_sent": frames_sent,
        "frames_received": sum(c["frames_received"] for c in calls),
        "lost_frames": lost, "calls_with_frame_mismatch": mismatched,
        "frames_in": frames_in, "caller_frames_sent": sum(c["frames_sent"] for c in calls),
        "bad_messages_engine": stats["bad_messages"],
        "bad_frames_at_callers": sum(c["bad_frames"] for c in calls),
        "engine_stalls": stats.get("stall_reports", []),
        "pacer": stats["pacer"], "pacer_in_window": mid_stats["pacer"],
        "engine_loop_lag_ms": mid_stats["loop_lag"], "engine_gc": mid_stats["gc"],
        "backpressure_skips": sum(v["backpressure_skips"] for v in engine_calls.values()),
        "engine_cpu_pct_of_core": round(eng_cpu / window_s * 100, 1),
        "engine_cpu_ms_per_call_s": round(eng_cpu * 1000 / (n * window_s), 3),
        "engine_rss_mb": round(rss_busy, 1), "engine_rss_idle_mb": round(rss_idle, 1),
        "engine_rss_per_call_kb": round((rss_busy - rss_idle) * 1024 / n, 1),
        "caller_cpu_pct_per_process": wrk_pct,
        "caller_loop_lag_ms": {"p50": pct(lag, 50), "p99": pct(lag, 99),
                               "max": round(float(lag.max()), 2) if len(lag) else None},
    }


def print_table(r: dict[str, Any]) -> None:
    ll, cl = r["engine_loop_lag_ms"], r["caller_loop_lag_ms"]
    rows = [
        ("calls (connected / failed)", f"{r['calls']} ({r['calls_connected']} / "
                                       f"{r['calls_failed']})"),
        ("caller processes / engine nice", f"{r['caller_processes']} / {r['engine_nice']}"),
        ("window (s) / ramp (s) / lead (ms)", f"{r['window_s']} / {r['ramp_s']} / "
                                               f"{r['lead_ms']}"),
        ("loadavg start -> end", f"{r['loadavg_start']} -> {r['loadavg_end']}"),
    ]
    for label, key in (("at callers (arrival)", "at_callers"),
                       ("at engine (socket write)", "at_engine")):
        f = r[key]
        j, sj = f["jitter_ms"], f["steady_jitter_ms"]
        rows += [
            (f"{label}: jitter p50/p99/max ms", f"{j['p50']} / {j['p99']} / {j['max']}"),
            (f"{label}: same, steady window", f"{sj['p50']} / {sj['p99']} / {sj['max']}"),
            (f"{label}: late frames / gap ms", f"{f['late_frames']} / {f['silence_ms']}"),
        ]
    rows += [
        ("lost frames (sent - received)", f"{r['lost_frames']} of {r['frames_sent']} "
                                          f"({r['calls_with_frame_mismatch']} calls)"),
        ("inbound frames engine got / callers sent", f"{r['frames_in']} / "
                                                      f"{r['caller_frames_sent']}"),
        ("pacer ticks / late ticks", f"{r['pacer']['ticks']} / {r['pacer']['late_ticks']}"),
        ("backpressure skips", str(r["backpressure_skips"])),
        ("bad messages (engine / callers)", f"{r['bad_messages_engine'] or 0} / "
                                            f"{r['bad_frames_at_callers']}"),
        ("engine CPU, % of one core", str(r["engine_cpu_pct_of_core"])),
        ("engine CPU ms per call-second", str(r["engine_cpu_ms_per_call_s"])),
        ("engine RSS (MB) / per call (KB)", f"{r['engine_rss_mb']} / "
                                            f"{r['engine_rss_per_call_kb']}"),
        ("engine loop lag p50 / p99 / max (ms)", f"{ll.get('p50_ms')} / {ll.get('p99_ms')} / "
                                                 f"{ll.get('max_ms')}"),
        ("caller CPU % per process", ", ".join(str(x) for x in
                                              r["caller_cpu_pct_per_process"])),
        ("caller loop lag p50 / p99 / max (ms)", f"{cl['p50']} / {cl['p99']} / {cl['max']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if r["failures"]:
        print("failures:", "; ".join(r["failures"]))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return run_worker(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--duration", type=float, default=30.0,
                        help="steady-state window with all calls up (s)")
    parser.add_argument("--ramp", type=float, default=5.0, help="calls start over this (s)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="wait after the ramp before measuring (s)")
    parser.add_argument("--drain", type=float, default=1.0,
                        help="after the engine stops queueing audio, wait before hang-up (s)")
    parser.add_argument("--processes", type=int, default=2, help="caller processes")
    parser.add_argument("--chunk-s", type=float, default=2.0)
    parser.add_argument("--lead-ms", type=int, default=None)
    parser.add_argument("--cprofile", default=None, help="profile the engine into this file")
    parser.add_argument("--engine-nice", type=int, default=0,
                        help="scheduling niceness of the engine process (negative: ahead "
                             "of other work on a shared machine; needs root)")
    parser.add_argument("--pin", action="store_true",
                        help="engine on the first CPU, callers on the rest (on a shared "
                             "machine this can hurt: the engine cannot move off a busy core)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="the engine freezes its start-up objects out of the collector")
    parser.add_argument("--watch-stalls", action="store_true",
                        help="debug: the engine records its stack during loop stalls")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (engine log, per-call arrival times)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    if args.calls < 1 or args.duration <= 0:
        parser.error("--calls must be >= 1 and --duration > 0")
    result = run_bench(args)
    if not args.json_only:
        print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
