"""Run the engine until SIGINT/SIGTERM: `switchboard serve`, or `python -m engine`.
SIGTERM drains first (engine/fleet/drain.py); SIGINT, or a second SIGTERM, stops at once.

The engine's event loop is uvloop's where uvloop is installed (a dependency on Linux
and macOS; `SWITCHBOARD_EVENT_LOOP=asyncio` turns it off), else asyncio's own: at 250
calls on one core it takes about 15 % less CPU for the same work, mostly the per-frame
socket reads and writes and the timers (bench/README.md, "250 calls on one core").
`run()` starts an engine process on it: `python -m engine`, `switchboard serve` and the
benchmarks' engines do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from engine.config import Config, ConfigError, load_config
from engine.log import configure_logging, get_logger
from engine.wiring import build_engine

log = get_logger(__name__)

T = TypeVar("T")
LOOP_ENV = "SWITCHBOARD_EVENT_LOOP"  # "asyncio": the standard loop even with uvloop installed


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed and not turned off; None: asyncio's default."""
    if os.environ.get(LOOP_ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # not installed (Windows, PyPy): the standard loop
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": which loop runs the engine (logged at start)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the engine's loop (see the module docstring)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


async def serve(config: Config) -> None:
    """Build the engine the configuration describes and serve it until a signal."""
    engine = await build_engine(config)
    runner = web.AppRunner(engine.build_app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.engine.host, config.engine.port)
    await site.start()
    log.info("engine.listening", host=config.engine.host, port=config.engine.port,
             event_loop=loop_name(asyncio.get_running_loop()))
    # SIGTERM drains (calls finish, new ones go elsewhere), SIGINT stops at once.
    engine.drainer.install_signal_handlers(asyncio.get_running_loop())
    await engine.drainer.exit_requested.wait()
    log.info("engine.stopping")
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """`python -m engine [--config PATH] [--host H] [--port P]`: the engine alone."""
    parser = argparse.ArgumentParser(prog="python -m engine", description="run the engine")
    parser.add_argument("--config", help="config file (default: none, built-in defaults)")
    parser.add_argument("--host", help="address to listen on (default from config)")
    parser.add_argument("--port", type=int, help="port to listen on (default from config)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"python -m engine: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, config.logging.format,
                      redact=config.logging.redact)
    if args.host:
        config.engine.host = args.host
    if args.port:
        config.engine.port = args.port
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run(serve(config))
    except ConfigError as exc:  # found while building the engine (e.g. an unpriced model)
        print(f"python -m engine: {exc}", file=sys.stderr)
        return 2
    return 0
