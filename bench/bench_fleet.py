"""A fleet on one machine: 3 engines, one Redis, one PostgreSQL, simulated callers spread
across them. Issue 14's proof at scale.

Run: .venv/bin/python bench/bench_fleet.py [--calls 30] [--window 40] [--json-only]

What runs (every part a process of its own):
- a private redis-server (as the tests start one) and a throwaway database on the local
  PostgreSQL (127.0.0.1:5432, `--pg`), dropped at the end;
- 3 engines (bench/fleet_engine.py): the real pipeline built as `switchboard serve`
  builds it, `bus.backend = "redis"`, `[fleet] enabled = true` with its default heartbeat
  (2 s) and dead-engine deadline (7 s), `history.backend = "postgres"`; cloud providers
  pointed at stand-ins in this process (fixed latencies, real wire formats);
- one reader of the fleet's event stream (bench/fleet_reader.py), as a console reads it;
- caller processes: SimulatedCallers dealt round-robin to the engines, each asking a
  question in the caller voice every few seconds for the whole run.

Timeline: calls start over `--ramp` s; after `--settle` s the `--window` s steady window
measures the control plane's cost (Redis INFO deltas over call-minutes); then for
`--command-s` s a console sends commands; then the last engine is SIGKILLed with its calls
live and the run waits `--lost-wait` s for the other engines to mark them lost; then
every caller hangs up and the engines stop.

Figures (bench/README.md says more): (a) event ts -> arrival at the reader, p50/p99/max,
per engine; (b) kill -> last CallEnded(reason="lost") at the reader, and the lost calls
against the killed engine's live calls, in the event stream and in PostgreSQL; (c) Redis
commands, bytes and CPU per call-minute; (d) a console attached to the first engine's
supervisor API takes over each live call of the fleet in turn, says a line and hands it
back (bench/fleet_commands.py): round trip p50/p99 for calls that engine owns and for
calls routed through Redis to another, and which engine ran each.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bench/ helpers, beside this script
from fleet_commands import command_round_trips  # noqa: E402
from fleet_figures import print_table, summarize  # noqa: E402
from fleet_infra import (  # noqa: E402
    Postgres,
    RedisReadings,
    start_standins,
    stop_process,
)
from load_run import (  # noqa: E402
    check_ready,
    free_port,
    place_calls,
    report,
    run_if_worker,
    worker_command,
    worker_output,
)
from probes import cpu_seconds, loadavg  # noqa: E402

AUTH_TOKEN = "bench-auth-token-3c9e51a07b2d4e86"
OPENAI_KEY = "sk-bench-fleet"
ELEVENLABS_KEY = "xi-bench-fleet"
ENGINES = ("fleet-a", "fleet-b", "fleet-c")  # the last one is killed
QUESTION = "What time do you open on Saturday?"
REPLY = "We open at nine in the morning on Saturday. We close at four that afternoon."

CONSOLE_TOKEN = "bench-console-token-7a1f0c93e5d24b68"


# -- the caller side (one worker process) --------------------------------------------------


async def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    from engine.log import configure_logging
    from engine.sim.caller import SimulatedCaller
    from engine.sim.caller_voice import caller_voice, speak, voice_key
    from engine.sim.scenario import Scenario, Step

    configure_logging("error", "json")
    voice = caller_voice()
    speech_cache = {(voice_key(voice), QUESTION): await speak(voice, QUESTION)}
    steps: list[Step] = []
    for _ in range(spec["turns"]):  # more than fit: the hang-up ends the call
        steps += [Step(say=QUESTION), Step(pause=spec["pause_s"])]
    scenario = Scenario(name="bench-fleet", wait_for_greeting=True, hangup_at_end=False,
                        steps=steps)
    urls: list[str] = spec["urls"]
    index = itertools.count(spec["first_index"], spec["index_step"])
    engine_of: dict[str, int] = {}

    def make_caller(http: aiohttp.ClientSession) -> SimulatedCaller:
        engine = next(index) % len(urls)  # the calls are dealt round-robin to the engines
        caller = SimulatedCaller(urls[engine], AUTH_TOKEN, spec["account_sid"], speech=voice,
                                 post_status=False, session=http, speech_cache=speech_cache)
        engine_of[caller.call_sid] = engine
        return caller

    results, lag_ms = await place_calls(spec["start_times"], make_caller, scenario,
                                        hang_up_at=spec["hangup_at"])
    return {"calls": [{"call_sid": r.call_sid, "engine": engine_of[r.call_sid],
                       "ended_by": r.ended_by, "error": r.error,
                       "replies": [ln.reply_latency_s for ln in r.lines]} for r in results],
            "loop_lag_ms": lag_ms}


# -- the coordinator -----------------------------------------------------------------------


class Fleet:
    """The engine processes and what the coordinator asks them."""

    def __init__(self) -> None:
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.urls: dict[str, str] = {}
        self.api_urls: dict[str, str] = {}  # the supervisor APIs
        self.ids: dict[str, str] = {}  # name -> engine_id (per process start)

    async def start(self, name: str, args: argparse.Namespace, tmp: Path, redis_url: str,
                    prefix: str, dsn: str, standin_urls: dict[str, str]) -> None:
        port, api_port = free_port(), free_port()
        cmd = [sys.executable, str(ROOT / "bench" / "fleet_engine.py"),
               "--port", str(port), "--auth-token", AUTH_TOKEN, "--name", name,
               "--data-dir", str(tmp / name), "--redis-url", redis_url,
               "--key-prefix", prefix, "--dsn", dsn, "--stt-url", standin_urls["stt"],
               "--llm-url", standin_urls["llm"], "--tts-url", standin_urls["tts"],
               "--openai-key", OPENAI_KEY, "--elevenlabs-key", ELEVENLABS_KEY,
               "--console-port", str(api_port), "--console-token", CONSOLE_TOKEN]
        log_path = tmp / f"{name}.log"
        with log_path.open("w") as log_file:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=log_file)
        self.procs[name] = proc
        assert proc.stdout is not None
        check_ready(await asyncio.wait_for(proc.stdout.readline(), 120), log_path)
        self.urls[name] = f"http://127.0.0.1:{port}"
        self.api_urls[name] = f"ws://127.0.0.1:{api_port}"

    async def health(self, http: aiohttp.ClientSession, name: str) -> dict[str, Any]:
        async with http.get(self.urls[name] + "/healthz") as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def live_calls(self, http: aiohttp.ClientSession) -> dict[str, int]:
        return {name: int((await self.health(http, name))["active_calls"])
                for name in self.procs if self.procs[name].returncode is None}

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(p) for p in self.procs.values()))


def process_roles(fleet: Fleet, workers: list[asyncio.subprocess.Process],
                  reader: asyncio.subprocess.Process) -> dict[str, list[int]]:
    """The bench's processes by role, for their CPU over the window."""
    return {**{name: [proc.pid] for name, proc in fleet.procs.items()},
            "callers": [w.pid for w in workers], "reader": [reader.pid],
            "stand-ins + coordinator": [os.getpid()]}


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def start_workers(args: argparse.Namespace, fleet: Fleet, tmp: Path, account_sid: str,
                        t0: float, hangup_at: float) -> list[asyncio.subprocess.Process]:
    n, procs = args.calls, max(1, min(args.processes, args.calls))
    starts = [t0 + args.ramp * i / n for i in range(n)]
    urls = [fleet.urls[name] for name in ENGINES]
    workers = []
    for k in range(procs):
        spec = {"urls": urls, "start_times": starts[k::procs], "first_index": k,
                "index_step": procs, "hangup_at": hangup_at, "turns": 200,
                "pause_s": args.pause, "account_sid": account_sid}
        cmd = worker_command(__file__, tmp, f"worker{k}", spec)
        workers.append(await asyncio.create_subprocess_exec(*cmd))
    return workers


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from fleet_engine import ACCOUNT_SID

    from engine.log import configure_logging

    configure_logging("error", "json")
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    readings = await RedisReadings.start()
    postgres = await Postgres.create(args.pg)
    standins = await start_standins(OPENAI_KEY, ELEVENLABS_KEY, QUESTION, REPLY)
    fleet = Fleet()
    reader: asyncio.subprocess.Process | None = None
    workers: list[asyncio.subprocess.Process] = []
    try:
        reader = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bench" / "fleet_reader.py"), readings.url, prefix,
            str(tmp / "reader.json"), stdout=asyncio.subprocess.PIPE)
        assert reader.stdout is not None
        check_ready(await asyncio.wait_for(reader.stdout.readline(), 30), tmp / "reader")
        for name in ENGINES:
            await fleet.start(name, args, tmp, readings.url, prefix, postgres.dsn,
                              {k: s.base_url for k, s in standins.items()})
        async with aiohttp.ClientSession() as http:
            for name in ENGINES:
                fleet.ids[name] = (await fleet.health(http, name))["fleet"]["engine_id"]
            t0 = time.monotonic() + 8.0  # the workers import and synthesize the question
            window_start = t0 + args.ramp + args.settle
            window_end = window_start + args.window
            kill_at = window_end + args.command_s
            hangup_at = kill_at + args.lost_wait
            workers = await start_workers(args, fleet, tmp, ACCOUNT_SID, t0, hangup_at)
            await sleep_until(window_start)
            live0, load0 = await fleet.live_calls(http), loadavg()
            roles = process_roles(fleet, workers, reader)
            cpu0 = {role: sum(map(cpu_seconds, pids)) for role, pids in roles.items()}
            before = await readings.snapshot(postgres)
            wall0 = time.time()
            await sleep_until(window_end)
            after = await readings.snapshot(postgres)
            wall1 = time.time()
            cpu = {role: round((sum(map(cpu_seconds, pids)) - cpu0[role]) / (wall1 - wall0)
                               * 100, 1) for role, pids in roles.items()}
            live1, load1 = await fleet.live_calls(http), loadavg()
            names = {engine_id: name for name, engine_id in fleet.ids.items()}
            commands = await command_round_trips(fleet.api_urls[ENGINES[0]], CONSOLE_TOKEN,
                                                 kill_at, names)
            await sleep_until(kill_at)
            live_at_kill = await fleet.live_calls(http)
            victim = ENGINES[-1]
            fleet.procs[victim].send_signal(signal.SIGKILL)
            killed_wall = time.time()
            await fleet.procs[victim].wait()
        for w in workers:
            await asyncio.wait_for(w.wait(), args.lost_wait + 120)
        await fleet.stop()
        await asyncio.sleep(1.0)  # the engines' last events reach the reader
        await stop_process(reader)
        reader = None
        lost_rows = await postgres.lost_calls()
    finally:
        for w in workers:
            await stop_process(w)
        await fleet.stop()
        if reader is not None:
            await stop_process(reader)
        for server in standins.values():
            await server.stop()
        await postgres.drop()
        await readings.stop()
    stream = json.loads((tmp / "reader.json").read_text())
    calls = [c for k in range(len(workers)) for c in worker_output(tmp, f"worker{k}")["calls"]]
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    run = {"calls": args.calls, "engines": list(ENGINES), "engine_ids": fleet.ids,
           "victim": ENGINES[-1], "window": (wall0, wall1), "killed_at": killed_wall,
           "live_start": live0, "live_end": live1, "live_at_kill": live_at_kill,
           "loadavg": (load0, load1), "cpu_pct_of_core": cpu,
           "redis": (before, after), "lost_rows": lost_rows, "tmp": str(tmp)}
    return summarize(run, stream, calls, commands)


def main() -> int:
    if run_if_worker(worker_main):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="calls across the 3 engines")
    parser.add_argument("--ramp", type=float, default=10.0, help="calls start over this (s)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="wait after the ramp before the window (s)")
    parser.add_argument("--window", type=float, default=40.0,
                        help="steady window: the control plane's cost per call-minute (s)")
    parser.add_argument("--command-s", type=float, default=15.0,
                        help="after the window, send commands for this long (s)")
    parser.add_argument("--lost-wait", type=float, default=20.0,
                        help="after the kill, wait this long for the calls marked lost (s)")
    parser.add_argument("--pause", type=float, default=4.0,
                        help="caller's pause after each answer before the next question (s)")
    parser.add_argument("--processes", type=int, default=2, help="caller processes")
    parser.add_argument("--pg", default=os.environ.get(
        "SWITCHBOARD_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL server where a throwaway database may be created")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    if args.calls < len(ENGINES) or args.window <= 0:
        parser.error(f"--calls must be >= {len(ENGINES)} and --window > 0")
    return report(asyncio.run(run_bench(args)), args.json_only, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
