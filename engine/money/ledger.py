"""The spend ledger: every call's running cost against its cap (and the cap's warning
share), and every booking's exact amount handed to the budget (`money/budget.py`), whose
day and month totals the ledger's spend figures read. Prices come from `money/prices.py`.

A call's ledger lives from its start to its end. Usage that arrives after the end (a
request read on in the background for its usage) still counts, in the day and month
totals and under its call, but never opens that call's ledger again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Literal

from engine.config import BudgetConfig, PricesConfig
from engine.log import get_logger
from engine.money.budget import Budget
from engine.money.prices import ZERO, CostLine, PriceTable, dec, total_of, utc_now
from engine.money.realtime import RealtimeEstimator
from engine.money.spend_totals import LocalSpendTotals, Period
from engine.providers.base import Usage

log = get_logger(__name__)

# --- one call -----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class LedgerEntry:
    """One priced item of a call and the call's running total after it."""

    call_sid: str | None
    kind: str  # stt | llm | tts | phone | media_stream
    provider: str
    model: str
    cost_usd: float
    total_usd: float  # the call's total after this entry (this entry alone without a call)
    crossed_cap: bool  # True once: on the entry that first brings the total to the cap
    priced: bool = True
    estimated: bool = False
    # True once: on the entry that first brings the total to the cap's warning share
    # (and not to the cap itself).
    crossed_warning: bool = False
    # The bill's lines of a provider call, as priced; the minutes a Twilio entry booked.
    lines: tuple[CostLine, ...] = ()
    minutes: int = 0


class CallLedger:
    """The running cost of one call, with its cost cap (`cap_usd` <= 0: no cap) and the
    share of it that warns (`warning_share` <= 0: no warning)."""

    def __init__(self, call_sid: str, cap_usd: float, prices: PriceTable,
                 warning_share: float = 0.0) -> None:
        self.call_sid = call_sid
        self.cap_usd = cap_usd
        self.prices = prices
        self._cap = dec(cap_usd)
        self._warning = self._cap * dec(warning_share)
        self._total = ZERO
        self.last_cost = ZERO  # the latest entry's exact cost (the day totals add it)
        self._by_kind: dict[str, Decimal] = {}
        self._cap_crossed = False
        self._warned = warning_share <= 0
        self._realtime = RealtimeEstimator(prices.config)
        self.phone_minutes = 0
        self._stream_minutes: dict[str, int] = {}  # booked per media stream (by its sid)
        self.entries = 0

    def add(self, usage: Usage) -> LedgerEntry:
        lines = tuple(self.prices.cost_lines(usage))
        cost, priced = total_of(lines)
        return replace(self._book(usage.kind, usage.provider, usage.model, cost, priced,
                                  usage.estimated), lines=lines)

    def add_phone(self, duration_s: float) -> LedgerEntry:
        """The Twilio leg so far: Twilio bills each minute as it starts, so the minutes
        started by `duration_s` and not booked yet are booked now (live, and at the end)."""
        minutes = self.prices.phone_minutes(duration_s)
        new = max(0, minutes - self.phone_minutes)
        self.phone_minutes = max(minutes, self.phone_minutes)
        cost = self.prices.phone_cost_decimal(new * 60.0)
        return replace(self._book("phone", "twilio", "voice", cost, True, False), minutes=new)

    def add_media_stream(self, stream_sid: str, duration_s: float) -> LedgerEntry:
        """One Media Streams stream so far: Twilio bills each started minute of a stream
        on its own, so the minutes it has started and not booked yet are booked now."""
        minutes = self.prices.phone_minutes(duration_s)
        booked = self._stream_minutes.get(stream_sid, 0)
        self._stream_minutes[stream_sid] = max(minutes, booked)
        rate = dec(self.prices.config.twilio_media_streams_per_minute)
        new = max(0, minutes - booked)
        return replace(self._book("media_stream", "twilio", "media_stream", new * rate, True,
                                  False), minutes=new)

    def add_turn(self, caller_audio_s: float, agent_audio_s: float) -> float:
        """Feed one turn to the Realtime comparison; returns that turn's Realtime cost."""
        return float(self._realtime.add_turn(caller_audio_s, agent_audio_s))

    def _book(self, kind: str, provider: str, model: str, cost: Decimal, priced: bool,
              estimated: bool) -> LedgerEntry:
        self.last_cost = cost
        self._total += cost
        self._by_kind[kind] = self._by_kind.get(kind, ZERO) + cost
        self.entries += 1
        crossed = warned = False
        if self._cap > 0 and not self._cap_crossed and self._total >= self._cap:
            self._cap_crossed = crossed = True
        if self._cap > 0 and not self._warned and self._total >= self._warning:
            self._warned = True
            warned = not crossed  # the cap itself says more
        return LedgerEntry(self.call_sid, kind, provider, model, float(cost),
                           float(self._total), crossed, priced, estimated, warned)

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


# --- all calls: the bookings the budget counts ---------------------------------------


@dataclass(slots=True, frozen=True)
class CapAlert:
    """A call reached its cap's warning share, or the cap."""

    kind: Literal["call_cap_warning", "call_cap"]
    at: datetime
    call_sid: str
    spent_usd: float
    limit_usd: float


@dataclass(slots=True, frozen=True)
class SpendUpdate:
    entry: LedgerEntry
    alerts: list[CapAlert] = field(default_factory=list)


class SpendLedger:
    """Every call's ledger; every booking's exact cost goes to the budget.

    `clock` returns an aware UTC datetime (injectable for tests). Costs count on the UTC
    day they are booked. Ended calls are dropped from memory; their cost stays in the
    budget's day and month totals (and in the history, which seeds those totals at
    start). Without a `Budget`, one over this engine's totals is made from `budget`.
    """

    # Ended calls whose final total is kept for usage arriving late (a background read is
    # bounded by providers.drain_timeout_s, so recent calls are all that matter).
    _KEEP_ENDED = 10_000

    def __init__(self, prices: PricesConfig | PriceTable, budget: Budget | BudgetConfig,
                 clock: Callable[[], datetime] = utc_now,
                 default_call_cap_usd: float = 0.0, cap_warning_share: float = 0.0) -> None:
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self.budget = budget if isinstance(budget, Budget) else \
            Budget(budget, LocalSpendTotals(), clock=clock)
        self.clock = clock
        self.default_call_cap_usd = default_call_cap_usd
        self.cap_warning_share = cap_warning_share
        self._calls: dict[str, CallLedger] = {}
        self._ended: OrderedDict[str, Decimal] = OrderedDict()  # call -> its total so far

    # --- calls ---

    def open_call(self, call_sid: str, cap_usd: float | None = None) -> CallLedger:
        ledger = self._calls.get(call_sid)
        if ledger is None:
            cap = self.default_call_cap_usd if cap_usd is None else cap_usd
            ledger = CallLedger(call_sid, cap, self.prices, self.cap_warning_share)
            self._calls[call_sid] = ledger
            self._ended.pop(call_sid, None)
        return ledger

    def _live(self, call_sid: str) -> CallLedger | None:
        """The call's ledger, opened on first use; None once the call has ended."""
        if call_sid in self._ended:
            return None
        return self.open_call(call_sid)

    def call(self, call_sid: str) -> CallLedger | None:
        return self._calls.get(call_sid)

    @property
    def active_calls(self) -> list[str]:
        return list(self._calls)

    def record(self, call_sid: str | None, usage: Usage) -> SpendUpdate:
        """Price and book one provider call (`call_sid` None: spend outside any call)."""
        ledger = self._live(call_sid) if call_sid is not None else None
        if ledger is None:
            return self._record_outside(call_sid, usage)
        entry = ledger.add(usage)
        return SpendUpdate(entry, self._after_call_entry(ledger, entry))

    def _record_outside(self, call_sid: str | None, usage: Usage) -> SpendUpdate:
        """Spend outside any live call: under no call, or after its call ended."""
        lines = tuple(self.prices.cost_lines(usage))
        cost, priced = total_of(lines)
        total = cost
        if call_sid is not None:
            total = self._ended[call_sid] = self._ended[call_sid] + cost
            log.info("usage after the call ended", call_sid=call_sid, kind=usage.kind,
                     provider=usage.provider, cost_usd=float(cost))
        entry = LedgerEntry(call_sid, usage.kind, usage.provider, usage.model, float(cost),
                            float(total), False, priced, usage.estimated, lines=lines)
        self._book_day(cost)
        return SpendUpdate(entry)

    def record_turn(self, call_sid: str, caller_audio_s: float, agent_audio_s: float) -> float:
        ledger = self._live(call_sid)
        return ledger.add_turn(caller_audio_s, agent_audio_s) if ledger is not None else 0.0

    def phone_progress(self, call_sid: str, duration_s: float) -> SpendUpdate | None:
        """Book the phone minutes a live call has started by now (None once it ended)."""
        ledger = self._live(call_sid)
        if ledger is None:
            return None
        entry = ledger.add_phone(duration_s)
        return SpendUpdate(entry, self._after_call_entry(ledger, entry))

    def media_stream_progress(self, call_sid: str, stream_sid: str,
                              duration_s: float) -> SpendUpdate | None:
        """Book the Media Streams minutes a call's stream has started by now (None once
        the call ended)."""
        ledger = self._live(call_sid)
        if ledger is None:
            return None
        entry = ledger.add_media_stream(stream_sid, duration_s)
        return SpendUpdate(entry, self._after_call_entry(ledger, entry))

    def end_call(self, call_sid: str, duration_s: float) -> tuple[CallLedger, SpendUpdate]:
        """Book the phone leg and forget the call; returns its final ledger."""
        ledger = self.open_call(call_sid)
        entry = ledger.add_phone(duration_s)
        alerts = self._after_call_entry(ledger, entry)
        del self._calls[call_sid]
        self._ended[call_sid] = ledger.total_decimal
        while len(self._ended) > self._KEEP_ENDED:
            self._ended.popitem(last=False)
        return ledger, SpendUpdate(entry, alerts)

    def turned_away(self, call_sid: str) -> SpendUpdate:
        """A call answered with TwiML alone (refused while the budget is exhausted):
        Twilio still bills its first minute. It never had a ledger of its own."""
        cost = self.prices.phone_cost_decimal(1.0)
        self._book_day(cost)
        return SpendUpdate(LedgerEntry(call_sid, "phone", "twilio", "voice", float(cost),
                                       float(cost), False, minutes=1))

    def _after_call_entry(self, ledger: CallLedger, entry: LedgerEntry) -> list[CapAlert]:
        self._book_day(ledger.last_cost)
        if not (entry.crossed_cap or entry.crossed_warning):
            return []
        kind: Literal["call_cap_warning", "call_cap"] = \
            "call_cap" if entry.crossed_cap else "call_cap_warning"
        log.warning("call cost cap reached" if entry.crossed_cap else "call cost cap near",
                    call_sid=ledger.call_sid, spent_usd=entry.total_usd, cap_usd=ledger.cap_usd)
        return [CapAlert(kind, self.clock(), ledger.call_sid, entry.total_usd, ledger.cap_usd)]

    # --- days and months: readings of the budget's totals ---

    def _book_day(self, cost: Decimal) -> None:
        self.budget.record(cost, self.clock())

    def day_usd(self, day: date) -> float:
        return float(self.budget.totals.total(Period.day_of(day)))

    @property
    def today_usd(self) -> float:
        return float(self.budget.reading(self.clock()).daily.spent_usd)

    @property
    def month_to_date_usd(self) -> float:
        return float(self.budget.reading(self.clock()).monthly.spent_usd)

    @property
    def monthly_projection_usd(self) -> float:
        """Month-to-date divided by the elapsed fraction of the UTC month.

        A straight-line projection: $10 spent by the middle of a 30-day month projects
        $20. The elapsed time is floored at one hour so the first minutes of a month do
        not project absurd figures.
        """
        now = self.clock()
        month = Period.month_of(now.astimezone(UTC).date())
        start = datetime(month.start.year, month.start.month, 1, tzinfo=UTC)
        elapsed = max((now - start).total_seconds(), 3600.0)
        fraction = dec(elapsed) / dec((month.end - start).total_seconds())
        return float(self.budget.totals.total(month) / fraction)
