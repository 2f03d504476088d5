"""The engine process of the turn-latency benchmark: the real pipeline, cloud providers.

Run by bench/bench_turns.py (not usually by hand):
  .venv/bin/python bench/bench_turns_engine.py --port 8765 --auth-token T \
      --stt-url http://127.0.0.1:P1/v1 --llm-url http://127.0.0.1:P2/v1 \
      --tts-url http://127.0.0.1:P3 --openai-key K --elevenlabs-key K2

The engine is built by `engine.wiring.build_engine` exactly as `switchboard` builds it,
with STT = OpenAI realtime transcription (batch transcription behind it), agent = OpenAI
chat, TTS = ElevenLabs with the text streamed in, each pointed at a stand-in server of
fixed latency in another process (`--stt-chain`, `--turns-json` change them). It is alone in its
process so that its CPU time is the engine's only. It reads its own event bus and keeps
every `TurnLatency` event; the bench-only routes hand them out:

  GET  /bench/turns   every TurnLatency so far (JSON), plus event-loop lag
  POST /bench/reset   forget them (and the loop-lag samples)

The same body is printed as one JSON line on stdout at SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The calls benchmark's probes and engine-process skeleton, so both benches report alike.
from engine_process import (
    bench_config,
    engine_parser,
    ready_until_signal,
    run_engine_process,
    serving,
)
from probes import GcPauses, LoopLag, StallWatchdog

from engine.app import Engine
from engine.bus.events import TurnLatency
from engine.config import Config
from engine.serve import loop_name
from engine.wiring import build_engine

ACCOUNT_SID = "AC" + "c4" * 16


class TurnCollector:
    """Every TurnLatency the engine publishes, read from its own bus."""

    def __init__(self, engine: Engine, watch_stalls: bool = False) -> None:
        self.engine = engine
        self.watchdog = StallWatchdog() if watch_stalls else None
        self.turns: list[dict[str, Any]] = []
        self.lag = LoopLag()
        self.gc = GcPauses()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.get_running_loop().create_task(self._read()), self.lag.start()]
        if self.watchdog is not None:
            self._tasks.append(self.watchdog.start())

    async def _read(self) -> None:
        async for _, event in self.engine.hub.bus.subscribe():
            if isinstance(event, TurnLatency):
                self.turns.append(event.model_dump(mode="json"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def body(self) -> dict[str, Any]:
        return {"turns": self.turns, "loop_lag": self.lag.summary(), "gc": self.gc.summary(),
                "stall_reports": self.watchdog.reports[-40:] if self.watchdog else [],
                "calls_total": self.engine.calls_total, "monotonic": time.monotonic(),
                "event_loop": loop_name(asyncio.get_running_loop()),
                "pacer": {"ticks": self.engine.pacer.ticks,
                          "late_ticks": self.engine.pacer.late_ticks}}

    async def turns_route(self, request: web.Request) -> web.Response:
        body = self.body()
        if request.query.get("sweep"):  # the run is over: what waited for a sweep
            self.engine.collections.sweep_now()
        body["collector"] = self.engine.collections.stats()
        return web.json_response(body)

    async def census_route(self, request: web.Request) -> web.Response:
        """Debug (--gc-census): the collector's tracked objects by type and by module,
        the most common first: what a full collection has to traverse."""
        return web.json_response(gc_census())

    async def reset_route(self, request: web.Request) -> web.Response:
        self.turns.clear()
        self.lag.reset()
        self.gc.reset()
        return web.json_response({"reset": True})


def gc_census(top: int = 40) -> dict[str, Any]:
    """The tracked objects by type and module, and the references a collection follows
    from them by type (its work is about objects plus references)."""
    by_type: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    refs: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        by_type[name] += 1
        by_module[kind.__module__.split(".")[0]] += 1
        refs[name] += len(gc.get_referents(obj))
    return {"tracked": sum(by_type.values()), "frozen": gc.get_freeze_count(),
            "references": sum(refs.values()), "by_type": by_type.most_common(top),
            "by_module": by_module.most_common(15), "references_by_type": refs.most_common(25),
            "garbage": garbage_census(top)}


def garbage_census(top: int) -> dict[str, Any]:
    """One full collection that keeps what it finds (gc.DEBUG_SAVEALL): the cyclic
    garbage by type, i.e. what only a collection frees, and how long it took."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    started = time.perf_counter()
    try:
        gc.collect()
    finally:
        gc.set_debug(0)
    took_ms = (time.perf_counter() - started) * 1000
    by_type = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    found = len(gc.garbage)
    gc.garbage.clear()
    return {"objects": found, "collect_ms": round(took_ms, 1),
            "by_type": by_type.most_common(top)}


def turns_config(args: argparse.Namespace) -> Config:
    return bench_config(
        args, ACCOUNT_SID,
        providers={
            "stt": args.stt_chain.split(","), "agent": ["openai"], "tts": ["elevenlabs"],
            "openai": {"api_key": args.openai_key, "base_url": args.llm_url,
                       "stt_base_url": args.stt_url},
            "openai_realtime": {"base_url": args.stt_url},
            "elevenlabs": {"api_key": args.elevenlabs_key, "base_url": args.tts_url},
        },
        turns=json.loads(args.turns_json),
        # Every turn must reach the providers: no answer/voice cache, no cost-cap handoff.
        cache={"backend": "off"},
        policy={"call_cost_cap_usd": 0.0},
        # Another engineer's console API may hold the default port.
        console_api={"port": args.console_port})


async def serve(args: argparse.Namespace) -> None:
    kwargs: dict[str, Any] = {"history": args.history}
    if "supervisor_api" in inspect.signature(build_engine).parameters:
        kwargs["supervisor_api"] = False  # no console in the benchmark
    engine = await build_engine(turns_config(args), **kwargs)
    collector = TurnCollector(engine, args.watch_stalls)
    app = engine.build_app()
    app.router.add_get("/bench/turns", collector.turns_route)
    app.router.add_post("/bench/reset", collector.reset_route)
    app.router.add_get("/bench/gc-census", collector.census_route)
    async with serving(app, args.port):
        await collector.start()
        await ready_until_signal(args.port)
        print(json.dumps({"final": collector.body()}), flush=True)
        await collector.stop()


def main() -> int:
    parser = engine_parser(__doc__.split("\n")[0], "/tmp/switchboard-bench-turns")
    parser.add_argument("--console-port", type=int, default=0)
    parser.add_argument("--stt-url", required=True, help="OpenAI-style base URL for STT")
    parser.add_argument("--llm-url", required=True, help="OpenAI-style base URL for chat")
    parser.add_argument("--tts-url", required=True, help="ElevenLabs-style base URL")
    parser.add_argument("--openai-key", required=True)
    parser.add_argument("--elevenlabs-key", required=True)
    parser.add_argument("--history", action="store_true", help="keep the SQLite call history")
    parser.add_argument("--stt-chain", default="openai_realtime,openai",
                        help="providers.stt, comma separated")
    parser.add_argument("--turns-json", default="{}", help="[turns] overrides, as JSON")
    return run_engine_process(serve, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
