"""Read-only console source: events straight from the Redis Stream `{prefix}:events`.

Deprecated (`switchboard console --redis` says so): with `[fleet] enabled` and the Redis
bus, any engine's supervisor API serves every engine's calls, with a snapshot, budgets
and commands (engine/fleet/console_backend.py). Kept for watching a stream without one.
It replays what the stream retains to build the view, then follows it with
blocking XREAD, resuming from its last id after any Redis error. There is no snapshot
(budgets and cost caps are unknown until events carry them) and no commands.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from console.client import ConnectionChanged, SourceItem
from engine.bus.events import BusGap, EventDecodeError, decode_event
from engine.supervision.api_schema import CommandName, EventFrame, Hello, Reply

log = structlog.get_logger(__name__)


def _stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisEventSource:
    """Follows `{key_prefix}:events` from the oldest retained entry."""

    def __init__(self, url: str, key_prefix: str = "switchboard", *, block_ms: int = 1000,
                 batch: int = 1000, backoff_max_s: float = 5.0) -> None:
        self.url = url
        self.key = f"{key_prefix}:events"
        self._block_ms = block_ms
        self._batch = batch
        self._backoff_max_s = backoff_max_s
        self.last_id = "0"
        self._closed = False
        self._client: aioredis.Redis | None = None

    @property
    def readonly(self) -> bool:
        return True

    async def frames(self) -> AsyncIterator[SourceItem]:
        attempt = 0
        while not self._closed:
            yield ConnectionChanged("connecting" if attempt == 0 else "reconnecting")
            client = aioredis.Redis.from_url(
                self.url, socket_timeout=self._block_ms / 1000 + 5.0,
                socket_connect_timeout=5.0)
            self._client = client
            try:
                gap = await self._check_trimmed(client)
                # Every engine's events: the table shows which engine owns each call.
                yield Hello(engine_id="", readonly=True, fleet=True)
                yield ConnectionChanged("connected", f"redis {self.key}")
                attempt = 0
                if gap is not None:
                    yield gap
                while not self._closed:
                    reply: Any = await client.xread({self.key: self.last_id}, count=self._batch,
                                               block=self._block_ms)
                    for _stream, entries in reply or []:
                        for entry_id, fields in entries:
                            frame = self._frame(entry_id, fields)
                            if frame is not None:
                                yield frame
            except (RedisError, OSError) as exc:
                if self._closed:
                    break
                delay = min(self._backoff_max_s, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2)
                attempt += 1
                log.warning("console_redis_error", error=str(exc), retry_in_s=round(delay, 2))
                yield ConnectionChanged("reconnecting", str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
            finally:
                self._client = None
                await client.aclose()

    async def _check_trimmed(self, client: aioredis.Redis) -> EventFrame | None:
        """After a reconnect: were entries after our cursor trimmed away meanwhile?"""
        if self.last_id == "0":
            return None
        first: Any = await client.xrange(self.key, count=1)
        if first and _stream_id(first[0][0]) > _stream_id(self.last_id):
            # Without knowing what was lost, only a gap can be reported.
            gap = BusGap(missed_after=self.last_id, missed_until="", reason="trimmed")
            return EventFrame(id=self.last_id, event=gap)
        return None

    def _frame(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> EventFrame | None:
        self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        data = fields.get(b"data")
        if data is None:
            log.warning("console_redis_entry_without_data", entry_id=self.last_id)
            return None
        try:
            event = decode_event(data)
        except EventDecodeError as exc:
            log.warning("console_redis_bad_event", entry_id=self.last_id, error=str(exc))
            return None
        return EventFrame(id=self.last_id, event=event)

    async def send_command(self, command: CommandName, call_sid: str, *,
                           text: str | None = None, number: str | None = None) -> Reply:
        return Reply(id="", ok=False,
                     error="read-only: this console reads Redis; connect to an engine to act")

    async def close(self) -> None:
        self._closed = True
        client = self._client
        if client is not None:
            await client.aclose()
