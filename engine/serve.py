"""Run the engine until SIGINT/SIGTERM: `switchboard serve`, or `python -m engine`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from aiohttp import web

from engine.config import Config, ConfigError, load_config
from engine.log import configure_logging, get_logger
from engine.wiring import build_engine

log = get_logger(__name__)


async def serve(config: Config) -> None:
    """Build the engine the configuration describes and serve it until a signal."""
    engine = await build_engine(config)
    runner = web.AppRunner(engine.build_app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.engine.host, config.engine.port)
    await site.start()
    log.info("engine.listening", host=config.engine.host, port=config.engine.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
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
    configure_logging(config.logging.level, config.logging.format)
    if args.host:
        config.engine.host = args.host
    if args.port:
        config.engine.port = args.port
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(config))
    except ConfigError as exc:  # found while building the engine (e.g. an unpriced model)
        print(f"python -m engine: {exc}", file=sys.stderr)
        return 2
    return 0
