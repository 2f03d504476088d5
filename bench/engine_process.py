"""What the benches' engine processes share (bench_engine_proc.py for the calls bench,
bench_turns_engine.py for the turns bench): their common options, the base of their
configuration, serving the engine's app on loopback until SIGTERM/SIGINT with a "ready"
line on stdout for the coordinator, and running under cProfile on request."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from engine.config import Config
from engine.log import configure_logging
from engine.serve import LOOP_ENV, run

Serve = Callable[[argparse.Namespace], Coroutine[Any, Any, None]]


def engine_parser(description: str, data_dir: str) -> argparse.ArgumentParser:
    """The options every bench engine process takes; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth-token", required=True)
    parser.add_argument("--data-dir", default=data_dir)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--watch-stalls", action="store_true",
                        help="record the loop's stack and CPU use during stalls over 20 ms")
    parser.add_argument("--cprofile", default=None, help="write cProfile stats to this path")
    parser.add_argument("--event-loop", choices=("engine", "asyncio"), default="engine",
                        help="engine: the loop `switchboard serve` runs (uvloop where "
                             "installed); asyncio: the standard loop, to compare")
    return parser


def bench_config(args: argparse.Namespace, account_sid: str,
                 engine: dict[str, Any] | None = None, **sections: Any) -> Config:
    """An engine on 127.0.0.1:--port with signatures on (--auth-token), JSON logs, and
    `engine` / `sections` on top."""
    port = args.port
    return Config.model_validate({
        "engine": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
                   "data_dir": args.data_dir, "max_call_seconds": 3600.0, **(engine or {})},
        # Never called: callers hang up over the stream, not through the REST API.
        "twilio": {"account_sid": account_sid, "auth_token": args.auth_token,
                   "api_base_url": "http://127.0.0.1:9"},
        "logging": {"format": "json"},
        **sections,
    })


@asynccontextmanager
async def serving(app: web.Application, port: int) -> AsyncIterator[None]:
    """The app on 127.0.0.1:port for the duration of the block."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        # Hundreds of callers connect within a second or two: a deep accept backlog.
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        yield
    finally:
        await runner.cleanup()


async def ready_until_signal(port: int) -> None:
    """Say "ready" on stdout (the coordinator waits for that line), then wait for
    SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "port": port}), flush=True)
    await stop.wait()


def run_engine_process(serve: Serve, args: argparse.Namespace) -> int:
    """Configure logging, then `serve(args)` — under cProfile when --cprofile is given."""
    configure_logging(args.log_level, "json")
    if args.event_loop == "asyncio":  # else the engine's choice: uvloop where installed
        os.environ[LOOP_ENV] = "asyncio"
    main = serve(args)
    if not args.cprofile:
        run(main)
        return 0
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run(main)
    finally:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    return 0
