"""`python -m console`: the supervisor console (same options as `switchboard console`)."""

from __future__ import annotations

import sys

from console.cli import run_console

if __name__ == "__main__":
    sys.exit(run_console())
