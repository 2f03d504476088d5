"""Bearer tokens of the supervisor API: the full token and the optional read-only one.

The full token comes from `console_api.token` (env SWITCHBOARD_CONSOLE_TOKEN). When that is
empty the engine generates one on first start and keeps it in `<data_dir>/console_token`
(mode 0600, reused on every restart, so consoles keep working), and logs the command that
prints it; the value itself is never logged.

The read-only token comes from `console_api.readonly_token` (env
SWITCHBOARD_CONSOLE_READONLY_TOKEN) only: without it there is no read-only access. It is
not generated, because a watcher token nobody asked for would just be one more secret on
disk that grants a view of every call.

Called once at startup, before serving: the file I/O here is a few small synchronous calls.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.config import Config
from engine.log import get_logger

log = get_logger(__name__)

TOKEN_FILE_NAME = "console_token"
# secrets.token_urlsafe(32): 256 bits of randomness, 43 characters.
_GENERATED_BYTES = 32
# Shorter configured tokens are accepted (the operator chose them) but flagged.
MIN_RECOMMENDED_LENGTH = 24
# A token is sent in an HTTP header: printable ASCII without spaces only.
_ALLOWED = frozenset(chr(c) for c in range(0x21, 0x7F))

TokenSource = Literal["config", "file", "generated"]


class TokenError(ValueError):
    """A configured or stored token is unusable (the message says how to fix it)."""


@dataclass(frozen=True, slots=True)
class ConsoleTokens:
    # repr=False: a ConsoleTokens that ends up in a log line or traceback shows no secret.
    full: str = field(repr=False)
    readonly: str | None = field(default=None, repr=False)
    source: TokenSource = "config"  # where `full` came from
    path: Path | None = None  # the token file, when `full` lives in one


def token_file_path(config: Config) -> Path:
    return config.data_path() / TOKEN_FILE_NAME


def load_or_create_tokens(config: Config) -> ConsoleTokens:
    """The console tokens: configured ones, else the stored full token, else a new one.

    Raises TokenError for a token that cannot work (bad characters, read-only token equal
    to the full one) and OSError when the token file cannot be read or written.
    """
    readonly = _configured("console_api.readonly_token",
                           config.console_api.readonly_token.get_secret_value())
    full = _configured("console_api.token", config.console_api.token.get_secret_value())
    if full is not None:
        tokens = ConsoleTokens(full=full, readonly=readonly, source="config")
    else:
        path = token_file_path(config)
        stored = _read_token_file(path)
        if stored is not None:
            tokens = ConsoleTokens(full=stored, readonly=readonly, source="file", path=path)
            log.info("console_api.token_loaded", path=str(path),
                     read_with=f"cat {shlex.quote(str(path))}")
        else:
            value, source = _create_token_file(path)
            tokens = ConsoleTokens(full=value, readonly=readonly, source=source, path=path)
            log.warning("console_api.token_generated" if source == "generated"
                        else "console_api.token_loaded", path=str(path),
                        read_with=f"cat {shlex.quote(str(path))}",
                        hint="set SWITCHBOARD_CONSOLE_TOKEN to choose the token yourself")
    if tokens.readonly is not None and secrets.compare_digest(tokens.readonly, tokens.full):
        raise TokenError("console_api.readonly_token (SWITCHBOARD_CONSOLE_READONLY_TOKEN) "
                         "must differ from the full console token, or watchers could act")
    return tokens


def _configured(name: str, value: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    _check(name, value)
    if len(value) < MIN_RECOMMENDED_LENGTH:
        log.warning("console_api.weak_token", setting=name, length=len(value),
                    recommended_min_length=MIN_RECOMMENDED_LENGTH)
    return value


def _check(name: str, value: str) -> None:
    if not set(value) <= _ALLOWED:
        raise TokenError(f"{name}: a console token may hold printable ASCII without spaces "
                         "only (it travels in an HTTP header)")


def _read_token_file(path: Path) -> str | None:
    """The stored token, or None when there is no usable file (missing or empty)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise TokenError(f"{path} is not a regular file; remove it so a token can be "
                         "generated, or set SWITCHBOARD_CONSOLE_TOKEN")
    if info.st_mode & 0o077:
        # Someone loosened it (or an old copy): a token readable by others is no secret.
        os.chmod(path, 0o600)
        log.warning("console_api.token_file_permissions_fixed", path=str(path),
                    was=oct(stat.S_IMODE(info.st_mode)), now="0o600")
    value = path.read_text(encoding="ascii", errors="replace").strip()
    if not value:
        log.warning("console_api.token_file_empty", path=str(path))
        return None
    _check(str(path), value)
    return value


def _create_token_file(path: Path) -> tuple[str, TokenSource]:
    """Write a new token to `path` (0600) unless another process just did; returns the
    token in the file and whether it is ours ("generated") or the other's ("file")."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_urlsafe(_GENERATED_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Created 0600 from the start (never briefly readable), complete before it gets its
    # name, and linked rather than renamed so two engines starting together on one data
    # dir cannot overwrite each other's token: the second one adopts the first's.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = _read_token_file(path)
            if existing is None:  # an empty file left behind: replace it
                os.replace(tmp, path)
                return value, "generated"
            return existing, "file"
        return value, "generated"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
