"""The data directory is private to its owner: transcripts, caller numbers and tokens live
there. It is created 0700 and its files 0600; an existing one (and what is in it) is
tightened at start, with a log line naming what was opened up.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from engine.log import get_logger

log = get_logger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
_OPEN_TO_OTHERS = 0o077


def prepare_data_dir(path: Path) -> Path:
    """Create `path` (0700) or tighten it and everything under it (never following a
    symlink): group and others lose every permission."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    top = path.resolve()  # a data dir that is a symlink: its target is what to tighten
    tightened: list[str] = []
    for folder, _, files in os.walk(top):
        for entry in (folder, *(os.path.join(folder, name) for name in files)):
            if _tighten(Path(entry)):
                tightened.append(os.path.relpath(entry, top))
    if tightened:
        log.warning("data_dir.permissions_tightened", path=str(path), count=len(tightened),
                    entries=tightened[:20])
    return path


def private_file(path: Path) -> None:
    """Make sure `path` exists and only its owner can read it: created 0600 if missing,
    tightened (with a log line) if others could read it."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
    if _tighten(path):
        log.warning("data_dir.permissions_tightened", path=str(path), count=1)


def _tighten(path: Path) -> bool:
    """Drop group and other permissions; whether there were any."""
    try:
        info = path.lstat()
    except FileNotFoundError:  # gone meanwhile (a -shm file, a temporary)
        return False
    if stat.S_ISLNK(info.st_mode) or not info.st_mode & _OPEN_TO_OTHERS:
        return False
    os.chmod(path, stat.S_IMODE(info.st_mode) & ~_OPEN_TO_OTHERS)
    return True
