"""Spend per UTC day and month, the figures the budget (money/budget.py) is checked against.

Two backends behind `SpendTotals`:
- `LocalSpendTotals`: this engine's spend, in memory (exact Decimals), seeded at start
  from the history's daily costs.
- `RedisSpendTotals`: the fleet's spend. Every engine adds its own and reads the fleet's
  total back in the same round trip. Bookings never wait on Redis: `add` only counts
  locally and wakes a background task, and the totals read synchronously are the last
  fleet totals Redis reported plus what this engine booked since.

Redis layout: one hash per period, `{key_prefix}:budget:day:2026-11-24` and
`{key_prefix}:budget:month:2026-11`, amounts in integer micro-dollars (µ$): field `total`
is the fleet's total (HINCRBY), and one field per engine run holds that run's cumulative
spend in the period as far as the total counts it. One key per period, so the total and
the runs that make it expire (or are evicted) together: `_EXPIRY_MARGIN` after the
period ends (late flushes still land; nothing outlives its use by more). Amounts are
rounded half up to whole µ$ at booking.

Exactly once: a flush sends this run's *cumulative* spend per period, and a Lua script
adds to the total only the difference from what the run's field says was counted (then
stores the new cumulative), atomically. A flush whose reply was lost, retried, or sent
twice adds nothing the second time; the run's field is the flush's idempotency check.
Unlike one SET NX key per flush, this costs one field per engine run, not a key per
round trip, and a Redis that lost its data (restart without persistence) gets each
running engine's whole contribution back at that engine's next flush.

Redis unreachable: the engine goes on counting, logs it once (and once when Redis
answers again), retries every `refresh_s`, and enforces a conservative estimate: it
counts its own spend since the last fleet total it saw as `offline_share` of the
fleet's, i.e. fleet = last known total + own unflushed spend / offline_share. With
offline_share <= 1/N for N engines, each stops at its slice of what was left, so the
fleet cannot pass a limit however the others spend meanwhile. (Spend other engines
booked in the last `refresh_s` before the outage was not seen; that lag exists online.)
Until Redis first answers, the estimate is this offline one. The history's daily costs
(`seed`) are a floor for the fleet totals, never added to them: Redis already holds what
this engine's earlier runs flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine.config import Config, ConfigError
from engine.log import get_logger
from engine.money.prices import ZERO, dec, utc_now
from engine.tasks import stop_task

log = get_logger(__name__)

MICRO = Decimal(1_000_000)
TotalsMode = Literal["local", "shared", "offline"]

# A period's keys outlive the period by this much.
_EXPIRY_MARGIN = timedelta(days=2)


def to_micro(usd: Decimal) -> int:
    """Dollars as whole micro-dollars, rounded half up. A sum of per-booking rounded
    amounts can differ from the ledger's exact sum by at most 0.5 µ$ per booking."""
    return int((usd * MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class Period:
    """A UTC day or month: what a total counts over."""

    kind: Literal["day", "month"]
    start: date

    @classmethod
    def day_of(cls, day: date) -> Period:
        return cls("day", day)

    @classmethod
    def month_of(cls, day: date) -> Period:
        return cls("month", day.replace(day=1))

    @property
    def name(self) -> str:
        """"2026-11-24" for a day, "2026-11" for a month."""
        return self.start.isoformat() if self.kind == "day" else self.start.strftime("%Y-%m")

    @property
    def end(self) -> datetime:
        """The first instant after the period."""
        if self.kind == "day":
            nxt = self.start + timedelta(days=1)
        else:
            nxt = (self.start.replace(day=28) + timedelta(days=4)).replace(day=1)
        return datetime(nxt.year, nxt.month, nxt.day, tzinfo=UTC)


class SpendTotals(Protocol):
    """Spend per UTC day and month. Reads and `add` are synchronous and never wait."""

    # Called when the totals moved without an `add` here (the fleet's, read from Redis,
    # or this engine going offline or back online).
    on_update: Callable[[], None] | None

    @property
    def mode(self) -> TotalsMode: ...

    def add(self, amount: Decimal, at: datetime) -> None: ...

    def total(self, period: Period) -> Decimal: ...

    def seed(self, days: Mapping[date, float | Decimal]) -> None:
        """Spend per day known at start (the history's `daily_costs`)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


def _as_decimal(value: float | Decimal) -> Decimal:
    return value if isinstance(value, Decimal) else dec(value)


def _countable(amount: Decimal) -> bool:
    if amount < 0:  # costs are never negative; a refund here would be an adapter bug
        log.warning("budget.negative_amount_ignored", amount_usd=str(amount))
        return False
    return amount > 0


class LocalSpendTotals:
    """This engine's spend, in memory. Days older than `_KEEP_DAYS` are forgotten."""

    _KEEP_DAYS = 62  # the month-to-date never needs more

    def __init__(self) -> None:
        self.on_update: Callable[[], None] | None = None
        self._totals: dict[Period, Decimal] = {}
        self._pruned_on: date | None = None

    @property
    def mode(self) -> TotalsMode:
        return "local"

    def add(self, amount: Decimal, at: datetime) -> None:
        if not _countable(amount):
            return
        day = at.astimezone(UTC).date()
        for period in (Period.day_of(day), Period.month_of(day)):
            self._totals[period] = self._totals.get(period, ZERO) + amount
        self._prune(day)

    def total(self, period: Period) -> Decimal:
        return self._totals.get(period, ZERO)

    def seed(self, days: Mapping[date, float | Decimal]) -> None:
        """Replaces the totals of the days given (and their months' by the difference)."""
        for day, value in days.items():
            amount = _as_decimal(value)
            old = self._totals.get(Period.day_of(day), ZERO)
            self._totals[Period.day_of(day)] = amount
            month = Period.month_of(day)
            self._totals[month] = self._totals.get(month, ZERO) + amount - old

    def _prune(self, today: date) -> None:
        if self._pruned_on == today:  # once a day is enough
            return
        self._pruned_on = today
        oldest = today - timedelta(days=self._KEEP_DAYS)
        for period in [p for p in self._totals if p.start < oldest]:
            del self._totals[period]

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# KEYS: one hash per period; ARGV[1]: this run's id, then per key this run's cumulative
# µ$ in the period and the key's expiry (unix s). Returns the fleet totals, in order.
_FLUSH_SCRIPT = """
local run = ARGV[1]
local totals = {}
for i, key in ipairs(KEYS) do
  local target = tonumber(ARGV[2 * i])
  local counted = tonumber(redis.call('HGET', key, run) or '0')
  if target > counted then
    totals[i] = redis.call('HINCRBY', key, 'total', target - counted)
    redis.call('HSET', key, run, target)
    redis.call('EXPIREAT', key, ARGV[2 * i + 1])
  else
    totals[i] = tonumber(redis.call('HGET', key, 'total') or '0')
  end
end
return totals
"""


class RedisSpendTotals:
    """The fleet's spend, shared through Redis (see the module docstring).

    `engine_id` names this engine in the period hashes; a random suffix makes every process
    run count apart, so a restarted engine never overwrites its previous run's spend.
    """

    def __init__(self, url: str, key_prefix: str, engine_id: str, *,
                 offline_share: float = 0.5, refresh_s: float = 5.0,
                 op_timeout_s: float = 1.0, clock: Callable[[], datetime] = utc_now,
                 client: aioredis.Redis | None = None) -> None:
        if not 0 < offline_share <= 1:
            raise ValueError(f"offline_share must be in (0, 1], got {offline_share}")
        self.on_update: Callable[[], None] | None = None
        self.run_id = f"{engine_id}:{secrets.token_hex(4)}"
        self._prefix = f"{key_prefix}:budget"
        self._offline_share = dec(offline_share)
        self._refresh_s = refresh_s
        self._op_timeout_s = op_timeout_s
        self._clock = clock
        self._owns_client = client is None
        # The background task retries on its own schedule: no client-side retries.
        self._client: aioredis.Redis = client or aioredis.from_url(
            url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=30,
            client_name=f"{key_prefix}-budget")
        self._script = self._client.register_script(_FLUSH_SCRIPT)
        self._booked: dict[Period, int] = {}  # this run's cumulative µ$
        self._counted: dict[Period, int] = {}  # ... of which Redis confirmed counting
        self._fleet: dict[Period, int] = {}  # the fleet total Redis last reported
        self._floor: dict[Period, int] = {}  # known at start from the history
        self._reachable = False  # until the first reply the fleet's total is unknown
        self._outage_logged = False
        self._lock = asyncio.Lock()  # one flush in flight: replies apply in order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def mode(self) -> TotalsMode:
        return "shared" if self._reachable else "offline"

    def add(self, amount: Decimal, at: datetime) -> None:
        if not _countable(amount):
            return
        micro = to_micro(amount)
        day = at.astimezone(UTC).date()
        for period in (Period.day_of(day), Period.month_of(day)):
            self._booked[period] = self._booked.get(period, 0) + micro
        self._wake.set()

    def total(self, period: Period) -> Decimal:
        known = max(self._fleet.get(period, 0), self._floor.get(period, 0))
        unflushed = self._booked.get(period, 0) - self._counted.get(period, 0)
        if self._reachable:
            return Decimal(known + unflushed) / MICRO
        return (Decimal(known) + Decimal(unflushed) / self._offline_share) / MICRO

    def seed(self, days: Mapping[date, float | Decimal]) -> None:
        """A floor for the fleet totals: what the history shows was spent (by this engine
        at least). Redis's totals replace it once they are higher."""
        for day, value in days.items():
            micro = to_micro(_as_decimal(value))
            old = self._floor.get(Period.day_of(day), 0)
            self._floor[Period.day_of(day)] = micro
            month = Period.month_of(day)
            self._floor[month] = self._floor.get(month, 0) + micro - old

    # --- the background flush ---------------------------------------------------------

    async def start(self) -> None:
        """Read the fleet totals once (an unreachable Redis is logged, not raised), then
        keep flushing in the background."""
        await self.sync()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="budget-totals")

    async def _run(self) -> None:
        while True:
            if self._reachable:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._refresh_s):
                        await self._wake.wait()
            else:  # a dead Redis is retried at this pace, not once per booking
                await asyncio.sleep(self._refresh_s)
            self._wake.clear()
            await self.sync()

    async def sync(self) -> bool:
        """One round trip now: add what this run booked since the last one and read the
        fleet totals back. False when Redis could not be reached."""
        async with self._lock:
            today = self._clock().astimezone(UTC).date()
            current = [Period.day_of(today), Period.month_of(today)]
            # Past periods go along until Redis has counted all this run booked in them.
            periods = current + [p for p, micro in self._booked.items()
                                 if p not in current and micro != self._counted.get(p, 0)]
            targets = [self._booked.get(p, 0) for p in periods]
            keys = [f"{self._prefix}:{p.kind}:{p.name}" for p in periods]
            args: list[str | int] = [self.run_id]
            for period, target in zip(periods, targets, strict=True):
                args += [target, int((period.end + _EXPIRY_MARGIN).timestamp())]
            try:
                async with asyncio.timeout(self._op_timeout_s):
                    totals = await self._script(keys=keys, args=args)
            except Exception as exc:  # any Redis trouble: count locally, never fail a call
                self._unreachable(exc)
                return False
            self._reached(current, periods, targets, [int(t) for t in totals])
            return True

    def _reached(self, current: list[Period], periods: list[Period], targets: list[int],
                 totals: list[int]) -> None:
        for period, target, total in zip(periods, targets, totals, strict=True):
            self._counted[period] = max(self._counted.get(period, 0), target)
            self._fleet[period] = total
        # Past periods fully counted in Redis are no longer needed here.
        for period in [p for p in self._fleet if p not in current
                       and self._booked.get(p, 0) == self._counted.get(p, 0)]:
            for table in (self._booked, self._counted, self._fleet):
                table.pop(period, None)
        if self._outage_logged:
            log.info("budget.redis_reachable", run_id=self.run_id,
                     fleet_today_usd=str(Decimal(totals[0]) / MICRO))
            self._outage_logged = False
        self._reachable = True
        self._notify()

    def _unreachable(self, exc: Exception) -> None:
        if not self._outage_logged:
            log.warning("budget.redis_unreachable", run_id=self.run_id,
                        error=str(exc) or type(exc).__name__, retry_every_s=self._refresh_s,
                        offline_share=str(self._offline_share))
            self._outage_logged = True
        was_reachable, self._reachable = self._reachable, False
        if was_reachable:
            self._notify()  # the estimate just turned conservative

    def _notify(self) -> None:
        if self.on_update is not None:
            self.on_update()

    async def aclose(self) -> None:
        """Stop the background task and flush once more (bounded by the op timeout)."""
        if self._closed:
            return
        self._closed = True
        await stop_task(self._task)
        await self.sync()
        if self._owns_client:
            await self._client.aclose()


def make_spend_totals(config: Config, engine_id: str,
                      clock: Callable[[], datetime] = utc_now) -> SpendTotals:
    """Redis-shared totals when `budget.shared` and a Redis URL are set, else local."""
    budget = config.budget
    if not (budget.shared and config.redis.url):
        return LocalSpendTotals()
    try:
        return RedisSpendTotals(config.redis.url, config.redis.key_prefix, engine_id,
                                offline_share=budget.offline_share,
                                refresh_s=budget.refresh_s,
                                op_timeout_s=budget.redis_op_timeout_s, clock=clock)
    except ValueError as exc:  # redis-py rejects a malformed URL here
        raise ConfigError(f"invalid redis.url for the shared budget: {exc}") from exc
