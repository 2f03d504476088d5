"""The engine process of the turn-latency benchmark: the real pipeline, cloud providers.

Run by bench/bench_turns.py (not usually by hand):
  .venv/bin/python bench/bench_turns_engine.py --port 8765 --auth-token T \
      --stt-url http://127.0.0.1:P1/v1 --llm-url http://127.0.0.1:P2/v1 \
      --tts-url http://127.0.0.1:P3 --openai-key K --elevenlabs-key K2

The engine is built by `engine.wiring.build_engine` exactly as `switchboard` builds it,
with STT = OpenAI transcription, agent = OpenAI chat, TTS = ElevenLabs streaming, each
pointed at a stand-in server of fixed latency in another process. It is alone in its
process so that its CPU time is the engine's only. It reads its own event bus and keeps
every `TurnLatency` event; the bench-only routes hand them out:

  GET  /bench/turns   every TurnLatency so far (JSON), plus event-loop lag
  POST /bench/reset   forget them (and the loop-lag samples)

The same body is printed as one JSON line on stdout at SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The calls benchmark's loop-lag and GC-pause probes, so both benches report alike.
from bench_engine_proc import GcPauses, LoopLagMonitor, StallWatchdog, run_profiled

from engine.app import Engine
from engine.bus.events import TurnLatency
from engine.config import Config
from engine.log import configure_logging, get_logger
from engine.wiring import build_engine

log = get_logger("bench.turns_engine")

ACCOUNT_SID = "AC" + "c4" * 16


class TurnCollector:
    """Every TurnLatency the engine publishes, read from its own bus."""

    def __init__(self, engine: Engine, watch_stalls: bool = False) -> None:
        self.engine = engine
        self.watchdog = StallWatchdog() if watch_stalls else None
        self.turns: list[dict[str, Any]] = []
        self.lag = LoopLagMonitor()
        self.gc = GcPauses()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read())]
        self.lag.start()
        if self.watchdog is not None:
            self._tasks.append(loop.create_task(self.watchdog.heartbeat()))
            threading.Thread(target=self.watchdog.watch, daemon=True).start()

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
                "calls_total": self.engine.calls_total, "monotonic": time.monotonic()}

    async def turns_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.body())

    async def reset_route(self, request: web.Request) -> web.Response:
        self.turns.clear()
        self.lag.reset()
        self.gc.reset()
        return web.json_response({"reset": True})


def bench_config(args: argparse.Namespace) -> Config:
    port = args.port
    return Config.model_validate({
        "engine": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
                   "data_dir": args.data_dir, "max_call_seconds": 3600.0},
        # Never called: callers hang up over the stream.
        "twilio": {"account_sid": ACCOUNT_SID, "auth_token": args.auth_token,
                   "api_base_url": "http://127.0.0.1:9"},
        "providers": {
            "stt": ["openai"], "agent": ["openai"], "tts": ["elevenlabs"],
            "openai": {"api_key": args.openai_key, "base_url": args.llm_url,
                       "stt_base_url": args.stt_url},
            "elevenlabs": {"api_key": args.elevenlabs_key, "base_url": args.tts_url},
        },
        # Every turn must reach the providers: no answer/voice cache, no cost-cap handoff.
        "cache": {"backend": "off"},
        "policy": {"call_cost_cap_usd": 0.0},
        # Another engineer's console API may hold the default port.
        "console_api": {"port": args.console_port},
        "logging": {"format": "json"},
    })


async def serve(args: argparse.Namespace) -> None:
    config = bench_config(args)
    kwargs: dict[str, Any] = {"history": args.history}
    if "supervisor_api" in inspect.signature(build_engine).parameters:
        kwargs["supervisor_api"] = False  # no console in the benchmark
    engine = await build_engine(config, **kwargs)
    collector = TurnCollector(engine, args.watch_stalls)
    app = engine.build_app()
    app.router.add_get("/bench/turns", collector.turns_route)
    app.router.add_post("/bench/reset", collector.reset_route)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    await collector.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "port": args.port}), flush=True)
    await stop.wait()
    print(json.dumps({"final": collector.body()}), flush=True)
    await collector.stop()
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--console-port", type=int, default=0)
    parser.add_argument("--auth-token", required=True)
    parser.add_argument("--stt-url", required=True, help="OpenAI-style base URL for STT")
    parser.add_argument("--llm-url", required=True, help="OpenAI-style base URL for chat")
    parser.add_argument("--tts-url", required=True, help="ElevenLabs-style base URL")
    parser.add_argument("--openai-key", required=True)
    parser.add_argument("--elevenlabs-key", required=True)
    parser.add_argument("--data-dir", default="/tmp/switchboard-bench-turns")
    parser.add_argument("--history", action="store_true", help="keep the SQLite call history")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--watch-stalls", action="store_true",
                        help="record the loop's stack and CPU use during stalls over 40 ms")
    parser.add_argument("--cprofile", default=None, help="write cProfile stats to this path")
    args = parser.parse_args()
    configure_logging(args.log_level, "json")
    run_profiled(serve(args), args.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
