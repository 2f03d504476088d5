"""The daily and monthly budget: which state spending is in, and when that changes.

States: ok; warning (from `warning_share` of either limit); once a limit is reached the
state `on_exhausted` names: degraded, forwarding or refusing. The worse of the two limits
decides. The state is read synchronously from the totals the budget keeps
(money/spend_totals.py: this engine's, or the fleet's through Redis), so asking it costs
no round trip. It lifts by itself when the UTC day (daily limit) or month (monthly
limit) turns: the first reading after midnight counts the new period.

Each change of state is reported once, to `on_change`: on a booking, on a reading
(`state()`), when the fleet's totals move in the background, and at each UTC midnight
(`watch_days`, so a limit lifts visibly on an idle engine too).

What each state does is the engine's (engine/hub.py, the webhooks, the conversation):
degraded switches new turns to the cheapest chains, forwarding dials new calls to
transfer.number, refusing answers them with `refuse_message` and hangs up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from engine.bus.events import BudgetState
from engine.config import BudgetConfig, Config
from engine.log import get_logger
from engine.money.prices import dec, utc_now
from engine.money.spend_totals import Period, SpendTotals, TotalsMode, make_spend_totals

log = get_logger(__name__)

LimitName = Literal["daily", "monthly"]

_EXHAUSTED_STATE: dict[str, BudgetState] = {
    "degrade": "degraded", "forward": "forwarding", "refuse": "refusing"}
# How bad a state is: an alert is raised only when the state gets worse.
SEVERITY: dict[BudgetState, int] = {
    "ok": 0, "warning": 1, "degraded": 2, "forwarding": 2, "refusing": 2}
_MEANS: dict[BudgetState, str] = {
    "ok": "spending is within the limits", "warning": "spending is near the limit",
    "degraded": "new turns use the cheapest chains",
    "forwarding": "new calls are forwarded to transfer.number",
    "refusing": "new calls are refused"}


@dataclass(frozen=True, slots=True)
class LimitReading:
    """One limit now: 0 = under the warning share, 1 = warning, 2 = reached."""

    limit: LimitName
    period: str  # "2026-11-24" (daily) or "2026-11" (monthly)
    spent_usd: Decimal
    limit_usd: Decimal  # 0: no limit
    level: int


@dataclass(frozen=True, slots=True)
class BudgetReading:
    state: BudgetState
    daily: LimitReading
    monthly: LimitReading
    totals: TotalsMode  # local | shared (the fleet's) | offline (conservative estimate)

    @property
    def driver(self) -> LimitReading:
        """The limit that decides the state; on a tie the monthly one (it lifts later)."""
        return self.daily if self.daily.level > self.monthly.level else self.monthly


@dataclass(frozen=True, slots=True)
class BudgetChange:
    """A change of state, ready to become an event. `limit` is the limit that decides
    the new state, or (back to ok) the one that lifted; the figures are its current ones."""

    old: BudgetState
    new: BudgetState
    limit: LimitName
    period: str
    spent_usd: float
    limit_usd: float
    at: datetime
    totals: TotalsMode

    @property
    def worse(self) -> bool:
        return SEVERITY[self.new] > SEVERITY[self.old]

    @property
    def summary(self) -> str:
        """One line for an alert, e.g. "daily budget refusing: $20.00 of $20
        (2026-11-24); new calls are refused"."""
        return (f"{self.limit} budget {self.new}: ${self.spent_usd:.2f} of "
                f"${self.limit_usd:g} ({self.period}); {_MEANS[self.new]}")


class Budget:
    """The budget state over `totals`; `record` books spend into them."""

    def __init__(self, config: BudgetConfig, totals: SpendTotals, *,
                 clock: Callable[[], datetime] = utc_now,
                 on_change: Callable[[BudgetChange], None] | None = None) -> None:
        self.totals = totals
        self.on_change = on_change
        self._clock = clock
        self._daily = dec(config.daily_usd)
        self._monthly = dec(config.monthly_usd)
        self._warning_share = dec(config.warning_share)
        self._exhausted: BudgetState = _EXHAUSTED_STATE[config.on_exhausted]
        self._state: BudgetState = "ok"
        self._driver: LimitName = "monthly"
        totals.on_update = self._totals_moved

    def record(self, amount: Decimal, at: datetime | None = None) -> BudgetState:
        """Book `amount` (USD) spent at `at` (UTC, default now); returns the state after."""
        at = at or self._clock()
        self.totals.add(amount, at)
        return self.state(at)

    def state(self, now: datetime | None = None) -> BudgetState:
        """The state now, reporting a change to `on_change` (once per change)."""
        reading = self.reading(now)
        if reading.state != self._state:
            self._changed(reading, now or self._clock())
        return reading.state

    def _totals_moved(self) -> None:
        self.state()  # the fleet's totals moved in the background (or Redis came or went)

    def reading(self, now: datetime | None = None) -> BudgetReading:
        """Both limits and the state they give, without reporting anything."""
        today = (now or self._clock()).astimezone(UTC).date()
        daily = self._read("daily", Period.day_of(today), self._daily)
        monthly = self._read("monthly", Period.month_of(today), self._monthly)
        level = max(daily.level, monthly.level)
        state: BudgetState = ("ok", "warning", self._exhausted)[level]
        return BudgetReading(state, daily, monthly, self.totals.mode)

    def _read(self, name: LimitName, period: Period, limit: Decimal) -> LimitReading:
        spent = self.totals.total(period)
        level = 0
        if limit > 0:
            level = 2 if spent >= limit else 1 if spent >= limit * self._warning_share else 0
        return LimitReading(name, period.name, spent, limit, level)

    def _changed(self, reading: BudgetReading, at: datetime) -> None:
        if reading.state != "ok":
            self._driver = reading.driver.limit
        limit = reading.daily if self._driver == "daily" else reading.monthly
        change = BudgetChange(self._state, reading.state, limit.limit, limit.period,
                              float(limit.spent_usd), float(limit.limit_usd), at,
                              reading.totals)
        self._state = reading.state
        (log.info if change.new == "ok" else log.warning)(
            "budget.state_changed", old=change.old, new=change.new, limit=change.limit,
            period=change.period, spent_usd=change.spent_usd, limit_usd=change.limit_usd,
            totals=change.totals)
        if self.on_change is not None:
            self.on_change(change)

    async def watch_days(self) -> None:
        """Read the state just after each UTC midnight, until cancelled: local totals
        move only on bookings, so without this a limit would lift silently."""
        while True:
            now = self._clock()
            midnight = Period.day_of(now.astimezone(UTC).date()).end
            # At most an hour at a time: a clock set forward (tests) is noticed too.
            await asyncio.sleep(min((midnight - now).total_seconds() + 0.5, 3600.0))
            self.state()


def budget_from_config(config: Config, engine_id: str,
                       clock: Callable[[], datetime] = utc_now) -> Budget:
    """The budget `[budget]` describes, over this engine's or the fleet's totals.
    "forward" without a transfer.number has nowhere to send calls: it refuses them,
    and says so now (at start)."""
    settings = config.budget
    if settings.on_exhausted == "forward" and not config.transfer.number:
        log.warning("budget.forward_without_number",
                    detail='budget.on_exhausted = "forward" but transfer.number is empty: '
                           "new calls are refused when a limit is reached")
        settings = settings.model_copy(update={"on_exhausted": "refuse"})
    return Budget(settings, make_spend_totals(config, engine_id, clock), clock=clock)
