"""What the fleet benchmark (bench_fleet.py) runs beside the engines: a private Redis and
its INFO readings, a throwaway PostgreSQL database, the provider stand-ins, and stopping
processes. Not a benchmark itself."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from tests.postgres_server import with_database
from tests.redis_server import RedisServer, start_redis_server

if TYPE_CHECKING:
    from engine.sim.standins.server import StandinServer


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; nothing when it already exited."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# -- Redis ---------------------------------------------------------------------------------


@dataclass
class RedisReadings:
    """A private redis-server and what its INFO says."""

    server: RedisServer
    client: aioredis.Redis

    @classmethod
    async def start(cls) -> RedisReadings:
        server = await asyncio.to_thread(start_redis_server)
        if server is None:
            raise SystemExit("bench_fleet needs a redis-server binary on PATH")
        return cls(server, aioredis.from_url(server.url, decode_responses=True))

    @property
    def url(self) -> str:
        return self.server.url

    async def snapshot(self, postgres: Postgres | None = None) -> dict[str, Any]:
        """Command counts by command, network bytes both ways, Redis's CPU seconds (and
        the PostgreSQL database's transaction counters, when given)."""
        commands = await self.client.info("commandstats")
        stats = await self.client.info("stats")
        cpu = await self.client.info("cpu")
        memory = await self.client.info("memory")
        return {
            "commands": {name.removeprefix("cmdstat_"): int(v["calls"])
                         for name, v in commands.items()},
            "net_in": int(stats["total_net_input_bytes"]),
            "net_out": int(stats["total_net_output_bytes"]),
            "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            "used_memory": int(memory["used_memory"]),
            "postgres": await postgres.stats() if postgres is not None else None,
        }

    async def stop(self) -> None:
        await self.client.aclose()
        await asyncio.to_thread(self.server.cleanup)


# -- PostgreSQL ----------------------------------------------------------------------------


@dataclass
class Postgres:
    """A database of this run's own on the local server, dropped at the end."""

    server_dsn: str
    name: str

    @classmethod
    async def create(cls, server_dsn: str) -> Postgres:
        name = f"sb_bench_{uuid.uuid4().hex[:12]}"
        await _execute(server_dsn, f"CREATE DATABASE {name}")
        return cls(server_dsn, name)

    @property
    def dsn(self) -> str:
        return with_database(self.server_dsn, self.name)

    async def stats(self) -> dict[str, int]:
        """The database's transaction and row counters (the statistics system's view:
        flushed by each backend about once a second, so approximate over short spans)."""
        row = await _fetchrow(self.server_dsn, "SELECT xact_commit, tup_inserted, "
                              "tup_updated FROM pg_stat_database WHERE datname = $1", self.name)
        return {k: int(v) for k, v in dict(row or {}).items()}

    async def lost_calls(self) -> dict[str, Any]:
        """The calls the record holds as lost, and those still open."""
        rows = await _fetch(self.dsn, "SELECT call_sid, end_reason, ended_at FROM calls")
        return {"lost": sorted(r["call_sid"] for r in rows if r["end_reason"] == "lost"),
                "open": sorted(r["call_sid"] for r in rows if r["ended_at"] is None),
                "total": len(rows)}

    async def drop(self) -> None:
        await _execute(self.server_dsn, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


async def _execute(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _fetch(dsn: str, query: str, *params: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await conn.fetch(query, *params))
    finally:
        await conn.close()


async def _fetchrow(dsn: str, query: str, *params: Any) -> Any:
    rows = await _fetch(dsn, query, *params)
    return rows[0] if rows else None


# -- the provider stand-ins ------------------------------------------------------------------


async def start_standins(openai_key: str, elevenlabs_key: str, transcript: str,
                         reply: str) -> dict[str, StandinServer]:
    """STT, LLM and TTS stand-ins at bench_turns' default latencies, started."""
    from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
    from engine.sim.standins.openai_api import OpenAIStandin

    stt = OpenAIStandin(api_key=openai_key)
    stt.latency_s = 0.15
    stt.transcript = transcript
    llm = OpenAIStandin(api_key=openai_key)
    llm.latency_s = 0.3
    llm.token_interval_s = 0.02
    llm.reply = reply
    llm.cached_tokens = 0
    tts = ElevenLabsStandin(api_key=elevenlabs_key)
    tts.latency_s = 0.1
    tts.token_interval_s = 0.02
    tts.seconds_per_char = 0.04
    tts.stream_realtime_factor = 5.0
    servers: dict[str, StandinServer] = {"stt": stt, "llm": llm, "tts": tts}
    for server in servers.values():
        await server.start()
    return servers
