"""`switchboard drain`: POST /engine/drain on a running engine's supervisor API.

The token is the one a full console uses: --token-file, else $SWITCHBOARD_CONSOLE_TOKEN
(console_api.token), else the console_token file in the engine's data directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import aiohttp

from engine.config import Config
from engine.supervision.tokens import TokenError, existing_tokens

DRAIN_PATH = "/engine/drain"
_TIMEOUT_S = 10.0


def drain_url(config: Config, url: str | None) -> str:
    """http(s)://host:port/engine/drain from --url (ws:// accepted, as consoles use it)
    or the config's console API address."""
    base = url or f"http://{config.console_api.host}:{config.console_api.port}"
    for ws, http in (("ws://", "http://"), ("wss://", "https://")):
        if base.startswith(ws):
            base = http + base[len(ws):]
    if "://" not in base:
        base = "http://" + base
    base = base.rstrip("/")
    for suffix in ("/console/ws", DRAIN_PATH):
        base = base.removesuffix(suffix)
    return base + DRAIN_PATH


def read_token(config: Config, token_file: str | None) -> str:
    """Raises TokenError (with what to do) when there is none."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="ascii", errors="replace").strip()
        except OSError as exc:
            raise TokenError(f"cannot read {token_file}: {exc.strerror or exc}") from exc
        if not token:
            raise TokenError(f"{token_file} is empty")
        return token
    tokens = existing_tokens(config)
    if tokens is None:
        raise TokenError("no console token: pass --token-file, set "
                         "SWITCHBOARD_CONSOLE_TOKEN, or give the engine's --config")
    return tokens.full


async def request_drain(config: Config, url: str | None, token_file: str | None) -> int:
    target = drain_url(config, url)
    try:
        token = read_token(config, token_file)
    except TokenError as exc:
        print(f"switchboard drain: {exc}", file=sys.stderr)
        return 2
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S)) \
                as http, http.post(target, headers={"Authorization": f"Bearer {token}"}) \
                as resp:
            body = await resp.text()
            if resp.status != 202:
                print(f"switchboard drain: {target} answered {resp.status}: "
                      f"{body.strip()[:200]}", file=sys.stderr)
                return 1
            status = await resp.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"switchboard drain: cannot reach {target}: {exc or type(exc).__name__}",
              file=sys.stderr)
        return 1
    already = "" if status.get("started") else " (it already was)"
    print(f"engine draining{already}: {status.get('active_calls')} calls in progress, "
          f"deadline in {status.get('deadline_in_s')} s; new calls get 503, the engine "
          "exits when the last call ends")
    return 0
