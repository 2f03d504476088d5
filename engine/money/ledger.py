"""The spend ledger: every call's running cost and cap, per UTC day and month totals,
and the daily and monthly budget alerts. Prices come from `money/prices.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Literal

from engine.config import BudgetConfig, PricesConfig
from engine.log import get_logger
from engine.money.prices import ZERO, PriceTable, dec, utc_now
from engine.money.realtime import RealtimeEstimator
from engine.providers.base import Usage

log = get_logger(__name__)

# --- one call -----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class LedgerEntry:
    """One priced item of a call and the call's running total after it."""

    call_sid: str | None
    kind: str  # stt | llm | tts | phone
    provider: str
    model: str
    cost_usd: float
    total_usd: float  # the call's total after this entry (this entry alone without a call)
    crossed_cap: bool  # True once: on the entry that first brings the total to the cap
    priced: bool = True
    estimated: bool = False


class CallLedger:
    """The running cost of one call, with its cost cap (`cap_usd` <= 0: no cap)."""

    def __init__(self, call_sid: str, cap_usd: float, prices: PriceTable) -> None:
        self.call_sid = call_sid
        self.cap_usd = cap_usd
        self.prices = prices
        self._cap = dec(cap_usd)
        self._total = ZERO
        self.last_cost = ZERO  # the latest entry's exact cost (the day totals add it)
        self._by_kind: dict[str, Decimal] = {}
        self._cap_crossed = False
        self._realtime = RealtimeEstimator(prices.config)
        self.phone_minutes = 0
        self.entries = 0

    def add(self, usage: Usage) -> LedgerEntry:
        cost, priced = self.prices.cost_decimal(usage)
        return self._book(usage.kind, usage.provider, usage.model, cost, priced,
                          usage.estimated)

    def add_phone(self, duration_s: float) -> LedgerEntry:
        """The Twilio leg so far: Twilio bills each minute as it starts, so the minutes
        started by `duration_s` and not booked yet are booked now (live, and at the end)."""
        minutes = self.prices.phone_minutes(duration_s)
        new = max(0, minutes - self.phone_minutes)
        self.phone_minutes = max(minutes, self.phone_minutes)
        cost = self.prices.phone_cost_decimal(new * 60.0)
        return self._book("phone", "twilio", "voice", cost, True, False)

    def add_turn(self, caller_audio_s: float, agent_audio_s: float) -> float:
        """Feed one turn to the Realtime comparison; returns that turn's Realtime cost."""
        return float(self._realtime.add_turn(caller_audio_s, agent_audio_s))

    def _book(self, kind: str, provider: str, model: str, cost: Decimal, priced: bool,
              estimated: bool) -> LedgerEntry:
        self.last_cost = cost
        self._total += cost
        self._by_kind[kind] = self._by_kind.get(kind, ZERO) + cost
        self.entries += 1
        crossed = False
        if self._cap > 0 and not self._cap_crossed and self._total >= self._cap:
            self._cap_crossed = True
            crossed = True
        return LedgerEntry(self.call_sid, kind, provider, model, float(cost),
                           float(self._total), crossed, priced, estimated)

    @property
    def total_decimal(self) -> Decimal:
        return self._total

    @property
    def total_usd(self) -> float:
        return float(self._total)

    @property
    def over_cap(self) -> bool:
        return self._cap_crossed

    @property
    def by_kind_usd(self) -> dict[str, float]:
        return {kind: float(v) for kind, v in sorted(self._by_kind.items())}

    @property
    def realtime_equivalent_usd(self) -> float:
        return float(self._realtime.total)

    @property
    def realtime_turns(self) -> int:
        return self._realtime.turns


# --- all calls: day and month totals, budget alerts --------------------------------


@dataclass(slots=True, frozen=True)
class BudgetAlert:
    kind: Literal["daily_budget", "monthly_budget", "call_cap"]
    at: datetime
    period: str  # "2026-11-24" (day), "2026-11" (month) or the call sid
    spent_usd: float
    limit_usd: float
    call_sid: str | None = None


@dataclass(slots=True, frozen=True)
class SpendUpdate:
    entry: LedgerEntry
    alerts: list[BudgetAlert] = field(default_factory=list)


def _month_start(day: date) -> date:
    return day.replace(day=1)


def _next_month_start(day: date) -> date:
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)


class SpendLedger:
    """Every call's ledger plus per-UTC-day totals and the daily/monthly budget alerts.

    `clock` returns an aware UTC datetime (injectable for tests). Costs count on the UTC
    day they are booked. Ended calls are dropped from memory; their cost stays in the
    day totals (and in the SQLite history, which can re-seed the totals at startup with
    `restore_day_totals`).
    """

    # Day totals older than this are forgotten: the month-to-date never needs them.
    _KEEP_DAYS = 62

    def __init__(self, prices: PricesConfig | PriceTable, budget: BudgetConfig,
                 clock: Callable[[], datetime] = utc_now,
                 default_call_cap_usd: float = 0.0) -> None:
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self.budget = budget
        self.clock = clock
        self.default_call_cap_usd = default_call_cap_usd
        self._calls: dict[str, CallLedger] = {}
        self._days: dict[date, Decimal] = {}
        self._daily_alerted: set[date] = set()
        self._monthly_alerted: set[date] = set()  # keyed by the month's first day

    # --- calls ---

    def open_call(self, call_sid: str, cap_usd: float | None = None) -> CallLedger:
        ledger = self._calls.get(call_sid)
        if ledger is None:
            cap = self.default_call_cap_usd if cap_usd is None else cap_usd
            ledger = CallLedger(call_sid, cap, self.prices)
            self._calls[call_sid] = ledger
        return ledger

    def call(self, call_sid: str) -> CallLedger | None:
        return self._calls.get(call_sid)

    @property
    def active_calls(self) -> list[str]:
        return list(self._calls)

    def record(self, call_sid: str | None, usage: Usage) -> SpendUpdate:
        """Price and book one provider call (`call_sid` None: spend outside any call)."""
        if call_sid is None:
            cost, priced = self.prices.cost_decimal(usage)
            entry = LedgerEntry(None, usage.kind, usage.provider, usage.model, float(cost),
                                float(cost), False, priced, usage.estimated)
            return SpendUpdate(entry, self._book_day(cost))
        ledger = self.open_call(call_sid)
        entry = ledger.add(usage)
        return SpendUpdate(entry, self._after_call_entry(ledger, entry))

    def record_turn(self, call_sid: str, caller_audio_s: float, agent_audio_s: float) -> float:
        return self.open_call(call_sid).add_turn(caller_audio_s, agent_audio_s)

    def phone_progress(self, call_sid: str, duration_s: float) -> SpendUpdate:
        """Book the phone minutes a live call has started by now."""
        ledger = self.open_call(call_sid)
        entry = ledger.add_phone(duration_s)
        return SpendUpdate(entry, self._after_call_entry(ledger, entry))

    def end_call(self, call_sid: str, duration_s: float) -> tuple[CallLedger, SpendUpdate]:
        """Book the phone leg and forget the call; returns its final ledger."""
        ledger = self.open_call(call_sid)
        entry = ledger.add_phone(duration_s)
        alerts = self._after_call_entry(ledger, entry)
        self._calls.pop(call_sid, None)
        return ledger, SpendUpdate(entry, alerts)

    def _after_call_entry(self, ledger: CallLedger, entry: LedgerEntry) -> list[BudgetAlert]:
        alerts = self._book_day(ledger.last_cost)
        if entry.crossed_cap:
            alerts.append(BudgetAlert("call_cap", self.clock(), ledger.call_sid,
                                      entry.total_usd, ledger.cap_usd, ledger.call_sid))
            log.warning("call cost cap reached", call_sid=ledger.call_sid,
                        spent_usd=entry.total_usd, cap_usd=ledger.cap_usd)
        return alerts

    # --- days and months ---

    def _book_day(self, cost: Decimal) -> list[BudgetAlert]:
        now = self.clock()
        today = now.date()
        self._days[today] = self._days.get(today, ZERO) + cost
        self._prune(today)
        alerts: list[BudgetAlert] = []
        daily = dec(self.budget.daily_usd)
        if daily > 0 and today not in self._daily_alerted and self._days[today] >= daily:
            self._daily_alerted.add(today)
            alerts.append(BudgetAlert("daily_budget", now, today.isoformat(),
                                      float(self._days[today]), self.budget.daily_usd))
            log.warning("daily budget reached", day=today.isoformat(),
                        spent_usd=float(self._days[today]), budget_usd=self.budget.daily_usd)
        month = _month_start(today)
        monthly = dec(self.budget.monthly_usd)
        mtd = self._month_total(today)
        if monthly > 0 and month not in self._monthly_alerted and mtd >= monthly:
            self._monthly_alerted.add(month)
            alerts.append(BudgetAlert("monthly_budget", now, month.strftime("%Y-%m"),
                                      float(mtd), self.budget.monthly_usd))
            log.warning("monthly budget reached", month=month.strftime("%Y-%m"),
                        spent_usd=float(mtd), budget_usd=self.budget.monthly_usd)
        return alerts

    def _prune(self, today: date) -> None:
        oldest = today - timedelta(days=self._KEEP_DAYS)
        if self._days and min(self._days) < oldest:
            for day in [d for d in self._days if d < oldest]:
                del self._days[day]
            self._daily_alerted = {d for d in self._daily_alerted if d >= oldest}
            self._monthly_alerted = {m for m in self._monthly_alerted
                                     if m >= _month_start(oldest)}

    def _month_total(self, today: date) -> Decimal:
        start = _month_start(today)
        return sum((v for d, v in self._days.items() if start <= d <= today), ZERO)

    def restore_day_totals(self, totals: Mapping[date, float]) -> None:
        """Seed day totals (e.g. from the history at startup) so the month-to-date
        survives a restart. Replaces the totals of the days given."""
        for day, usd in totals.items():
            self._days[day] = dec(usd)

    def day_usd(self, day: date) -> float:
        return float(self._days.get(day, ZERO))

    @property
    def today_usd(self) -> float:
        return self.day_usd(self.clock().date())

    @property
    def month_to_date_usd(self) -> float:
        return float(self._month_total(self.clock().date()))

    @property
    def monthly_projection_usd(self) -> float:
        """Month-to-date divided by the elapsed fraction of the UTC month.

        A straight-line projection: $10 spent by the middle of a 30-day month projects
        $20. The elapsed time is floored at one hour so the first minutes of a month do
        not project absurd figures.
        """
        now = self.clock()
        start_day = _month_start(now.date())
        start = datetime(start_day.year, start_day.month, 1, tzinfo=UTC)
        end_day = _next_month_start(start_day)
        end = datetime(end_day.year, end_day.month, 1, tzinfo=UTC)
        elapsed = max((now - start).total_seconds(), 3600.0)
        fraction = dec(elapsed) / dec((end - start).total_seconds())
        return float(self._month_total(now.date()) / fraction)
