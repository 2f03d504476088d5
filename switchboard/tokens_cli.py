"""`switchboard tokens`: named supervisor tokens in the config's data dir (add, revoke,
list); a running engine follows at once."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from engine.config import Config

if TYPE_CHECKING:
    from engine.supervision.token_store import NamedTokenStore
    from engine.supervision.tokens import Role


def run_tokens(config: Config, action: str, name: str, readonly: bool) -> int:
    from engine.supervision.token_store import NamedTokenStore
    from engine.supervision.tokens import TokenError

    store = NamedTokenStore.for_config(config)
    try:
        if action == "add":
            return _tokens_add(store, name, "readonly" if readonly else "full")
        if action == "revoke":
            return _tokens_revoke(store, config, name)
        return _tokens_list(store, config)
    except (TokenError, OSError) as exc:
        print(f"switchboard tokens: {exc}", file=sys.stderr)
        return 1


def _tokens_add(store: NamedTokenStore, name: str, role: Role) -> int:
    token = store.add(name, role)
    print(token)  # alone on stdout, for `> file`; the rest goes to stderr
    print(f"added {name} ({role}). This is the only time the token is shown: give it to "
          f"{name}, who connects with `switchboard console --token-file FILE` (a file only "
          "they can read) or $SWITCHBOARD_CONSOLE_TOKEN. Their commands are audited as "
          f"{name!r}.", file=sys.stderr)
    return 0


def _tokens_revoke(store: NamedTokenStore, config: Config, name: str) -> int:
    from engine.supervision.tokens import existing_tokens

    console = existing_tokens(config)
    for entry in console.entries() if console is not None else ():
        if entry.name == name.casefold():
            print(f"switchboard tokens: {entry.name!r} is a console token, not a named one; "
                  f"it comes from {entry.source}: to replace it, change that setting or "
                  "delete that file (the engine then makes a new one), and restart the "
                  "engine", file=sys.stderr)
            return 1
    gone = store.revoke(name)
    if gone is None:
        print(f"switchboard tokens: no token named {name!r} (`switchboard tokens list`)",
              file=sys.stderr)
        return 1
    print(f"revoked {gone.name} ({gone.role}): a running engine refuses it from now on and "
          "closes the consoles using it")
    return 0


def _tokens_list(store: NamedTokenStore, config: Config) -> int:
    from engine.supervision.tokens import existing_tokens, token_file_path

    console = existing_tokens(config)
    entries = [*(console.entries() if console is not None else ()), *store.entries()]
    rows = [("NAME", "ROLE", "CREATED (UTC)", "SOURCE")]
    for entry in entries:
        created = ("-" if entry.created_at is None else
                   datetime.fromtimestamp(entry.created_at, UTC).strftime("%Y-%m-%d %H:%M"))
        rows.append((entry.name, entry.role, created, entry.source))
    name_width = max(len(row[0]) for row in rows)
    for name, role, created, source in rows:
        print(f"{name:<{name_width}}  {role:<8}  {created:<16}  {source}")
    if console is None:
        print(f"(no console token yet: the engine generates {token_file_path(config)} at its "
              "first start)", file=sys.stderr)
    return 0
