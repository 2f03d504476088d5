"""The supervisor API's site: WebSocket `/console/ws` for consoles (wire: api_schema.py).

Serves on its own aiohttp site (`console_api.host:port`, 127.0.0.1 by default), apart from
the Twilio-facing app, so it is not public unless configured to be.

Auth before the upgrade: `Authorization: Bearer <token>`, a named token or a console token
(auth.py), compared in constant time; anything else is HTTP 401 and a warning line (never
with the token). Header only: a token in the URL would end up in access logs. Browsers
cannot set that header on a WebSocket, so a web page cannot hijack a local console API.
The token's name is who acts; `X-Switchboard-Actor` is kept only as what the console
claimed. A revoked token opens no new connection; a live one is refused at its next
command and closed (1008) within `token_check_s` anyway, watching or not. What happens
on an accepted connection is connection.py's job.

`POST /engine/drain` (`switchboard drain`) takes the same tokens, a full one only, and
starts the engine's drain (engine/fleet/drain.py): 202 with the calls still in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from engine.bus.events import Event
from engine.config import Config
from engine.log import get_logger
from engine.supervision.auth import SupervisorTokens
from engine.supervision.backend import Actor, SupervisorBackend
from engine.supervision.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    REVOKED_REFUSAL,
    ConnectionLimits,
    ConsoleConnection,
)
from engine.supervision.token_store import NamedTokenStore
from engine.supervision.tokens import ConsoleTokens, TokenEntry

log = get_logger(__name__)

WS_PATH = "/console/ws"
DRAIN_PATH = "/engine/drain"  # POST, a full token: the engine drains (fleet/drain.py)
ACTOR_HEADER = "X-Switchboard-Actor"

_ACTOR_UNSAFE = re.compile(r"[^A-Za-z0-9._@+ -]")
_MAX_CURSOR_LENGTH = 64


class SupervisorApi:
    """The site consoles connect to: auth, limits, and one ConsoleConnection each."""

    def __init__(self, config: Config, backend: SupervisorBackend, *,
                 tokens: ConsoleTokens | None = None,
                 token_store: NamedTokenStore | None = None,
                 token_check_s: float = 1.0,
                 heartbeat_s: float = 20.0,
                 send_queue_frames: int = 10_000,
                 slow_console_s: float = 5.0,
                 max_pending_commands: int = 32,
                 max_consoles: int = 32,
                 max_message_bytes: int = 16 * 1024,
                 close_timeout_s: float = 5.0) -> None:
        """Without `tokens`, the console tokens and named tokens of the config's data dir;
        with them, the named tokens of `token_store` only (none without one)."""
        self._config = config
        self._backend = backend
        self._tokens = (SupervisorTokens.from_config(config) if tokens is None
                        else SupervisorTokens(tokens, token_store))
        self.token_check_s = token_check_s
        self.heartbeat_s = heartbeat_s
        self.max_consoles = max_consoles
        self.max_message_bytes = max_message_bytes
        self.close_timeout_s = close_timeout_s
        self._limits = ConnectionLimits(
            send_queue_frames=send_queue_frames, slow_console_s=slow_console_s,
            max_pending_commands=max_pending_commands, close_timeout_s=close_timeout_s,
            snapshot_transcript_lines=config.console_api.snapshot_transcript_lines)
        self._connections: set[ConsoleConnection] = set()
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self.drainer: Any = None  # the engine's Drainer, set by the engine at start

    # --- lifecycle ----------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_get(WS_PATH, self._handle)
        app.router.add_post(DRAIN_PATH, self._drain)

    async def start(self) -> None:
        """Listen on console_api.host:port (port 0: a free port, see `port`)."""
        if self._runner is not None:
            raise RuntimeError("supervisor API already started")
        host, port = self._config.console_api.host, self._config.console_api.port
        app = web.Application()
        self.routes(app)
        # Consoles are closed by stop() first, so cleanup has nothing left to wait for.
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            log.error("console_api.bind_failed", host=host, port=port, error=str(exc))
            raise
        self._runner = runner
        self._stopping = False
        self._watch = asyncio.create_task(self._watch_revocations(), name="console-tokens")
        if not _is_loopback(host):
            log.warning("console_api.not_local", host=host,
                        hint="plain ws: put TLS (a reverse proxy) or an SSH tunnel in front")
        log.info("console_api.listening", host=host, port=self.port, path=WS_PATH,
                 token_source=self._tokens.console.source,
                 readonly_token=self._tokens.console.readonly is not None,
                 named_tokens=self._tokens.named_count)

    async def stop(self) -> None:
        """Close every console (1001) and stop listening."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        connections = list(self._connections)
        for connection in connections:
            connection.shut_down(CLOSE_GOING_AWAY, "engine shutting down")
        if connections:
            await asyncio.gather(*(c.finished.wait() for c in connections))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def tokens(self) -> ConsoleTokens:
        """The console tokens (for an in-process console, e.g. the demo)."""
        return self._tokens.console

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("supervisor API is not listening")
        return int(self._runner.addresses[0][1])

    @property
    def host(self) -> str:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("supervisor API is not listening")
        return str(self._runner.addresses[0][0])

    @property
    def console_count(self) -> int:
        return len(self._connections)

    # --- accepting a console ----------------------------------------------------

    async def _authenticate(self, request: web.Request) -> TokenEntry | None:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            log.warning("console_api.auth_refused", reason="missing bearer token",
                        remote=request.remote)
            return None
        await self._tokens.refresh()
        entry = self._tokens.match(presented.strip())
        if entry is None:
            log.warning("console_api.auth_refused", reason="wrong token",
                        remote=request.remote)
        return entry

    async def _watch_revocations(self) -> None:
        """Close the consoles whose token was revoked (watching ones send no commands)."""
        while True:
            await asyncio.sleep(self.token_check_s)
            if not self._connections:
                continue
            try:
                await self._tokens.refresh()
            except Exception:  # keep watching: the next check may succeed
                log.exception("console_api.token_check_failed")
                continue
            for connection in list(self._connections):
                if not self._tokens.is_current(connection.token):
                    connection.shut_down(CLOSE_POLICY, REVOKED_REFUSAL)

    async def _drain(self, request: web.Request) -> web.Response:
        """`switchboard drain`: same bearer tokens as consoles; watchers may not."""
        token = await self._authenticate(request)
        if token is None:
            return web.Response(status=401, text="missing or wrong console token\n",
                                headers={"WWW-Authenticate": 'Bearer realm="switchboard"'})
        if token.role != "full":
            log.warning("console_api.drain_refused", actor=token.name, reason="read-only")
            return web.Response(status=403, text="a read-only token cannot drain\n")
        if self.drainer is None:
            return web.Response(status=503, text="engine not started\n")
        started = self.drainer.start(f"supervisor {token.name}")
        return web.json_response({**self.drainer.status(), "started": started},
                                 status=202)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = await self._authenticate(request)
        if token is None:
            return web.Response(status=401, text="missing or wrong console token\n",
                                headers={"WWW-Authenticate": 'Bearer realm="switchboard"'})
        if self._stopping:
            return web.Response(status=503, text="engine shutting down\n")
        if len(self._connections) >= self.max_consoles:
            log.warning("console_api.too_many_consoles", limit=self.max_consoles,
                        remote=request.remote)
            return web.Response(status=503, text="too many consoles connected\n")
        after = request.query.get("after")
        subscription: AsyncGenerator[tuple[str, Event], None] | None = None
        if after is not None:
            # Validated before the upgrade, so a bad cursor is a plain HTTP 400.
            try:
                if not after or len(after) > _MAX_CURSOR_LENGTH:
                    raise ValueError(f"invalid cursor {after[:_MAX_CURSOR_LENGTH]!r}")
                subscription = self._backend.bus.subscribe(after=after)
            except ValueError as exc:
                log.warning("console_api.bad_cursor", error=str(exc), remote=request.remote)
                return web.Response(status=400, text=f"{exc}\n")
        actor = Actor(token.name, token.role,
                      claimed=_sanitize_actor(request.headers.get(ACTOR_HEADER, "")))
        # compress=False: deflating thousands of small frames a second costs the engine
        # CPU that live calls need; the console link is local or tunnelled.
        ws = web.WebSocketResponse(heartbeat=self.heartbeat_s, compress=False,
                                   max_msg_size=self.max_message_bytes,
                                   timeout=self.close_timeout_s)
        try:
            await ws.prepare(request)
        except BaseException:
            if subscription is not None:
                await subscription.aclose()
            raise
        connection = ConsoleConnection(self._backend, ws, self._limits, token=token,
                                       tokens=self._tokens, actor=actor,
                                       remote=request.remote or "", after=after,
                                       subscription=subscription)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
        return ws


def _sanitize_actor(raw: str) -> str:
    """What the console claims to be, for the audit trail as a claim ("" if nothing)."""
    return _ACTOR_UNSAFE.sub("", raw)[:64].strip()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

