"""`switchboard` command line: serve, call, demo, console, report."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from engine.config import Config, ConfigError, load_config
from engine.log import configure_logging, get_logger

log = get_logger(__name__)

DEFAULT_CONFIG = "config.toml"


def _config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    env = os.environ.get("SWITCHBOARD_CONFIG")
    if env:
        return Path(env)
    here = Path(DEFAULT_CONFIG)
    return here if here.exists() else None


def _load(args: argparse.Namespace) -> Config:
    config = load_config(_config_path(args.config))
    configure_logging(args.log_level or config.logging.level, config.logging.format)
    return config


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.host:
        config.engine.host = args.host
    if args.port:
        config.engine.port = args.port
    from engine.serve import serve

    asyncio.run(serve(config))
    return 0


# -- call ----------------------------------------------------------------------------------


async def _call(args: argparse.Namespace, config: Config) -> int:
    from engine.providers.builtin.tts_espeak import espeak_settings
    from engine.sim.caller import SimulatedCaller
    from engine.sim.scenario import Scenario

    if args.scenario:
        scenario = Scenario.from_file(args.scenario)
    elif args.say:
        scenario = Scenario.from_lines(args.say)
    else:
        scenario = Scenario(name="listen", steps=[])
    if args.dtmf:
        from engine.sim.scenario import Step

        scenario.steps.append(Step(dtmf=args.dtmf))
    engine_url = args.engine or f"http://{config.engine.host}:{config.engine.port}"
    token = config.twilio.auth_token.get_secret_value()
    if not token:
        print("warning: TWILIO_AUTH_TOKEN is not set, so requests cannot be signed; set it "
              "to the engine's token (any value for a local engine you started with the "
              "same TWILIO_AUTH_TOKEN)", file=sys.stderr)
    caller = SimulatedCaller(engine_url, token, config.twilio.account_sid,
                             public_url=args.public_url or config.engine.public_url or None,
                             voice=espeak_settings(config).caller_voice)
    print(f"calling {engine_url} as {scenario.from_number} ({scenario.name}) …")
    result = await caller.run(scenario)
    for line in result.lines:
        latency = line.reply_latency_s
        reply = f"reply after {latency:.2f} s" if latency is not None else "no reply"
        print(f"  caller: {line.text!r}  ({reply})")
    print(f"heard {result.frames_received * 0.02:.1f} s of agent audio in "
          f"{result.frames_received} frames; {len(result.marks_echoed)} marks echoed, "
          f"{result.clears_received} clears; ended by {result.ended_by or 'unknown'}")
    for twiml in result.redirects:
        print(f"  transferred with TwiML: {twiml}")
    if args.wav:
        result.write_heard_wav(args.wav)
        print(f"wrote what the caller heard to {args.wav}")
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    config = _load(args)
    return asyncio.run(_call(args, config))


# -- demo ----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from switchboard.demo import run_demo

    config = _load(args)
    return asyncio.run(run_demo(config, headless=args.headless, calls=args.calls,
                                duration_s=args.duration))


# -- report --------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from engine.record.history import HistoryError
    from engine.record.report import build_report, parse_since, render_report

    config = _load(args)
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"switchboard report: {exc}", file=sys.stderr)
        return 2
    db = config.data_path() / "history.sqlite3"
    try:
        report = build_report(db, since, prices=config.prices)
    except HistoryError as exc:
        print(f"switchboard report: {exc}", file=sys.stderr)
        return 1
    print(render_report(report, args.format))
    return 0


# -- console -------------------------------------------------------------------------------


def cmd_console(args: argparse.Namespace) -> int:
    from console.cli import run_console

    return run_console(args.console_args)


# -- main ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard",
                                     description="Phone voice-agent engine and console")
    parser.add_argument("--config", help="config file (default: ./config.toml or "
                                         "$SWITCHBOARD_CONFIG)")
    parser.add_argument("--log-level", help="debug | info | warning | error")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the engine")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    call = sub.add_parser("call", help="place a simulated call (speaks Twilio's protocol)")
    call.add_argument("--engine", help="engine base URL (default from config)")
    call.add_argument("--public-url", help="URL to sign for, when the engine is behind a proxy")
    group = call.add_mutually_exclusive_group()
    group.add_argument("--scenario", help="scenario TOML file")
    group.add_argument("--say", nargs="+", metavar="TEXT", help="lines to say, in order")
    call.add_argument("--dtmf", help="digits to press after the lines")
    call.add_argument("--wav", help="write what the caller heard to this WAV file")
    call.set_defaults(func=cmd_call)

    demo = sub.add_parser("demo", help="engine + simulated callers (+ console)")
    demo.add_argument("--headless", action="store_true", help="no console; print a summary")
    demo.add_argument("--calls", type=int, default=3, help="callers calling at once")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: one round of scenarios "
                           "when headless, until quit otherwise)")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser("report", help="calls, costs and response times from history")
    report.add_argument("--since", default="30d", help="window: 30d, 12h, 90m, 2w")
    report.add_argument("--format", choices=["table", "json", "csv"], default="table")
    report.set_defaults(func=cmd_report)

    console = sub.add_parser("console", help="the supervisor console (Textual)",
                             add_help=False)
    console.add_argument("console_args", nargs=argparse.REMAINDER)
    console.set_defaults(func=cmd_console)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "console" in argv:
        # The console parses its own options (--engine, --token, …): hand them over whole.
        i = argv.index("console")
        args = parser.parse_args(argv[:i + 1])
        args.console_args = argv[i + 1:]
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
