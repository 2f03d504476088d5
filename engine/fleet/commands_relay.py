"""Supervisor commands on calls another engine owns: sent to the owner through Redis,
run there by its own `SupervisorCommands`, answered back to the engine that asked.

Keys (prefix `{redis.key_prefix}:fleet`, next to membership's, see redis_link.py):

    {prefix}:engine:<id>:commands       list: requests for engine <id> (LPUSH by askers,
                                        BRPOP by the owner); expires `request_ttl_s` after
                                        the last push, so a dead engine's queue goes
    {prefix}:reply:<request id>         list: the owner's one reply (LPUSH), expiring
    {prefix}:command:<actor>:<cmd id>   the command's record (SET NX): "pending", then its
                                        reply; kept `remember_s`

A request is JSON: the `Command` as the console sent it, the actor (token name, role,
claimed name: the owner audits under that name), the reply key and a deadline (unix s).
The owner starts nothing past the deadline, so an asker that gave up (timeout: the owner
died or is stuck) is never followed by a late effect. Every command of a fleet engine,
local or relayed, runs through `run_once`: the first to `SET NX` the command's record
runs and audits it; a retry with the same command id (the console resending after a
timeout, or through another engine) gets the first run's reply and is neither run nor
audited again. The actor's role is trusted as sent: Redis is the fleet's own, and the
asking engine already refused what a read-only token may not do.

Driving it from a script (bench/bench_fleet.py): attach a console client to any engine
(`console.client.SupervisorClient(url, token)`, `await client.send_command("say", sid,
text=...)`) — the engine routes it. Or, below the API, on an engine with the fleet on:

    relay = engine.fleet_console.relay            # a CommandRelay
    reply = await relay.send(owner_engine_id, Command(id=..., command="hang_up",
                                                      call_sid=sid), Actor("bench", "full"))
    owner = await relay.find_owner(sid)           # from the fleet's call hashes
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine.fleet.redis_link import REDIS_FAILURES, FleetKeys
from engine.log import get_logger
from engine.supervision.api_schema import COMMAND, Command, Reply
from engine.supervision.backend import Actor, CommandRunner
from engine.tasks import stop_task

log = get_logger(__name__)

_PENDING = "pending"
_POLL_S = 0.02  # a retry waiting for the first run's reply checks this often


def relay_client(url: str, op_timeout_s: float) -> aioredis.Redis:
    """No socket timeout of its own: blocking pops wait longer than one operation;
    every call here is bounded by asyncio.timeout instead."""
    client: aioredis.Redis = aioredis.from_url(
        url, socket_connect_timeout=op_timeout_s, client_name="switchboard-fleet-commands",
        decode_responses=True, retry=Retry(NoBackoff(), 1))
    return client


class CommandRelay:
    """Sends commands to their owner and serves the ones sent to this engine."""

    def __init__(self, client: aioredis.Redis, keys: FleetKeys, engine_id: str,
                 local: CommandRunner, *, reply_timeout_s: float = 4.0,
                 op_timeout_s: float = 1.0, remember_s: float = 600.0,
                 request_ttl_s: float = 60.0) -> None:
        self.client = client
        self.keys = keys
        self.engine_id = engine_id
        self.local = local
        self.reply_timeout_s = reply_timeout_s
        self.op_timeout_s = op_timeout_s
        self.remember_s = remember_s
        self.request_ttl_s = request_ttl_s
        self.served = 0  # requests from other engines answered
        self.repeated = 0  # retries answered with an earlier run's reply
        self._serving: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- keys ------------------------------------------------------------------------

    def queue_key(self, engine_id: str) -> str:
        return f"{self.keys.engine(engine_id)}:commands"

    def record_key(self, actor: Actor, command_id: str) -> str:
        return f"{self.keys.prefix}:command:{actor.name}:{command_id}"

    # -- asking ----------------------------------------------------------------------

    async def find_owner(self, call_sid: str) -> str | None:
        """The live engine whose call hash holds `call_sid` (None: no engine owns it)."""
        keys = self.keys
        try:
            async with asyncio.timeout(self.op_timeout_s):
                engines = [str(e) for e in await self.client.zrange(keys.engines, 0, -1)]
                if not engines:
                    return None
                pipe = self.client.pipeline(transaction=False)
                for engine_id in engines:
                    pipe.hexists(keys.calls(engine_id), call_sid)
                owned = await pipe.execute()
        except REDIS_FAILURES as exc:
            log.warning("fleet.owner_lookup_failed", call_sid=call_sid,
                        error=str(exc) or type(exc).__name__)
            return None
        return next((str(e) for e, has in zip(engines, owned, strict=True) if has), None)

    async def send(self, owner: str, command: Command, actor: Actor) -> Reply:
        """Run `command` on the engine `owner` and wait for its reply (time-limited)."""
        request_id = secrets.token_hex(8)
        reply_key = f"{self.keys.prefix}:reply:{request_id}"
        started = time.monotonic()
        request = json.dumps({
            "request": request_id, "from": self.engine_id, "reply_to": reply_key,
            "deadline": time.time() + self.reply_timeout_s,
            "actor": {"name": actor.name, "role": actor.role, "claimed": actor.claimed},
            "command": command.model_dump(mode="json", exclude_none=True)})
        queue = self.queue_key(owner)
        bound = log.bind(call_sid=command.call_sid, command=command.command,
                         command_id=command.id, owner=owner)
        try:
            async with asyncio.timeout(self.op_timeout_s):
                pipe = self.client.pipeline(transaction=False)
                pipe.exists(self.keys.engine(owner))
                pipe.lpush(queue, request)
                pipe.pexpire(queue, int(self.request_ttl_s * 1000))
                alive, _, _ = await pipe.execute()
            if not alive:
                bound.warning("fleet.command_owner_gone")
                return self._failed(command, owner, f"engine {owner} that owns the call "
                                    "is gone from the fleet (stopped or dead)")
            remaining = self.reply_timeout_s - (time.monotonic() - started)
            async with asyncio.timeout(remaining + self.op_timeout_s):
                popped = await self.client.blpop([reply_key], timeout=max(0.01, remaining))
        except TimeoutError:
            popped = None
        except REDIS_FAILURES as exc:
            bound.warning("fleet.command_redis_failed", error=str(exc) or type(exc).__name__)
            return self._failed(command, owner, f"Redis unreachable, the command did not "
                                f"reach engine {owner}: {exc}")
        if popped is None:
            bound.warning("fleet.command_timeout", timeout_s=self.reply_timeout_s)
            return self._failed(command, owner, f"no reply from engine {owner} within "
                                f"{self.reply_timeout_s:g} s (it may have stopped); the "
                                "command did not run unless a retry says otherwise")
        try:
            reply = Reply.model_validate_json(popped[1])
        except ValidationError:
            bound.warning("fleet.command_bad_reply")
            return self._failed(command, owner, f"unreadable reply from engine {owner}")
        bound.debug("fleet.command_relayed", ok=reply.ok,
                    ms=round((time.monotonic() - started) * 1000, 1))
        return reply.model_copy(update={"id": command.id})

    def _failed(self, command: Command, owner: str, error: str) -> Reply:
        return Reply(id=command.id, ok=False, error=error, engine_id=owner)

    # -- running once ----------------------------------------------------------------

    async def run_once(self, command: Command, actor: Actor) -> Reply:
        """Run and audit a command on a call of this engine, unless a command with the
        same id (and actor) already ran: then that run's reply."""
        key = self.record_key(actor, command.id)
        try:
            async with asyncio.timeout(self.op_timeout_s):
                first = await self.client.set(key, _PENDING, nx=True,
                                              ex=max(1, int(self.remember_s)))
        except REDIS_FAILURES as exc:
            # The call is here and its supervisor waits: run it, unguarded.
            log.warning("fleet.command_record_failed", call_sid=command.call_sid,
                        command_id=command.id, error=str(exc) or type(exc).__name__)
            first = True
        if not first:
            return await self._earlier_reply(key, command)
        reply = await self.local.execute(command, actor)
        reply = reply.model_copy(update={"id": command.id, "engine_id": self.engine_id})
        with contextlib.suppress(*REDIS_FAILURES):
            async with asyncio.timeout(self.op_timeout_s):
                await self.client.set(key, reply.model_dump_json(),
                                      ex=max(1, int(self.remember_s)))
        return reply

    async def _earlier_reply(self, key: str, command: Command) -> Reply:
        self.repeated += 1
        deadline = time.monotonic() + self.reply_timeout_s
        while True:
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    stored = await self.client.get(key)
            except REDIS_FAILURES:
                stored = _PENDING
            if stored is not None and stored != _PENDING:
                log.info("fleet.command_repeated", call_sid=command.call_sid,
                         command=command.command, command_id=command.id)
                with contextlib.suppress(ValidationError):
                    return Reply.model_validate_json(stored).model_copy(
                        update={"id": command.id})
            if time.monotonic() >= deadline:
                return Reply(id=command.id, ok=False, engine_id=self.engine_id,
                             error=f"command {command.id} was sent twice and its first "
                                   "run has not finished")
            await asyncio.sleep(_POLL_S)

    # -- serving ---------------------------------------------------------------------

    def start(self) -> None:
        self._serving = asyncio.get_running_loop().create_task(self._serve(),
                                                               name="fleet-commands")

    async def stop_serving(self) -> None:
        """Take no more requests (what is queued stays for `start` or expires)."""
        serving, self._serving = self._serving, None
        await stop_task(serving)

    async def stop(self) -> None:
        await self.stop_serving()
        await asyncio.gather(*(stop_task(task) for task in list(self._tasks)))
        with contextlib.suppress(Exception):  # closing a dead connection may complain
            await self.client.aclose()

    async def _serve(self, block_s: float = 1.0) -> None:
        queue = self.queue_key(self.engine_id)
        failing = False
        while True:
            try:
                async with asyncio.timeout(block_s + self.op_timeout_s):
                    popped = await self.client.brpop([queue], timeout=block_s)
            except REDIS_FAILURES as exc:  # TimeoutError included
                if not failing:
                    failing = True
                    log.warning("fleet.commands_unreachable",
                                error=str(exc) or type(exc).__name__)
                await asyncio.sleep(block_s)
                continue
            if failing:
                failing = False
                log.info("fleet.commands_back")
            if popped is not None:
                task = asyncio.get_running_loop().create_task(self._answer(str(popped[1])))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, raw: str) -> None:
        """Run one request from another engine and push its reply."""
        try:
            request: dict[str, Any] = json.loads(raw)
            reply_to = str(request["reply_to"])
            command = COMMAND.validate_python(request["command"])
            who = request["actor"]
            actor = Actor(str(who["name"]), who["role"], claimed=str(who.get("claimed", "")))
            deadline = float(request["deadline"])
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            log.warning("fleet.bad_command_request", error=str(exc)[:200])
            return
        if time.time() > deadline:
            log.warning("fleet.command_expired", call_sid=command.call_sid,
                        command=command.command, command_id=command.id,
                        asker=request.get("from"))
            return  # the asker has already answered its console: too late to act
        reply = await self.run_once(command, actor)
        self.served += 1
        await self._push_reply(reply_to, reply)

    async def _push_reply(self, reply_to: str, reply: Reply) -> None:
        try:
            async with asyncio.timeout(self.op_timeout_s):
                pipe = self.client.pipeline(transaction=False)
                pipe.lpush(reply_to, reply.model_dump_json())
                pipe.pexpire(reply_to, int(self.request_ttl_s * 1000))
                await pipe.execute()
        except REDIS_FAILURES as exc:
            log.warning("fleet.command_reply_failed", command_id=reply.id,
                        error=str(exc) or type(exc).__name__)


class FleetCommands:
    """The supervisor API's command runner on a fleet engine: a call of this engine runs
    here, a call another engine owns is sent to it; either way once per command id."""

    def __init__(self, relay: CommandRelay, local: CommandRunner,
                 is_local: Callable[[str], bool],
                 known_owner: Callable[[str], str | None]) -> None:
        self.relay = relay
        self._local = local
        self._is_local = is_local
        self._known_owner = known_owner  # from the fleet view (no Redis round trip)

    async def execute(self, command: Command, actor: Actor) -> Reply:
        sid = command.call_sid
        if not self._is_local(sid):
            owner = self._known_owner(sid) or await self.relay.find_owner(sid)
            if owner and owner != self.relay.engine_id:
                return await self.relay.send(owner, command, actor)
        return await self.relay.run_once(command, actor)  # ours, or nobody's

    def refuse(self, command: Command, actor: Actor, error: str) -> Reply:
        return self._local.refuse(command, actor, error)
