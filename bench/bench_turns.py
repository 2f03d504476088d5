"""Voice-to-voice latency per pipeline stage, at 1 and at N concurrent calls.

Run: .venv/bin/python bench/bench_turns.py [--levels 1,100] [--turns 5] [--turns-at-1 9]
                                            [--json-only]

Three kinds of process, so that the engine's CPU time is its own:

- the engine (bench/bench_turns_engine.py): the real pipeline built by
  `engine.wiring.build_engine` with cloud providers (OpenAI transcription, OpenAI chat,
  ElevenLabs streaming TTS) through their official SDKs; it collects the `TurnLatency`
  events from its own bus;
- this process: the provider stand-ins (engine/sim/standins), which speak the real wire
  formats with a FIXED latency: STT answers after `--stt-ms`, the LLM streams its first
  token after `--llm-ms` and the next ones every `--token-ms`, TTS streams its first
  audio after `--tts-ms`;
- caller processes: SimulatedCallers that say a real question in the neural caller voice
  (espeak where it is not installed; synthesized once per process, shared through
  `speech_cache`) `--turns` times per call, each time after the agent has finished its
  answer.

Per level it prints p50/p95/p99 of every stage the engine measured (endpointing, STT,
LLM first token, TTS first audio, engine overhead, voice-to-voice), the share of turns
whose first audio left before the LLM's last token, the reply latency the callers
measured, and the engine's CPU; the last line is all of it as JSON. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bench/ helpers, beside this script
from load_run import (  # noqa: E402
    check_ready,
    free_port,
    pin_processes,
    place_calls,
    renice,
    report,
    run_if_worker,
    worker_command,
    worker_output,
)
from probes import LoopLag, cpu_seconds, gc_census, loadavg, rss_mb  # noqa: E402
from turn_figures import (  # noqa: E402
    first_sentence_tokens,
    lag_summary,
    print_table,
    relative_stalls,
    summarize_level,
    underrun_causes,
)

if TYPE_CHECKING:
    from engine.sim.standins.server import StandinServer

AUTH_TOKEN = "bench-auth-token-8d41c07e2b9a4f53"
ACCOUNT_SID = "AC" + "d5" * 16
OPENAI_KEY = "sk-bench-turns"
ELEVENLABS_KEY = "xi-bench-turns"
QUESTION = "What time do you open on Saturday?"
# Two sentences, about 3 s of speech (issue 12's reference reply): the voice starts on
# the first words while the LLM still streams.
REPLY = "We open at nine in the morning on Saturday. We close at four that afternoon."


# -- the caller side (one worker process) --------------------------------------------------


async def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    from engine.log import configure_logging
    from engine.sim.caller import SimulatedCaller
    from engine.sim.caller_voice import caller_voice, speak, voice_key
    from engine.sim.scenario import Scenario, Step

    configure_logging("error", "json")
    voice = caller_voice(espeak_voice=spec["voice"], rate_wpm=spec["rate_wpm"])
    # Synthesized once, before the first call: every caller says the same recording.
    speech_cache = {(voice_key(voice), spec["question"]): await speak(voice, spec["question"])}
    steps: list[Step] = []
    for _ in range(spec["turns"]):
        steps += [Step(say=spec["question"]), Step(pause=spec["pause_s"])]
    scenario = Scenario(name="bench-turns", wait_for_greeting=True, hangup_at_end=True,
                        steps=steps[:-1])
    callers: dict[str, SimulatedCaller] = {}

    def make_caller(http: aiohttp.ClientSession) -> SimulatedCaller:
        caller = SimulatedCaller(spec["url"], AUTH_TOKEN, ACCOUNT_SID, speech=voice,
                                 post_status=False, session=http, speech_cache=speech_cache)
        callers[caller.call_sid] = caller
        return caller

    lag = LoopLag()
    cpu0, wall0 = time.process_time(), time.monotonic()
    results, lag_ms = await place_calls(spec["start_times"], make_caller, scenario, lag=lag)
    return {
        "calls": [{"call_sid": r.call_sid, "ended_by": r.ended_by, "error": r.error,
                   "underruns": r.underruns,
                   "underrun_at": callers[r.call_sid].twilio.underrun_at,
                   "lines": [{"ended_at": ln.ended_at, "reply_latency_s": ln.reply_latency_s}
                             for ln in r.lines]} for r in results],
        "speech_s": len(next(iter(speech_cache.values()))) / 8000,
        "loop_lag_ms": lag_ms,
        "stall_times": [at for at, *_ in lag.stalls],
        # This caller process's own CPU over its calls: when it nears a core, the callers'
        # playout (and so their underrun count) is late, not the engine.
        "cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - wall0,
    }


# -- one level -----------------------------------------------------------------------------


def nominal_provider_s(args: argparse.Namespace) -> float:
    """What the stand-ins are set to take until the first audio: STT, the LLM until the
    token that completes the first sentence, TTS first audio."""
    tokens = first_sentence_tokens(REPLY)
    return (args.stt_ms + args.llm_ms + (tokens - 1) * args.token_ms + args.tts_ms) / 1000


def turn_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The [turns] settings the options change (the rest: the engine's defaults)."""
    turns: dict[str, Any] = {}
    if args.endpoint_ms is not None:
        turns["endpoint_silence_ms"] = args.endpoint_ms
    if args.no_semantic:
        turns["semantic_endpointing"] = False
    return turns


def open_log(path: Path) -> IO[str]:
    return path.open("w")  # a few lines at start-up: no need to leave the loop


def engine_command(args: argparse.Namespace, port: int, calls: int, urls: dict[str, str],
                   tmp: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_turns_engine.py"), "--port", str(port),
           "--console-port", str(free_port()), "--auth-token", AUTH_TOKEN,
           "--stt-url", urls["stt"], "--llm-url", urls["llm"], "--tts-url", urls["tts"],
           "--openai-key", OPENAI_KEY, "--elevenlabs-key", ELEVENLABS_KEY,
           "--data-dir", str(tmp / f"data-{calls}"), "--stt-chain", args.stt_chain,
           "--turns-json", json.dumps(turn_overrides(args))]
    if args.cprofile:
        cmd += ["--cprofile", f"{args.cprofile}.{calls}"]
    if args.watch_stalls:
        cmd += ["--watch-stalls"]
    return [*cmd, "--event-loop", args.event_loop]


async def call_level(args: argparse.Namespace, calls: int, url: str, tmp: Path,
                     engine_pid: int, workers: list[asyncio.subprocess.Process]
                     ) -> dict[str, Any]:
    """Start the caller processes, wait until every call has hung up; the engine's CPU,
    memory and the load over that time."""
    turns_per_call = args.turns_at_1 if calls == 1 else args.turns
    procs = max(1, min(args.processes, calls))
    t0 = time.monotonic() + 2.0  # the workers import and synthesize the question first
    starts = [t0 + args.ramp * i / calls for i in range(calls)] if calls > 1 else [t0]
    for k in range(procs):
        spec = {"url": url, "start_times": starts[k::procs], "turns": turns_per_call,
                "pause_s": args.pause, "question": QUESTION, "voice": args.voice,
                "rate_wpm": args.rate_wpm}
        workers.append(await asyncio.create_subprocess_exec(
            *worker_command(__file__, tmp, f"w{calls}-{k}", spec)))
        if args.pin:  # off the engine's core, like this process
            pin_processes(engine_pid, [workers[-1].pid])
        renice([workers[-1].pid], args.nice)
    await asyncio.sleep(max(0.0, t0 - time.monotonic() - 0.1))
    # The engine's lag and GC figures cover the calls only (not its start-up collection).
    async with aiohttp.ClientSession() as http, http.post(url + "/bench/reset") as resp:
        await resp.read()
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    census = asyncio.create_task(gc_census(args.ramp + 5.0, url,
                                           tmp / f"gc-census-{calls}.json")) \
        if args.gc_census else None
    cpu0, wall0, load0 = cpu_seconds(engine_pid), time.monotonic(), loadavg()
    own0 = cpu_seconds(os.getpid())  # this process: the stand-ins
    timeout = args.ramp + turns_per_call * 25 + 60
    codes = await asyncio.wait_for(asyncio.gather(*(w.wait() for w in workers)), timeout)
    cpu1, wall1, load1 = cpu_seconds(engine_pid), time.monotonic(), loadavg()
    if census is not None:
        census.cancel()
    own1 = cpu_seconds(os.getpid())
    rss = rss_mb(engine_pid)
    if any(codes):
        raise RuntimeError(f"caller process exited with {codes}")
    return {"turns_per_call": turns_per_call, "cpu_s": cpu1 - cpu0, "wall_s": wall1 - wall0,
            "rss_mb": rss, "loadavg": (load0, load1), "t0": wall0,
            "standin_cpu_pct": round((own1 - own0) / (wall1 - wall0) * 100, 1)}


async def run_level(args: argparse.Namespace, calls: int, urls: dict[str, str],
                    tmp: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / f"engine-{calls}.log"
    with open_log(log_path) as engine_log:
        engine = await asyncio.create_subprocess_exec(
            *engine_command(args, port, calls, urls, tmp), stdout=subprocess.PIPE,
            stderr=engine_log)
    workers: list[asyncio.subprocess.Process] = []
    try:
        assert engine.stdout is not None
        check_ready(await asyncio.wait_for(engine.stdout.readline(), 60), log_path)
        pinned = args.pin and pin_processes(engine.pid, [])
        renice([engine.pid, os.getpid()], args.nice)
        level = await call_level(args, calls, url, tmp, engine.pid, workers)
        await asyncio.sleep(0.5)  # the last turns' events
        async with aiohttp.ClientSession() as http, \
                http.get(url + "/bench/turns?sweep=1") as resp:  # then a GC sweep
            body = await resp.json()
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
        if engine.returncode is None:
            engine.terminate()
            try:
                await asyncio.wait_for(engine.communicate(), 10)
            except TimeoutError:
                engine.kill()
    (tmp / f"engine-turns-{calls}.json").write_text(json.dumps(body))  # kept with --keep
    outs = [worker_output(tmp, f"w{calls}-{k}") for k in range(len(workers))]
    extra = {"turns_per_call": level["turns_per_call"],
             "ramp_s": args.ramp if calls > 1 else 0.0,
             "engine_loop_lag_ms": body["loop_lag"], "engine_gc": body["gc"],
             "engine_collector": body.get("collector", {}),
             "engine_rss_mb": round(level["rss_mb"], 1),
             "loadavg_start": level["loadavg"][0], "loadavg_end": level["loadavg"][1],
             "engine_pinned_to_one_core": pinned,
             "engine_event_loop": body.get("event_loop"),
             "engine_pacer": body.get("pacer", {}),
             "started_monotonic": round(level["t0"], 3),
             "standin_cpu_pct_of_core": level["standin_cpu_pct"],
             "caller_cpu_pct_of_core": [round(o["cpu_s"] / o["wall_s"] * 100, 1)
                                        for o in outs if o.get("wall_s")],
             "underruns_after_stall": underrun_causes(
                 outs, body["loop_lag"].pop("stall_times", []), level["t0"])}
    relative_stalls(extra, level["t0"])
    return summarize_level(calls, body["turns"], outs, level["cpu_s"], level["wall_s"],
                           nominal_provider_s(args), extra)


# -- the coordinator -----------------------------------------------------------------------


async def start_standins(args: argparse.Namespace) -> tuple[StandinServer, ...]:
    """STT, LLM and TTS stand-ins with the latencies the options give, started."""
    from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
    from engine.sim.standins.openai_api import OpenAIStandin

    # Two OpenAI stand-ins: transcription and chat each get their own fixed latency.
    stt = OpenAIStandin(api_key=OPENAI_KEY)
    stt.latency_s = args.stt_ms / 1000
    stt.transcript = QUESTION
    llm = OpenAIStandin(api_key=OPENAI_KEY)
    llm.latency_s = args.llm_ms / 1000
    llm.token_interval_s = args.token_ms / 1000
    llm.reply = REPLY
    llm.cached_tokens = 0  # skip the prefix-cache emulation: constant server work
    tts = ElevenLabsStandin(api_key=ELEVENLABS_KEY)
    tts.latency_s = args.tts_ms / 1000
    tts.token_interval_s = args.tts_chunk_ms / 1000
    tts.seconds_per_char = args.tts_seconds_per_char
    tts.stream_realtime_factor = args.tts_realtime_factor
    for server in (stt, llm, tts):
        await server.start()
    return stt, llm, tts


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from engine.log import configure_logging

    configure_logging("error", "json")
    stt, llm, tts = await start_standins(args)
    urls = {"stt": stt.base_url, "llm": llm.base_url, "tts": tts.base_url}
    # A late stand-in shows up as provider time; this says when that happened.
    standin_lag = LoopLag()
    lag_task = standin_lag.start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-turns-"))
    levels: list[dict[str, Any]] = []
    try:
        for calls in args.levels:
            standin_lag.samples_ms.clear()
            level = await run_level(args, calls, urls, tmp)
            level["standin_loop_lag_ms"] = lag_summary(standin_lag.samples_ms)
            # Every turn must have reached the providers (nothing answered from a cache).
            level["standin_requests"] = {"stt": len(stt.requests), "llm": len(llm.requests),
                                         "tts": len(tts.requests)}
            levels.append(level)
            for server in (stt, llm, tts):
                server.requests.clear()  # per level; the request logs stay small
    finally:
        lag_task.cancel()
        for server in (stt, llm, tts):
            await server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "bench": "turns", "tmp_dir": str(tmp) if args.keep else None,
        "providers": {"stt_ms": args.stt_ms, "llm_first_token_ms": args.llm_ms,
                      "llm_token_interval_ms": args.token_ms, "tts_first_audio_ms": args.tts_ms,
                      "tts_chunk_interval_ms": args.tts_chunk_ms,
                      "reply_words": len(REPLY.split()), "reply_sentences": REPLY.count(". ") + 1,
                      "first_sentence_tokens": first_sentence_tokens(REPLY),
                      "nominal_to_first_audio_ms": round(nominal_provider_s(args) * 1000, 1)},
        "target": {"engine_overhead_p95_ms_at_max_calls": 10.0,
                   "voice_to_voice_p95_ms_at_1": 750.0,
                   "voice_to_voice_p95_ms_at_max_within": 100.0},
        "config": {"stt_chain": args.stt_chain, "turns": turn_overrides(args),
                   "pinned": args.pin, "nice": args.nice},
        "levels": levels,
    }


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels wants numbers like 1,100: {text!r}") \
            from None
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError("--levels: each level is at least 1 call")
    return levels


def main() -> int:
    if run_if_worker(worker_main):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=parse_levels, default=[1, 100],
                        help="concurrent calls per run, comma separated")
    parser.add_argument("--turns", type=int, default=5, help="questions per call")
    parser.add_argument("--turns-at-1", type=int, default=9,
                        help="questions in the single-call run (more samples)")
    parser.add_argument("--pause", type=float, default=0.3,
                        help="extra silence after the agent's answer before the next question")
    parser.add_argument("--ramp", type=float, default=8.0,
                        help="calls start spread over this (s): about one turn cycle")
    parser.add_argument("--processes", type=int, default=1, help="caller processes")
    parser.add_argument("--stt-ms", type=float, default=150.0)
    parser.add_argument("--llm-ms", type=float, default=300.0, help="LLM first token")
    parser.add_argument("--token-ms", type=float, default=20.0,
                        help="LLM token interval (20 ms: 50 tokens/s)")
    parser.add_argument("--tts-ms", type=float, default=100.0, help="TTS first audio")
    parser.add_argument("--tts-chunk-ms", type=float, default=20.0,
                        help="TTS interval between 100 ms audio chunks (5x real time)")
    parser.add_argument("--tts-seconds-per-char", type=float, default=0.04,
                        help="length of the synthesized answer (0.04: the reply is ~3 s)")
    parser.add_argument("--tts-realtime-factor", type=float, default=5.0,
                        help="streamed TTS audio arrives this much faster than it plays")
    parser.add_argument("--stt-chain", default="openai_realtime,openai",
                        help="providers.stt (openai: batch transcription only)")
    parser.add_argument("--endpoint-ms", type=int, default=None,
                        help="turns.endpoint_silence_ms (default: the engine's)")
    parser.add_argument("--no-semantic", action="store_true",
                        help="turns.semantic_endpointing = false")
    parser.add_argument("--pin", action="store_true",
                        help="the engine alone on CPU 0, callers and stand-ins on the rest")
    parser.add_argument("--nice", type=int, default=None,
                        help="niceness of every bench process (e.g. -10 as root, against "
                             "other work on a shared machine)")
    parser.add_argument("--voice", default="en-us+m3",
                        help="caller's espeak voice, where the neural voice is not installed")
    parser.add_argument("--rate-wpm", type=int, default=165,
                        help="that espeak voice's speaking rate")
    parser.add_argument("--cprofile", default=None,
                        help="profile the engine into PATH.<calls> per level")
    parser.add_argument("--event-loop", choices=("engine", "asyncio"), default="engine",
                        help="the engine's event loop: engine = what `switchboard serve` "
                             "runs (uvloop where installed); asyncio = the standard one")
    parser.add_argument("--watch-stalls", action="store_true",
                        help="debug: the engine records its stack and CPU use in loop stalls")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (engine logs)")
    parser.add_argument("--gc-census", action="store_true",
                        help="debug: what the engine's collector tracks after the ramp "
                             "(gc-census-N.json in the temp dir; with --keep)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    if args.turns < 1 or args.turns_at_1 < 1:
        parser.error("--turns and --turns-at-1 must be at least 1")
    return report(asyncio.run(run_bench(args)), args.json_only, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
