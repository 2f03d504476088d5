"""`switchboard` command line: serve, call, demo, console, report, experiments, drain, tokens.

The global options (`--config`, `--log-level`) are accepted before or after the
subcommand, as the README writes them both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import Config, ConfigError, load_config
from engine.log import configure_logging, get_logger

if TYPE_CHECKING:
    pass

log = get_logger(__name__)

DEFAULT_CONFIG = "config.toml"
LOG_LEVELS = ["debug", "info", "warning", "error"]
GLOBAL_OPTIONS = ("--config", "--log-level")


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
    if args.log_level:
        config.logging.level = args.log_level
    configure_logging(config.logging.level, config.logging.format,
                      redact=config.logging.redact)
    return config


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.host:
        config.engine.host = args.host
    if args.port is not None:
        config.engine.port = args.port
    from engine.serve import run, serve

    run(serve(config))  # on uvloop where installed, as `python -m engine`
    return 0


# -- call ----------------------------------------------------------------------------------


async def _call(args: argparse.Namespace, config: Config) -> int:
    from engine.providers.builtin.tts_espeak import espeak_settings
    from engine.sim.caller import SimulatedCaller
    from engine.sim.caller_voice import caller_voice
    from engine.sim.scenario import Scenario, Step

    if args.scenario:
        scenario = Scenario.from_file(args.scenario)
    elif args.say:
        scenario = Scenario.from_lines(args.say)
    else:
        scenario = Scenario(name="listen", steps=[])
    if args.dtmf:
        scenario.steps.append(Step(dtmf=args.dtmf))
    engine_url = args.engine or f"http://{config.engine.host}:{config.engine.port}"
    token = config.twilio.auth_token.get_secret_value()
    if not token:
        print("warning: TWILIO_AUTH_TOKEN is not set, so requests cannot be signed; set it "
              "to the engine's token (any value for a local engine you started with the "
              "same TWILIO_AUTH_TOKEN)", file=sys.stderr)
    voice = caller_voice(config, espeak_voice=espeak_settings(config).caller_voice)
    caller = SimulatedCaller(engine_url, token, config.twilio.account_sid,
                             public_url=args.public_url or config.engine.public_url or None,
                             speech=voice)
    print(f"calling {engine_url} as {scenario.from_number} ({scenario.name}, voice "
          f"{voice.name} {voice.voice}) …")
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
    dsn = config.report_dsn(args.dsn)
    try:
        if dsn:  # the fleet's record: every engine's calls
            from engine.record.report import build_fleet_report

            report = asyncio.run(build_fleet_report(dsn, since, prices=config.prices))
        else:
            report = build_report(config.sqlite_history_path(), since,
                                  prices=config.prices)
    except HistoryError as exc:
        print(f"switchboard report: {exc}", file=sys.stderr)
        return 1
    print(render_report(report, args.format))
    return 0


# -- console -------------------------------------------------------------------------------


def cmd_console(args: argparse.Namespace) -> int:
    """The console parses its own options; a config given to the launcher supplies the
    defaults it cannot know: where that engine's supervisor API is, and its token file."""
    from console.cli import run_console

    console_args = list(args.console_args)
    if args.log_level:
        console_args += ["--log-level", args.log_level]
    if args.config or os.environ.get("SWITCHBOARD_CONFIG"):
        from engine.supervision.tokens import token_file_path

        config = load_config(_config_path(args.config))
        if not _has_option(console_args, "--engine", "--redis"):
            api = config.console_api
            console_args += ["--engine", f"ws://{api.host}:{api.port}"]
        if not _has_option(console_args, "--token-file"):
            console_args += ["--token-file", str(token_file_path(config))]
    return run_console(console_args)


def _has_option(argv: list[str], *names: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in argv for name in names)


# -- drain ---------------------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace) -> int:
    """Ask a running engine to drain, through its supervisor API, with a full token."""
    from switchboard.drain_client import request_drain

    config = _load(args)
    return asyncio.run(request_drain(config, args.url, args.token_file))


# -- tokens --------------------------------------------------------------------------------


def cmd_tokens(args: argparse.Namespace) -> int:
    """Named supervisor tokens in the config's data dir (switchboard/tokens_cli.py)."""
    from switchboard.tokens_cli import run_tokens

    return run_tokens(_load(args), args.action, getattr(args, "name", ""),
                      bool(getattr(args, "readonly", False)))


def cmd_experiments(args: argparse.Namespace) -> int:
    """A/B experiments' variants side by side (switchboard/experiments_cli.py)."""
    from switchboard.experiments_cli import run_experiments

    return run_experiments(_load(args), args.since, args.format, args.dsn)


# -- main ----------------------------------------------------------------------------------


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """--config and --log-level, on the main parser (default None) and on each subcommand
    (SUPPRESS: absent after the subcommand keeps what was given before it)."""
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="config file (default: ./config.toml, or $SWITCHBOARD_CONFIG)")
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=default,
                        help="the least important log lines written (default: "
                             "logging.level in the config)")


def _version() -> str:
    try:
        return importlib.metadata.version("switchboard")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard",
                                     description="Phone voice-agent engine and console")
    _add_global_options(parser, None)
    parser.add_argument("--version", action="version", version=f"switchboard {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; `switchboard COMMAND --help` for its options")

    def command(name: str, help_text: str, add_help: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text, add_help=add_help)
        _add_global_options(cmd, argparse.SUPPRESS)
        return cmd

    serve = command("serve", "run the engine")
    serve.add_argument("--host", help="address to listen on (default: engine.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: engine.port)")
    serve.set_defaults(func=cmd_serve)

    call = command("call", "place a simulated call (speaks Twilio's protocol)")
    call.add_argument("--engine", metavar="URL",
                      help="engine base URL (default: engine.host and engine.port)")
    call.add_argument("--public-url", metavar="URL",
                      help="URL to sign for, when the engine is behind a proxy")
    group = call.add_mutually_exclusive_group()
    group.add_argument("--scenario", metavar="FILE", help="scenario TOML file")
    group.add_argument("--say", nargs="+", metavar="TEXT", help="lines to say, in order")
    call.add_argument("--dtmf", metavar="DIGITS", help="digits to press after the lines")
    call.add_argument("--wav", metavar="OUT", help="write what the caller heard to this WAV")
    call.set_defaults(func=cmd_call)

    demo = command("demo", "engine + simulated callers (+ console)")
    demo.add_argument("--headless", action="store_true",
                      help="no console: print the conversations and a summary")
    demo.add_argument("--calls", type=int, default=3, metavar="N",
                      help="callers calling at once (default 3)")
    demo.add_argument("--duration", type=float, default=None, metavar="S",
                      help="stop after this many seconds (default: one round of scenarios "
                           "when headless, until quit otherwise)")
    demo.set_defaults(func=cmd_demo)

    report = command("report", "calls, costs and response times from history")
    from switchboard.experiments_cli import add_experiments_command, add_history_options

    add_history_options(report, "table (default); json: the figures and every cost line; "
                                "csv: one row per cost line")
    report.set_defaults(func=cmd_report)

    experiments = command("experiments", "A/B experiments: each variant's outcomes side by "
                                         "side, with intervals and a verdict per metric")
    add_experiments_command(experiments)
    experiments.set_defaults(func=cmd_experiments)

    console = command("console", "the supervisor console (Textual); its options: "
                                 "switchboard console --help", add_help=False)
    console.add_argument("console_args", nargs=argparse.REMAINDER,
                         help="the console's own options")
    console.set_defaults(func=cmd_console)

    drain = command("drain", "rolling restart: the engine answers new calls 503, lets the "
                             "calls in progress finish, then exits (--url: its supervisor "
                             "API; --token-file: a full token)")
    drain.add_argument("--url", metavar="URL",
                       help="the engine's supervisor API (default: console_api.host/port)")
    drain.add_argument("--token-file", metavar="FILE",
                       help="a file holding a full token (default: "
                            "$SWITCHBOARD_CONSOLE_TOKEN, else the engine's console_token)")
    drain.set_defaults(func=cmd_drain)

    tokens = command("tokens", "named supervisor tokens: add NAME [--readonly], list, "
                               "revoke NAME (the audit trail names who acted)")
    actions = tokens.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    help="add, list or revoke")
    add = actions.add_parser("add", help="add a token and print it (only this once)",
                             description="Add a token for one supervisor and print it.")
    add.add_argument("name", metavar="NAME", help="who holds it: 1 to 32 letters, digits, "
                                                  "'.', '_' or '-'")
    add.add_argument("--readonly", action="store_true",
                     help="a token that can watch calls but not act on them")
    listing = actions.add_parser("list", help="names, roles, when added (never the tokens)",
                                 description="List the tokens that open the supervisor API.")
    revoke = actions.add_parser("revoke", help="revoke a token at once",
                                description="Revoke a named token: new connections are "
                                            "refused at once, live ones closed.")
    revoke.add_argument("name", metavar="NAME", help="the token's name")
    for sub_parser in (add, listing, revoke):
        _add_global_options(sub_parser, argparse.SUPPRESS)
    tokens.set_defaults(func=cmd_tokens)
    return parser


def _split_console(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(launcher part, console part) when the subcommand is `console`: the console parses
    its own options, except the global ones, which stay the launcher's."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # options before the subcommand
        i += 2 if argv[i] in GLOBAL_OPTIONS else 1
    if i >= len(argv) or argv[i] != "console":
        return None
    taken: list[str] = []
    rest: list[str] = []
    after = argv[i + 1:]
    j = 0
    while j < len(after):
        name = after[j].split("=", 1)[0]
        width = 2 if after[j] in GLOBAL_OPTIONS else 1
        (taken if name in GLOBAL_OPTIONS else rest).extend(after[j:j + width])
        j += width
    return [*argv[:i], *taken, "console"], rest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    split = _split_console(argv)
    if split is not None:
        launcher, console_args = split
        args = parser.parse_args(launcher)
        args.console_args = console_args
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
