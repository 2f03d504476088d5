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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bench/ helpers, beside this script
from load_run import (  # noqa: E402
    check_ready,
    free_port,
    place_calls,
    report,
    run_if_worker,
    worker_command,
    worker_output,
)
from pacing import FRAME_S, CallFigures, analyse_arrivals, pct  # noqa: E402
from probes import cpu_seconds, loadavg, rss_mb  # noqa: E402

AUTH_TOKEN = "bench-auth-token-5f0c2a9e7d314b68"
ACCOUNT_SID = "AC" + "b3" * 16


# -- the caller side (one worker process) ------------------------------------------------


async def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    from engine.log import configure_logging
    from engine.sim.caller import SimulatedCaller
    from engine.sim.scenario import Scenario

    configure_logging("error", "json")
    # Only pauses: the callers send line silence and never need espeak.
    scenario = Scenario(name="bench-silence", wait_for_greeting=False, hangup_at_end=False,
                        steps=[])
    results, lag_ms = await place_calls(
        spec["start_times"],
        lambda http: SimulatedCaller(spec["url"], AUTH_TOKEN, ACCOUNT_SID, post_status=False,
                                     session=http),
        scenario, hang_up_at=spec["hangup_at"])
    return {
        "calls": [{"call_sid": r.call_sid, "arrivals": r.arrivals,
                   "frames_received": r.frames_received, "frames_sent": r.frames_sent,
                   "marks_received": len(r.marks_received), "marks_echoed": len(r.marks_echoed),
                   "bad_frames": len(r.bad_frames_received), "ended_by": r.ended_by,
                   "error": r.error} for r in results],
        "loop_lag_ms": lag_ms,
    }


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


@dataclass
class Timeline:
    """One timeline in CLOCK_MONOTONIC, shared by every process on this machine."""

    starts: list[float]  # one per call
    window_start: float
    quiesce_at: float
    hangup_at: float

    @classmethod
    def plan(cls, args: argparse.Namespace) -> Timeline:
        t0 = time.monotonic() + 1.5  # time for the workers to import and connect
        n = args.calls
        window_start = t0 + args.ramp + args.settle
        quiesce_at = window_start + args.duration
        return cls([t0 + args.ramp * i / max(1, n) for i in range(n)], window_start,
                   quiesce_at, quiesce_at + args.drain)


@dataclass
class Window:
    """Readings taken around the steady-state window."""

    wall: tuple[float, float]
    engine_cpu: tuple[float, float]
    worker_cpu: tuple[list[float], list[float]]
    rss_busy_mb: float
    loadavg: tuple[str, str]
    mid_stats: dict[str, Any]

    @property
    def seconds(self) -> float:
        return self.wall[1] - self.wall[0]


def engine_command(args: argparse.Namespace, port: int, tmp: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_engine_proc.py"), "--port", str(port),
           "--auth-token", AUTH_TOKEN, "--data-dir", str(tmp / "data"),
           "--chunk-s", str(args.chunk_s)]
    if args.lead_ms is not None:
        cmd += ["--lead-ms", str(args.lead_ms)]
    if args.gc_freeze:
        cmd += ["--gc-freeze"]
    if args.watch_stalls:
        cmd += ["--watch-stalls"]
    if args.cprofile:
        cmd += ["--cprofile", args.cprofile]
    return cmd


def measure_window(url: str, engine_pid: int, workers: list[subprocess.Popen[bytes]],
                   timeline: Timeline) -> Window:
    """Wait for the window, take readings at both ends, then quiesce the engine."""
    sleep_until(timeline.window_start)
    load_start = loadavg()
    http_json(url + "/bench/reset-lag", "POST")
    wall0 = time.monotonic()
    eng_cpu0 = cpu_seconds(engine_pid)
    wrk_cpu0 = [cpu_seconds(w.pid) for w in workers]
    sleep_until(timeline.quiesce_at)
    wall1 = time.monotonic()
    eng_cpu1 = cpu_seconds(engine_pid)
    wrk_cpu1 = [cpu_seconds(w.pid) for w in workers]
    rss_busy = rss_mb(engine_pid)
    load_end = loadavg()
    mid_stats = http_json(url + "/bench/stats")
    http_json(url + "/bench/quiesce", "POST")
    return Window((wall0, wall1), (eng_cpu0, eng_cpu1), (wrk_cpu0, wrk_cpu1), rss_busy,
                  (load_start, load_end), mid_stats)


def stop_engine(engine: subprocess.Popen[str], engine_log: IO[str]) -> None:
    if engine.poll() is None:
        engine.terminate()
        try:
            engine.communicate(timeout=10)  # drains its final stats line
        except subprocess.TimeoutExpired:
            engine.kill()
    engine_log.close()


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine_log = open(tmp / "engine.log", "w")  # noqa: SIM115 - lives as long as the engine
    engine = subprocess.Popen(engine_command(args, port, tmp), stdout=subprocess.PIPE,
                              stderr=engine_log, text=True)
    if args.engine_nice:
        os.setpriority(os.PRIO_PROCESS, engine.pid, args.engine_nice)
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cpus) >= 2
    if pin:  # the engine gets a core of its own; the callers share the others
        os.sched_setaffinity(engine.pid, {cpus[0]})
    workers: list[subprocess.Popen[bytes]] = []
    try:
        assert engine.stdout is not None
        check_ready(engine.stdout.readline(), tmp / "engine.log")
        http_json(url + "/healthz")
        rss_idle = rss_mb(engine.pid)
        timeline = Timeline.plan(args)
        procs = max(1, min(args.processes, args.calls))
        for k in range(procs):  # the calls are dealt round-robin
            spec = {"url": url, "start_times": timeline.starts[k::procs],
                    "hangup_at": timeline.hangup_at}
            workers.append(subprocess.Popen(worker_command(__file__, tmp, f"worker{k}", spec)))
            if pin:
                os.sched_setaffinity(workers[-1].pid, set(cpus[1:]))
        window = measure_window(url, engine.pid, workers, timeline)
        for w in workers:
            if w.wait(timeout=args.duration + args.ramp + 120) != 0:
                raise RuntimeError(f"caller process exited with {w.returncode}")
        stats = http_json(url + "/bench/stats?send_times=1")
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        stop_engine(engine, engine_log)
    outs = [worker_output(tmp, f"worker{k}") for k in range(len(workers))]
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    setup = {"caller_processes": len(workers), "pinned": pin, "rss_idle_mb": rss_idle}
    return summarize(args, setup, window, stats, outs)


def summarize(args: argparse.Namespace, setup: dict[str, Any], window: Window,
              stats: dict[str, Any], outs: list[dict[str, Any]]) -> dict[str, Any]:
    calls = [c for o in outs for c in o["calls"]]
    lead_frames = round((args.lead_ms or 80) / 1000 / FRAME_S)
    heard, produced = CallFigures(), CallFigures()
    lost = 0
    mismatched = 0
    engine_calls = stats["calls"]
    send_times: dict[str, list[float]] = stats.get("send_times", {})
    for c in calls:
        analyse_arrivals(c["arrivals"], lead_frames, window.wall, heard)
        analyse_arrivals(send_times.get(c["call_sid"], []), lead_frames, window.wall, produced)
        sent = engine_calls.get(c["call_sid"], {}).get("frames_sent", 0)
        diff = sent - c["frames_received"]
        lost += diff
        mismatched += diff != 0
    failed = [c for c in calls if c["error"] or c["ended_by"] != "caller"]
    lag = np.array([x for o in outs for x in o["loop_lag_ms"]])
    n, window_s, mid = args.calls, window.seconds, window.mid_stats
    eng_cpu = window.engine_cpu[1] - window.engine_cpu[0]
    rss_busy, rss_idle = window.rss_busy_mb, setup["rss_idle_mb"]
    return {
        "calls": n, "caller_processes": setup["caller_processes"], "pinned": setup["pinned"],
        "engine_nice": args.engine_nice, "gc_freeze": args.gc_freeze, "duration_s": args.duration,
        "ramp_s": args.ramp, "lead_ms": args.lead_ms or 80, "window_s": round(window_s, 2),
        "loadavg_start": window.loadavg[0], "loadavg_end": window.loadavg[1],
        "calls_connected": sum(1 for c in calls if c["frames_received"] > 0),
        "calls_failed": len(failed),
        "failures": sorted({f"{c['ended_by']}: {c['error']}" for c in failed})[:5],
        "at_callers": heard.summary(len(calls)),
        "at_engine": produced.summary(len(calls)),
        "frames_sent": sum(v["frames_sent"] for v in engine_calls.values()),
        "frames_received": sum(c["frames_received"] for c in calls),
        "lost_frames": lost, "calls_with_frame_mismatch": mismatched,
        "frames_in": sum(v["frames_in"] for v in engine_calls.values()),
        "caller_frames_sent": sum(c["frames_sent"] for c in calls),
        "bad_messages_engine": stats["bad_messages"],
        "bad_frames_at_callers": sum(c["bad_frames"] for c in calls),
        "engine_stalls": stats.get("stall_reports", []),
        "pacer": stats["pacer"], "pacer_in_window": mid["pacer"],
        "engine_loop_lag_ms": mid["loop_lag"], "engine_gc": mid["gc"],
        "backpressure_skips": sum(v["backpressure_skips"] for v in engine_calls.values()),
        "engine_cpu_pct_of_core": round(eng_cpu / window_s * 100, 1),
        "engine_cpu_ms_per_call_s": round(eng_cpu * 1000 / (n * window_s), 3),
        "engine_rss_mb": round(rss_busy, 1), "engine_rss_idle_mb": round(rss_idle, 1),
        "engine_rss_per_call_kb": round((rss_busy - rss_idle) * 1024 / n, 1),
        "caller_cpu_pct_per_process": [round((b - a) / window_s * 100, 1) for a, b in
                                       zip(*window.worker_cpu, strict=True)],
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
    if run_if_worker(worker_main):
        return 0
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
    return report(run_bench(args), args.json_only, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
