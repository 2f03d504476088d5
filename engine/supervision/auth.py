"""Whose bearer token is this: the console tokens and the named ones, kept current.

A token is matched against every known digest in constant time (all are compared, so
timing does not tell which one matched, nor how many there are before it). The named
tokens file is read again whenever it changes, checked on every new connection, before
every command and by the API's watch on live connections: a revoked token opens nothing
from then on. A file that cannot be trusted (damaged, unreadable) opens nothing until it
is fixed, and the console tokens keep working meanwhile.
"""

from __future__ import annotations

import asyncio
import hmac

from engine.config import Config
from engine.log import get_logger
from engine.supervision.token_store import FileKey, NamedTokenStore
from engine.supervision.tokens import (
    ConsoleTokens,
    TokenEntry,
    TokenError,
    load_or_create_tokens,
    token_digest,
)

log = get_logger(__name__)


class SupervisorTokens:
    """Every token that opens the supervisor API, by name and role."""

    def __init__(self, console: ConsoleTokens, store: NamedTokenStore | None = None) -> None:
        """Reads the named tokens now: a damaged file is a TokenError at startup."""
        self.console = console
        self._store = store
        self._console_entries = console.entries()
        self._named: tuple[TokenEntry, ...] = ()
        self._file_key: FileKey | None = None
        self._failing = False  # the file could not be read last time (logged once)
        # One reload at a time: two racing threads could otherwise leave the older
        # reading in place, and a revoked token would open again until the next check.
        self._refreshing = asyncio.Lock()
        if store is not None:
            self._file_key = store.file_key()
            self._named = tuple(store.entries())

    @classmethod
    def from_config(cls, config: Config) -> SupervisorTokens:
        """The console tokens (generated if need be) and the data dir's named tokens."""
        return cls(load_or_create_tokens(config), NamedTokenStore.for_config(config))

    @property
    def named_count(self) -> int:
        return len(self._named)

    def match(self, presented: str) -> TokenEntry | None:
        """The entry whose token this is, or None."""
        digest = token_digest(presented)
        found: TokenEntry | None = None
        for entry in (*self._console_entries, *self._named):
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry
        return found

    def is_current(self, entry: TokenEntry) -> bool:
        """Whether the token of `entry` still opens the API (as of the last refresh)."""
        return entry in self._console_entries or entry in self._named

    async def refresh(self) -> None:
        """Read the named tokens again if their file changed."""
        if self._store is not None:
            async with self._refreshing:
                await asyncio.to_thread(self._reload_if_changed)

    def _reload_if_changed(self) -> None:
        assert self._store is not None
        try:
            key = self._store.file_key()
            if key == self._file_key and not self._failing:
                return
            named = tuple(self._store.entries())
        except (TokenError, OSError) as exc:
            if not self._failing:
                log.error("console_api.named_tokens_unreadable", path=str(self._store.path),
                          error=str(exc), effect="no named token opens the API until fixed")
            self._named, self._file_key, self._failing = (), None, True
            return
        if self._failing:
            log.info("console_api.named_tokens_readable", path=str(self._store.path))
        gone = {e.name for e in self._named if e not in named}
        if gone:
            log.info("console_api.tokens_revoked", names=sorted(gone))
        self._named, self._file_key, self._failing = named, key, False
