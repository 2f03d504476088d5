"""`switchboard console` (and `python -m console`): the console's own options, where its
token comes from, which source it reads, where it logs, and how it runs — from a terminal
(`run_console`) or inside an event loop that is already running (`run_console_on`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from console.app import SupervisorConsole
from console.client import FrameSource, SupervisorClient

TOKEN_ENV = "SWITCHBOARD_CONSOLE_TOKEN"
TOKEN_FILE = Path("~/.local/share/switchboard/console_token")
DEFAULT_ENGINE = "ws://127.0.0.1:8081"


def resolve_token(explicit: str | None, env: dict[str, str] | None = None,
                  token_file: Path = TOKEN_FILE) -> str:
    """--token, else $SWITCHBOARD_CONSOLE_TOKEN, else the token file the engine writes."""
    if explicit:
        return explicit
    environ = os.environ if env is None else env
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    path = token_file.expanduser()
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard console",
                                     description="Supervisor console for live calls")
    parser.add_argument("--engine", default=DEFAULT_ENGINE,
                        help=f"supervisor API address (default {DEFAULT_ENGINE})")
    parser.add_argument("--redis", metavar="URL",
                        help="deprecated: read-only events from this Redis; a fleet "
                             "engine's --engine shows every engine's calls and acts")
    parser.add_argument("--redis-prefix", default="switchboard",
                        help="Redis key prefix (default switchboard)")
    parser.add_argument("--token", help=f"API token (default ${TOKEN_ENV}, else the token "
                                        "file)")
    parser.add_argument("--token-file", default=str(TOKEN_FILE),
                        help=f"file holding the token the engine wrote (default {TOKEN_FILE})")
    parser.add_argument("--readonly", action="store_true",
                        help="watch only: acting keys are hidden and refused")
    parser.add_argument("--log-file", default="~/.local/share/switchboard/console.log",
                        help="where the console logs (the terminal belongs to the UI)")
    parser.add_argument("--log-level", default="info", type=str.lower,
                        choices=["debug", "info", "warning", "error"],
                        help="the least important log lines written (default info)")
    return parser


REDIS_DEPRECATED = (
    "switchboard console: --redis is deprecated and read-only (no snapshot, no "
    "commands). With [fleet] enabled and the Redis bus, any engine's supervisor API "
    "serves the whole fleet: use --engine ws://HOST:PORT with a token.")


def make_source(args: argparse.Namespace) -> FrameSource:
    if args.redis:
        from console.redis_source import RedisEventSource

        print(REDIS_DEPRECATED, file=sys.stderr)
        return RedisEventSource(args.redis, args.redis_prefix)
    return SupervisorClient(args.engine, _token(args), readonly=args.readonly)


def _token(args: argparse.Namespace) -> str:
    return resolve_token(args.token, token_file=Path(args.token_file))


def log_to_file(path: str, level: str = "info") -> None:
    """Send structlog output to a file: while the UI runs, the terminal is its own."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    stream = target.open("a", encoding="utf-8")
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream))


def run_console(argv: Sequence[str] | None = None) -> int:
    """`switchboard console [--engine ws://HOST:PORT] [--redis URL] [--token …]
    [--readonly] …`. Returns the process exit code."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        source = make_source(args)
    except ValueError as exc:
        print(f"switchboard console: {exc}", file=sys.stderr)
        return 2
    if isinstance(source, SupervisorClient) and not _token(args):
        print(f"switchboard console: no token (use --token, ${TOKEN_ENV} or "
              f"{args.token_file})", file=sys.stderr)
        return 2
    log_to_file(args.log_file, args.log_level)
    result = SupervisorConsole(source, readonly=args.readonly).run()
    return int(result or 0)


async def run_console_on(engine_url: str, token: str, *, readonly: bool = False) -> int:
    """Open the console on an engine from inside a running event loop (the demo starts an
    engine in-process and then awaits this). Returns when the supervisor quits."""
    client = SupervisorClient(engine_url, token, readonly=readonly)
    result = await SupervisorConsole(client, readonly=readonly).run_async()
    return int(result or 0)
