"""Named supervisor tokens (`switchboard tokens add|list|revoke`), kept hashed on disk.

Each supervisor gets a token of their own, so the audit trail can name who acted. The
file, `<data_dir>/supervisor_tokens.json` (mode 0600), holds each token's name, role,
creation time and SHA-256 digest, never the token itself: the token is shown once, when
it is added. Changes are made under a lock file and land by an atomic rename, so an engine
reading the file sees the old list or the new one, and two changes at once both land.
A running engine notices a change by the file's identity (auth.py).

Synchronous file I/O: the CLI calls it directly, the engine from a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.config import Config
from engine.supervision.tokens import (
    CONSOLE_NAME,
    CONSOLE_READONLY_NAME,
    GENERATED_BYTES,
    Role,
    TokenEntry,
    TokenError,
    private_file_info,
    token_digest,
)

STORE_FILE_NAME = "supervisor_tokens.json"
# Shown in the audit trail and typed on command lines: short, no spaces or markup.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
# The console tokens' names, and the history's own actor for policy actions.
RESERVED_NAMES = frozenset({CONSOLE_NAME, CONSOLE_READONLY_NAME, "policy"})
# Recognisable in a leaked paste or a secret scanner; the rest is 256 random bits.
TOKEN_PREFIX = "sbt_"

# What a stat() of the file says about its version: (inode, size, mtime_ns).
FileKey = tuple[int, int, int]


class _StoredToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=f"^{NAME_PATTERN.pattern}$")]
    role: Role
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    created_at: float


class _StoreFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    tokens: list[_StoredToken] = Field(default_factory=list)


class NamedTokenStore:
    """The named tokens file of one data directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(f".{path.name}.lock")

    @classmethod
    def for_config(cls, config: Config) -> NamedTokenStore:
        return cls(config.data_path() / STORE_FILE_NAME)

    # --- reading ----------------------------------------------------------------------

    def file_key(self) -> FileKey | None:
        """Changes whenever the file is replaced; None when there is no file."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def entries(self) -> list[TokenEntry]:
        """Every named token, oldest first (none without a file). TokenError when the
        file cannot be trusted: then no named token should open anything."""
        return [_entry(t) for t in self._read().tokens]

    def _read(self) -> _StoreFile:
        if private_file_info(self.path) is None:
            return _StoreFile()
        try:
            stored = _StoreFile.model_validate_json(self.path.read_bytes())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the file"
            raise self._damaged(f"{where}: {first['msg']}") from None
        seen: set[str] = set()
        for token in stored.tokens:  # what `add` ensures, in case of an edit by hand
            key = token.name.casefold()
            if key in seen or key in RESERVED_NAMES:
                raise self._damaged(f"the name {token.name!r} is taken twice or reserved")
            seen.add(key)
        return stored

    def _damaged(self, why: str) -> TokenError:
        return TokenError(f"{self.path} is damaged ({why}); restore it from a backup, or "
                          "delete it and add the tokens again")

    # --- changing ---------------------------------------------------------------------

    def add(self, name: str, role: Role) -> str:
        """A new token for `name`; returns the token, which is not kept anywhere."""
        check_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(GENERATED_BYTES)
        with self._locked():
            stored = self._read()
            if any(t.name.casefold() == name.casefold() for t in stored.tokens):
                raise TokenError(f"a token named {name!r} exists already; revoke it first "
                                 "to replace it")
            stored.tokens.append(_StoredToken(name=name, role=role,
                                              sha256=token_digest(token).hex(),
                                              created_at=time.time()))
            self._write(stored)
        return token

    def revoke(self, name: str) -> TokenEntry | None:
        """Remove the token named `name` (any case); the removed one, None if none was."""
        with self._locked():
            stored = self._read()
            gone = next((t for t in stored.tokens if t.name.casefold() == name.casefold()),
                        None)
            if gone is None:
                return None
            stored.tokens.remove(gone)
            self._write(stored)
        return _entry(gone)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, stored: _StoreFile) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        # 0600 from the start, complete and synced before it takes the file's name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(stored.model_dump_json(indent=1) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def check_name(name: str) -> None:
    """TokenError unless `name` may name a token (its uniqueness is the store's check)."""
    if not NAME_PATTERN.fullmatch(name):
        raise TokenError(f"invalid token name {name!r}: 1 to 32 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    if name.casefold() in RESERVED_NAMES:
        raise TokenError(f"the name {name!r} is reserved: the audit trail already uses it "
                         f"for {', '.join(sorted(RESERVED_NAMES))}")


def _entry(stored: _StoredToken) -> TokenEntry:
    return TokenEntry(stored.name, stored.role, bytes.fromhex(stored.sha256),
                      stored.created_at)
