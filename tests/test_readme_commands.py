"""Every command line the README shows, checked or run as written, so none drifts again.

The README's `sh` blocks and its inline code are read for lines that start with
`switchboard`, `python3 dev.py` or `python -m engine`:
- a synopsis (`[--host H]`, `TEXT…`, `URL`): every option it names is one the command's
  `--help` lists;
- a concrete engine command runs against a copy of config.toml on free ports, as a user
  would type it in that directory: each `serve` until `/healthz` answers, then, against
  the first, every `call` (a real call: neural caller voice, Whisper, the FAQ, the
  neural agent voice) and every `report` over the history it wrote;
- the others run with `--help` appended (the console needs a terminal, the demo has its
  own test) or, for `python3 dev.py`, must be commands dev.py knows (running them would
  reinstall `.venv`).
Any other line in an `sh` block must be one of the few shell lines listed here.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
PROGRAMS = ("switchboard", "python3 dev.py", "python -m engine")
SSH = "ssh host "  # `ssh host switchboard console`: the command is what runs there
# Shell lines of the README's blocks that are not ours; the test does what they do.
SHELL_LINES = {". .venv/bin/activate", "export TWILIO_AUTH_TOKEN=local-secret"}
ENGINE_COMMANDS = ("serve", "call", "report")
PLACEHOLDER = re.compile(r"[\[\]…|]|\b[A-Z][A-Z_:/]*[A-Z]\b|\.\.\.")

pytestmark = pytest.mark.slow


def _ours(command: str) -> bool:
    return any(command == program or command.startswith(program + " ")
               for program in PROGRAMS)


def readme_commands() -> list[str]:
    """The command lines the README shows, in order, once each."""
    text = README.read_text(encoding="utf-8")
    found: list[str] = []
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    for block in blocks:
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip().removesuffix("&").strip()
            if command and command not in SHELL_LINES:
                assert _ours(command), f"unknown line in an sh block: {line!r}"
                found.append(command)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        command = span.replace("\\|", "|").strip().removeprefix(SSH)
        if _ours(command):
            found.append(command)
    return list(dict.fromkeys(found))


def _words(command: str) -> list[str]:
    return shlex.split(command)


def _subcommand(words: list[str]) -> str | None:
    return next((w for w in words[1:] if not w.startswith("-")
                 and w in (*ENGINE_COMMANDS, "demo", "console", "experiments")), None)


def _needs_engine(command: str) -> bool:
    """serve and report run as written; a call does when it says something (the bare
    `switchboard call` in the prose names the command)."""
    words = _words(command)
    sub = _subcommand(words) if words[0] == "switchboard" else None
    return sub in ("serve", "report") or (
        sub == "call" and any(w in ("--say", "--scenario") for w in words))


COMMANDS = readme_commands()
SYNOPSES = [c for c in COMMANDS if PLACEHOLDER.search(c)]
CONCRETE = [c for c in COMMANDS if c not in SYNOPSES]
DEV = [c for c in CONCRETE if c.startswith("python3 dev.py")]
ENGINE = [c for c in CONCRETE if _needs_engine(c)]
HELP = [c for c in CONCRETE if c not in DEV and c not in ENGINE]


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          **kwargs)  # type: ignore[call-overload]


def _argv(command: str) -> list[str]:
    """A README line as the process it starts, with the venv's programs."""
    words = _words(command)
    if words[:2] == ["python", "-m"]:
        return [sys.executable, *words[1:]]
    return [str(BIN / words[0]), *words[1:]]


def test_the_readme_shows_the_commands_this_test_checks() -> None:
    assert any(c.startswith("switchboard serve --config") for c in ENGINE)
    assert any(c.startswith("switchboard --config") for c in ENGINE)
    assert any(_subcommand(_words(c)) == "call" for c in ENGINE)
    assert "switchboard --version" in HELP
    for name in ("serve", "call", "console", "demo", "report"):
        assert any(_subcommand(_words(c)) == name for c in SYNOPSES), name


@pytest.mark.parametrize("command", SYNOPSES)
def test_a_synopsis_names_only_options_the_command_has(command: str) -> None:
    words = _words(command)
    sub = _subcommand(words)
    if words[0] != "switchboard":
        pytest.fail(f"no synopsis check for {command!r}")
    out = _run([str(BIN / "switchboard"), *([sub] if sub else []), "--help"])
    assert out.returncode == 0, out.stderr
    for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", command):
        assert option in out.stdout, f"{command!r}: {option} is not an option:\n{out.stdout}"


@pytest.mark.parametrize("command", HELP)
def test_a_command_runs(command: str) -> None:
    argv = _argv(command)
    if "--version" not in argv:
        argv.append("--help")
    out = _run(argv, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.mark.parametrize("command", DEV)
def test_a_dev_py_command_is_one_dev_py_has(command: str) -> None:
    words = _words(command)
    doc = _run([sys.executable, str(ROOT / "dev.py"), "help"]).stdout
    assert f"python3 dev.py {words[2]}" in doc, doc
    if words[2] == "demo" and words[3:]:  # dev.py demo ARGS are `switchboard demo ARGS`
        assert _run([str(BIN / "switchboard"), "demo", *words[3:], "--help"]).returncode == 0


# -- the engine commands, run as written -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def workdir(tmp_path: Path) -> tuple[Path, dict[str, str], int]:
    """A directory holding config.toml as shipped but on free ports, the environment the
    README's block sets up, and the engine's port."""
    port = _free_port()
    config = (ROOT / "config.toml").read_text(encoding="utf-8")
    config = re.sub(r"(?m)^port = 8080\b", f"port = {port}", config)
    config = re.sub(r"(?m)^port = 8081\b", f"port = {_free_port()}", config)
    (tmp_path / "config.toml").write_text(config, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               TWILIO_AUTH_TOKEN="local-secret", SWITCHBOARD_DATA_DIR=str(tmp_path / "data"))
    return tmp_path, env, port


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def _serving(command: str, cwd: Path, env: dict[str, str], port: int) -> Iterator[None]:
    engine = subprocess.Popen(_argv(command), cwd=cwd, env=env, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not _healthy(port):
            assert engine.poll() is None, f"{command!r} exited: {engine.communicate()[1]}"
            assert time.monotonic() < deadline, f"{command!r}: no /healthz after 90 s"
            time.sleep(0.3)
        yield
    finally:
        engine.send_signal(signal.SIGINT)
        try:
            engine.wait(timeout=20)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
    assert engine.returncode == 0, engine.stderr.read() if engine.stderr else ""


def test_engine_commands_run_as_written(workdir: tuple[Path, dict[str, str], int]) -> None:
    cwd, env, port = workdir
    serves = [c for c in ENGINE if _subcommand(_words(c)) == "serve"]
    # Calls first: the reports then read the history they leave.
    others = sorted((c for c in ENGINE if c not in serves),
                    key=lambda c: _subcommand(_words(c)) != "call")
    for index, serve in enumerate(serves):
        with _serving(serve, cwd, env, port):
            if index:
                continue  # every way of starting it works; one engine takes the calls
            for command in others:
                out = _run(_argv(command), cwd=cwd, env=env)
                assert out.returncode == 0, f"{command!r}:\n{out.stdout}\n{out.stderr}"
                if _subcommand(_words(command)) == "call":
                    assert "reply after" in out.stdout, out.stdout
                    for wav in re.findall(r"--wav (\S+)", command):
                        assert (cwd / wav).stat().st_size > 8000 * 2  # > 1 s of audio
                else:
                    assert "calls" in out.stdout.lower(), out.stdout


def test_every_option_of_every_command_says_what_it_does() -> None:
    import argparse

    from console.cli import build_parser as console_parser
    from switchboard.cli import build_parser

    main = build_parser()
    parsers = {"switchboard": main, "switchboard console (its own)": console_parser()}
    for action in main._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.update({f"switchboard {name}": sub for name, sub in action.choices.items()})
    assert len(parsers) == 10  # with `drain`, `tokens` and `experiments`
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, \
                f"{name}: {action.option_strings or action.dest} has no help text"


def test_global_options_work_before_and_after_every_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import console.cli
    from switchboard import cli

    parser = cli.build_parser()
    for command in ("serve", "call", "demo", "report"):
        for argv in (["--config", "c.toml", "--log-level", "DEBUG", command],
                     [command, "--config", "c.toml", "--log-level", "DEBUG"]):
            args = parser.parse_args(argv)
            assert (args.config, args.log_level) == ("c.toml", "debug"), argv
    # After the command wins, as a later option does.
    assert parser.parse_args(["--config", "a", "serve", "--config", "b"]).config == "b"

    # The console parses its own options; the global ones stay the launcher's, and a
    # config names that engine's supervisor API and token file.
    config = tmp_path / "c.toml"
    config.write_text(f'[engine]\ndata_dir = "{tmp_path}"\n[console_api]\nport = 9123\n')
    seen: list[list[str]] = []
    monkeypatch.setattr(console.cli, "run_console", lambda argv: seen.append(argv) or 0)
    monkeypatch.delenv("SWITCHBOARD_CONFIG", raising=False)
    assert cli.main(["console", "--readonly", "--config", str(config),
                     "--log-level", "warning"]) == 0
    assert seen[-1] == ["--readonly", "--log-level", "warning",
                        "--engine", "ws://127.0.0.1:9123",
                        "--token-file", str(tmp_path / "console_token")]
    assert cli.main(["--config", str(config), "console", "--engine", "ws://h:1"]) == 0
    assert seen[-1] == ["--engine", "ws://h:1", "--token-file", str(tmp_path / "console_token")]
    assert cli.main(["console", "--engine", "ws://h:1"]) == 0  # no config: nothing added
    assert seen[-1] == ["--engine", "ws://h:1"]
