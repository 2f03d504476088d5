"""Spend totals shared by a fleet through a real redis-server: two engines reach one budget
together, day rollover, key expiry, a Redis outage (conservative local counting, then
exactly-once flush), a lost flush reply; and the backend choice from the config."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from engine.config import BudgetConfig, Config, ConfigError
from engine.money.budget import Budget, BudgetChange
from engine.money.spend_totals import (
    LocalSpendTotals,
    Period,
    RedisSpendTotals,
    make_spend_totals,
    to_micro,
)
from tests.redis_server import RedisServer
from tests.test_budget import Clock


def today_noon() -> datetime:
    # Redis tests run on today's real date: keys expire at their period's end + 2 days,
    # and a key whose expiry is already past is deleted at once.
    now = datetime.now(UTC)
    return now.replace(hour=12, minute=0, second=0, microsecond=0)


class Engine:
    """One engine's budget over the shared totals, recording the changes it reports."""

    def __init__(self, url: str, prefix: str, name: str, clock: Clock,
                 budget: BudgetConfig, refresh_s: float = 5.0) -> None:
        self.totals = RedisSpendTotals(url, prefix, name, offline_share=budget.offline_share,
                                       refresh_s=refresh_s, op_timeout_s=0.5, clock=clock)
        self.changes: list[BudgetChange] = []
        self.budget = Budget(budget, self.totals, clock=clock, on_change=self.changes.append)

    @property
    def states(self) -> list[str]:
        return [c.new for c in self.changes]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def fleet_total(client: aioredis.Redis, prefix: str, period: Period) -> int:
    raw = await client.hget(f"{prefix}:budget:{period.kind}:{period.name}", "total")
    return int(raw or 0)


EngineFactory = Callable[..., Engine]


@pytest.fixture
async def engines() -> AsyncIterator[EngineFactory]:
    """Makes engines (url, prefix, name, clock, budget, refresh_s) and closes them after."""
    made: list[Engine] = []

    def make(url: str, prefix: str, name: str, clock: Clock,
             budget: BudgetConfig | None = None, refresh_s: float = 5.0) -> Engine:
        made.append(Engine(url, prefix, name, clock, budget or BudgetConfig(), refresh_s))
        return made[-1]

    yield make
    for engine in made:
        await engine.totals.aclose()


@pytest.fixture
async def raw_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


class LossyProxy:
    """A TCP proxy in front of Redis that can lose one reply: the next script call passes
    through and runs, then the connection closes before its reply gets back."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.lose_next_script_reply = False
        self.lost = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        """Listen; returns the URL to reach Redis through this proxy."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers |= {writer, up_writer}
        losing = asyncio.Event()

        async def to_redis() -> None:
            while data := await reader.read(65536):
                if self.lose_next_script_reply and b"EVALSHA" in data:
                    self.lose_next_script_reply = False
                    losing.set()
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if losing.is_set():
                    self.lost += 1
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(to_redis()), asyncio.create_task(to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)

    async def aclose(self) -> None:
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def lossy_proxy(redis_url: str) -> AsyncIterator[tuple[LossyProxy, str]]:
    """The proxy in front of the test Redis, and the URL through it."""
    target = urlsplit(redis_url)
    proxy = LossyProxy(target.hostname or "127.0.0.1", target.port or 6379)
    url = await proxy.start()
    yield proxy, url
    await proxy.aclose()


def new_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_micro_dollars_round_half_up() -> None:
    assert to_micro(Decimal("0.0000005")) == 1
    assert to_micro(Decimal("0.00000049")) == 0
    assert to_micro(Decimal("0.0002037")) == 204
    assert to_micro(Decimal("12.3456785")) == 12_345_679


@pytest.mark.redis
async def test_two_engines_reach_one_budget_together(
        redis_url: str, raw_client: aioredis.Redis, engines: EngineFactory) -> None:
    prefix, clock = new_prefix(), Clock(today_noon())
    config = BudgetConfig(daily_usd=1.0, monthly_usd=100.0)
    a = engines(redis_url, prefix, "engine-a", clock, config, refresh_s=0.05)
    b = engines(redis_url, prefix, "engine-b", clock, config, refresh_s=0.05)
    await a.totals.start()
    await b.totals.start()
    a.budget.record(Decimal("0.45"))
    # B sees A's spend without booking anything (its background read).
    await wait_until(lambda: b.budget.reading().daily.spent_usd == Decimal("0.45"))
    # B's own booking counts at once, before its round trip: 0.85 is a warning.
    assert b.budget.record(Decimal("0.4")) == "warning"
    await wait_until(lambda: a.states == ["warning"])
    # A books the rest: together they reach the daily budget, and both act on it.
    assert a.budget.record(Decimal("0.15")) == "degraded"
    await wait_until(lambda: b.states == ["warning", "degraded"])
    assert a.states == ["warning", "degraded"]
    for engine in (a, b):
        last = engine.changes[-1]
        assert (last.limit, last.spent_usd, last.limit_usd, last.totals) \
            == ("daily", 1.0, 1.0, "shared")
    day = clock.now.date()
    assert await fleet_total(raw_client, prefix, Period.day_of(day)) == 1_000_000
    assert await fleet_total(raw_client, prefix, Period.month_of(day)) == 1_000_000
    fields = await raw_client.hgetall(f"{prefix}:budget:day:{day}")
    runs = {str(k, "utf-8") if isinstance(k, bytes) else k: int(v)
            for k, v in fields.items() if k != b"total"}
    assert sorted(runs.values()) == [400_000, 600_000]
    assert {run.split(":")[0] for run in runs} == {"engine-a", "engine-b"}


@pytest.mark.redis
async def test_day_rollover_lifts_the_shared_daily_limit(
        redis_url: str, raw_client: aioredis.Redis, engines: EngineFactory) -> None:
    prefix = new_prefix()
    clock = Clock(today_noon().replace(hour=23, minute=59, second=59))
    config = BudgetConfig(daily_usd=1.0, monthly_usd=100.0)
    a = engines(redis_url, prefix, "engine-a", clock, config)
    today = clock.now.date()
    assert a.budget.record(Decimal("1.0")) == "degraded"
    assert await a.totals.sync()
    clock.now += timedelta(seconds=2)  # 00:00:01 UTC: no booking needed
    assert a.budget.state() == "ok"
    assert (a.changes[-1].old, a.changes[-1].period) \
        == ("degraded", clock.now.date().isoformat())
    a.budget.record(Decimal("0.3"))
    assert await a.totals.sync()
    tomorrow = clock.now.date()
    assert await fleet_total(raw_client, prefix, Period.day_of(today)) == 1_000_000
    assert await fleet_total(raw_client, prefix, Period.day_of(tomorrow)) == 300_000
    months = {Period.month_of(today), Period.month_of(tomorrow)}
    assert sum([await fleet_total(raw_client, prefix, m) for m in months]) == 1_300_000
    # Another engine starting now reads the new day's fleet total.
    b = engines(redis_url, prefix, "engine-b", clock, config)
    assert await b.totals.sync()
    assert b.budget.reading().daily.spent_usd == Decimal("0.3")


@pytest.mark.redis
async def test_keys_expire_after_their_period(
        redis_url: str, raw_client: aioredis.Redis, engines: EngineFactory) -> None:
    prefix, clock = new_prefix(), Clock(today_noon())
    a = engines(redis_url, prefix, "engine-a", clock)
    a.budget.record(Decimal("0.01"))
    assert await a.totals.sync()
    day = clock.now.date()
    for period in (Period.day_of(day), Period.month_of(day)):
        key = f"{prefix}:budget:{period.kind}:{period.name}"
        expected = int((period.end + timedelta(days=2)).timestamp())
        assert await raw_client.expiretime(key) == expected


@pytest.mark.redis
async def test_outage_counts_locally_conservatively_then_flushes_exactly_once(
        redis_server: RedisServer, engines: EngineFactory) -> None:
    prefix, clock = new_prefix(), Clock(today_noon())
    config = BudgetConfig(daily_usd=1.0, monthly_usd=100.0, offline_share=0.5)
    a = engines(redis_server.url, prefix, "engine-a", clock, config)
    b = engines(redis_server.url, prefix, "engine-b", clock, config)
    booked = Decimal(0)

    def book(engine: Engine, usd: str) -> str:
        nonlocal booked
        booked += Decimal(usd)
        return engine.budget.record(Decimal(usd))

    book(a, "0.2")
    book(b, "0.1")
    for engine in (a, b, a):
        assert await engine.totals.sync()
    assert a.budget.reading().daily.spent_usd == Decimal("0.3")
    redis_server.stop()
    with capture_logs() as logs:
        book(a, "0.1")
        assert not await a.totals.sync()
        assert a.totals.mode == "offline"
        # A's own spend since the last fleet total counts double (offline_share 0.5):
        # 0.3 + 0.1 / 0.5 = 0.5.
        assert a.budget.reading().daily.spent_usd == Decimal("0.5")
        assert book(a, "0.1") == "ok"  # 0.7
        assert book(a, "0.05") == "warning"  # 0.8 (the plain sum 0.55 would be ok)
        assert not await a.totals.sync()  # still down: not logged again
        book(b, "0.2")
        assert not await b.totals.sync()
        assert book(a, "0.1") == "degraded"  # 1.0; the fleet really spent 0.85
        assert a.changes[-1].totals == "offline"
        redis_server.start()  # same port; no persistence: it comes back empty
        for engine in (a, b, a):
            await wait_until_synced(engine.totals)
    events = [(e["event"], e["run_id"].split(":")[0]) for e in logs
              if e["event"].startswith("budget.redis")]
    assert sorted(events) == [("budget.redis_reachable", "engine-a"),
                              ("budget.redis_reachable", "engine-b"),
                              ("budget.redis_unreachable", "engine-a"),
                              ("budget.redis_unreachable", "engine-b")]
    # Each engine put back its whole spend: Redis holds every booking, once.
    async with aioredis.from_url(redis_server.url) as client:
        day = clock.now.date()
        assert await fleet_total(client, prefix, Period.day_of(day)) \
            == to_micro(booked) == 850_000
        for engine in (a, b):  # retried flushes add nothing
            assert await engine.totals.sync()
        assert await fleet_total(client, prefix, Period.month_of(day)) == 850_000
    assert a.budget.state() == "warning"  # the real fleet total, 0.85
    # A's first reply after the restart held only A's spend (B had not put its own
    # back yet): ok for a moment, then the fleet's 0.85.
    assert a.states == ["warning", "degraded", "ok", "warning"]
    assert a.changes[-1].totals == "shared"


async def wait_until_synced(totals: RedisSpendTotals, timeout_s: float = 5.0) -> None:
    # A connection broken by the restart may fail one more round trip; retrying is safe.
    deadline = time.monotonic() + timeout_s
    while not await totals.sync():
        assert time.monotonic() < deadline, "Redis did not come back"
        await asyncio.sleep(0.05)


@pytest.mark.redis
async def test_a_lost_flush_reply_is_not_counted_twice(
        lossy_proxy: tuple[LossyProxy, str], raw_client: aioredis.Redis,
        engines: EngineFactory) -> None:
    proxy, url = lossy_proxy
    prefix, clock = new_prefix(), Clock(today_noon())
    a = engines(url, prefix, "engine-a", clock)
    day = Period.day_of(clock.now.date())
    a.budget.record(Decimal("0.25"))
    assert await a.totals.sync()  # the script is loaded now, so the next call runs it
    a.budget.record(Decimal("0.125"))
    proxy.lose_next_script_reply = True
    assert not await a.totals.sync()  # no reply: the engine cannot tell it ran
    assert proxy.lost == 1
    assert await fleet_total(raw_client, prefix, day) == 375_000  # ... but it ran
    assert a.totals.mode == "offline"
    a.budget.record(Decimal("0.001"))
    assert await a.totals.sync()  # the retry carries the lost flush again
    assert await fleet_total(raw_client, prefix, day) == 376_000
    assert await a.totals.sync()  # and once more, with nothing new
    assert await fleet_total(raw_client, prefix, day) == 376_000
    assert a.budget.reading().daily.spent_usd == Decimal("0.376")


@pytest.mark.redis
async def test_totals_lost_by_redis_are_put_back(
        redis_url: str, raw_client: aioredis.Redis, engines: EngineFactory) -> None:
    prefix, clock = new_prefix(), Clock(today_noon())
    a = engines(redis_url, prefix, "engine-a", clock)
    a.budget.record(Decimal("0.7"))
    assert await a.totals.sync()
    await raw_client.delete(*[key async for key in raw_client.scan_iter(f"{prefix}:*")])
    assert await a.totals.sync()  # nothing new booked: the run's total is re-asserted
    assert await fleet_total(raw_client, prefix, Period.day_of(clock.now.date())) \
        == 700_000


@pytest.mark.redis
async def test_history_is_a_floor_until_redis_knows_more(
        redis_url: str, engines: EngineFactory) -> None:
    prefix, clock = new_prefix(), Clock(today_noon())
    a = engines(redis_url, prefix, "engine-a", clock, BudgetConfig(daily_usd=1.0))
    a.totals.seed({clock.now.date(): 0.85})  # this engine's history, before this run
    assert await a.totals.sync()  # Redis has nothing for today (it lost it, or is new)
    assert a.budget.state() == "warning"
    b = engines(redis_url, prefix, "engine-b", clock, BudgetConfig(daily_usd=1.0))
    b.budget.record(Decimal("0.9"))
    assert await b.totals.sync()
    assert await a.totals.sync()  # now the fleet's total is the higher figure
    assert a.budget.state() == "warning"
    assert a.budget.reading().daily.spent_usd == Decimal("0.9")


async def test_unreachable_at_start_is_logged_once_and_estimated_conservatively(
        engines: EngineFactory) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    a = engines(f"redis://127.0.0.1:{port}/0", new_prefix(), "engine-a",
                Clock(today_noon()), BudgetConfig(daily_usd=1.0, offline_share=0.25),
                refresh_s=0.02)
    with capture_logs() as logs:
        await a.totals.start()  # never raises: the engine starts and counts locally
        assert a.totals.mode == "offline"
        # Booking is synchronous: it never waits on Redis. 0.2 / 0.25 = 0.8.
        assert a.budget.record(Decimal("0.2")) == "warning"
        await asyncio.sleep(0.1)  # several background retries
        await a.totals.aclose()
    assert [e["event"] for e in logs if e["event"].startswith("budget.redis")] \
        == ["budget.redis_unreachable"]


def test_backend_follows_the_config() -> None:
    assert isinstance(make_spend_totals(Config(), "e"), LocalSpendTotals)
    redis = {"url": "redis://127.0.0.1:1/0", "key_prefix": "p"}
    assert isinstance(make_spend_totals(Config.model_validate({"redis": redis}), "e"),
                      RedisSpendTotals)
    local = Config.model_validate({"redis": redis, "budget": {"shared": False}})
    assert isinstance(make_spend_totals(local, "e"), LocalSpendTotals)
    broken = Config.model_validate({"redis": {"url": "http://nowhere"}})
    with pytest.raises(ConfigError, match=r"redis\.url"):
        make_spend_totals(broken, "e")


def test_each_run_counts_apart() -> None:
    # A restarted engine with the same (stable) id must not overwrite its previous run.
    first = RedisSpendTotals("redis://127.0.0.1:1/0", "p", "host:8080")
    second = RedisSpendTotals("redis://127.0.0.1:1/0", "p", "host:8080")
    assert first.run_id != second.run_id
    assert first.run_id.startswith("host:8080:")
