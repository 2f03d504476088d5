"""Bearer tokens of the supervisor API: what a token is, and the console tokens.

Every token that opens the API is a `TokenEntry`: a name (what the audit trail records
when its holder acts), a role ("full" acts, "readonly" only watches) and the SHA-256
digest it is checked against. Named tokens, one per supervisor, live in token_store.py;
this module keeps the console tokens of the single-token settings, which work on as
tokens named "console" and "console-readonly":

The full console token comes from `console_api.token` (env SWITCHBOARD_CONSOLE_TOKEN).
When that is empty the engine generates one on first start and keeps it in
`<data_dir>/console_token` (mode 0600, reused on every restart, so consoles keep working),
and logs the command that prints it; the value itself is never logged.

The read-only console token comes from `console_api.readonly_token` (env
SWITCHBOARD_CONSOLE_READONLY_TOKEN) only: without it there is no read-only console token.
It is not generated, because a watcher token nobody asked for would just be one more
secret on disk that grants a view of every call.

Called once at startup, before serving: the file I/O here is a few small synchronous calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.config import Config, ConfigError
from engine.log import get_logger

log = get_logger(__name__)

Role = Literal["full", "readonly"]
ROLES: tuple[Role, ...] = ("full", "readonly")
CONSOLE_NAME = "console"  # who acted with the full console token
CONSOLE_READONLY_NAME = "console-readonly"

TOKEN_FILE_NAME = "console_token"
# secrets.token_urlsafe(32): 256 bits of randomness, 43 characters.
GENERATED_BYTES = 32
# Shorter configured tokens are accepted (the operator chose them) but flagged.
MIN_RECOMMENDED_LENGTH = 24
# A token is sent in an HTTP header: printable ASCII without spaces only.
_ALLOWED = frozenset(chr(c) for c in range(0x21, 0x7F))

TokenSource = Literal["config", "file", "generated"]


class TokenError(ConfigError):
    """A configured or stored token is unusable (the message says how to fix it); a
    ConfigError, so the engine refuses to start with that message, not a traceback."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One token that opens the supervisor API, as the engine knows it (never the token)."""

    name: str
    role: Role
    digest: bytes = field(repr=False)  # token_digest() of the token
    created_at: float | None = None  # unix seconds; None for the console tokens
    source: str = "named"  # "named", or where a console token comes from


def token_digest(token: str) -> bytes:
    """What a token is checked against. A plain SHA-256 is enough for tokens of 256 random
    bits (nothing to guess); compared as digests, equal lengths leak nothing either."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class ConsoleTokens:
    # repr=False: a ConsoleTokens that ends up in a log line or traceback shows no secret.
    full: str = field(repr=False)
    readonly: str | None = field(default=None, repr=False)
    source: TokenSource = "config"  # where `full` came from
    path: Path | None = None  # the token file, when `full` lives in one

    def entries(self) -> tuple[TokenEntry, ...]:
        """These tokens as the names the audit trail gives them."""
        full_source = ("console_api.token ($SWITCHBOARD_CONSOLE_TOKEN)"
                       if self.source == "config" else str(self.path))
        found = [TokenEntry(CONSOLE_NAME, "full", token_digest(self.full), source=full_source)]
        if self.readonly is not None:
            found.append(TokenEntry(
                CONSOLE_READONLY_NAME, "readonly", token_digest(self.readonly),
                source="console_api.readonly_token ($SWITCHBOARD_CONSOLE_READONLY_TOKEN)"))
        return tuple(found)


def token_file_path(config: Config) -> Path:
    return config.data_path() / TOKEN_FILE_NAME


def load_or_create_tokens(config: Config) -> ConsoleTokens:
    """The console tokens: configured ones, else the stored full token, else a new one.

    Raises TokenError for a token that cannot work (bad characters, read-only token equal
    to the full one) and OSError when the token file cannot be read or written.
    """
    tokens = existing_tokens(config)
    if tokens is None:
        path = token_file_path(config)
        value, source = _create_token_file(path)
        tokens = _with_readonly(config, ConsoleTokens(full=value, source=source, path=path))
        log.warning("console_api.token_generated" if source == "generated"
                    else "console_api.token_loaded", path=str(path),
                    read_with=f"cat {shlex.quote(str(path))}",
                    hint="set SWITCHBOARD_CONSOLE_TOKEN to choose the token yourself")
    elif tokens.source == "file":
        log.info("console_api.token_loaded", path=str(tokens.path),
                 read_with=f"cat {shlex.quote(str(tokens.path))}")
    return tokens


def existing_tokens(config: Config) -> ConsoleTokens | None:
    """The configured or stored console tokens; None when the full one is still to be
    generated. Writes nothing (but tightens a token file others could read)."""
    full = _configured("console_api.token", config.console_api.token.get_secret_value())
    if full is not None:
        return _with_readonly(config, ConsoleTokens(full=full, source="config"))
    path = token_file_path(config)
    stored = _read_token_file(path)
    if stored is None:
        return None
    return _with_readonly(config, ConsoleTokens(full=stored, source="file", path=path))


def _with_readonly(config: Config, tokens: ConsoleTokens) -> ConsoleTokens:
    readonly = _configured("console_api.readonly_token",
                           config.console_api.readonly_token.get_secret_value())
    if readonly is not None and secrets.compare_digest(readonly, tokens.full):
        raise TokenError("console_api.readonly_token (SWITCHBOARD_CONSOLE_READONLY_TOKEN) "
                         "must differ from the full console token, or watchers could act")
    return ConsoleTokens(full=tokens.full, readonly=readonly, source=tokens.source,
                         path=tokens.path)


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


def private_file_info(path: Path) -> os.stat_result | None:
    """stat() of a file only its owner may read, tightening one others could (someone
    loosened it, or an old copy); None when it does not exist."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise TokenError(f"{path} is not a regular file; remove it")
    if info.st_mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("console_api.token_file_permissions_fixed", path=str(path),
                    was=oct(stat.S_IMODE(info.st_mode)), now="0o600")
    return info


def _read_token_file(path: Path) -> str | None:
    """The stored token, or None when there is no usable file (missing or empty)."""
    if private_file_info(path) is None:
        return None
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
    value = secrets.token_urlsafe(GENERATED_BYTES)
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
