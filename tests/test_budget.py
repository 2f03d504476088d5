"""The budget state machine over local totals: thresholds, the action states, one report
per change, UTC day and month rollover without a booking, seeding from the history, and
bad [budget] settings refused at config load with the key named."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine.config import BudgetConfig, ConfigError, load_config
from engine.money.budget import Budget, BudgetChange
from engine.money.spend_totals import LocalSpendTotals, Period

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_budget(clock: Clock, **settings: object) -> tuple[Budget, list[BudgetChange]]:
    changes: list[BudgetChange] = []
    config = BudgetConfig.model_validate({"daily_usd": 1.0, "monthly_usd": 10.0, **settings})
    return Budget(config, LocalSpendTotals(), clock=clock, on_change=changes.append), changes


def test_thresholds_and_one_report_per_change() -> None:
    clock = Clock(datetime(2026, 11, 24, 12, 0, tzinfo=UTC))
    budget, changes = make_budget(clock)
    assert budget.record(Decimal("0.5")) == "ok"
    assert changes == []
    # In floats 0.5 + 3 * 0.1 is 0.7999999999999999 (no warning) and + 5 * 0.1 is
    # 0.9999999999999999 (never reached); Decimals reach 0.8 and 1.0 exactly.
    for _ in range(3):
        budget.record(Decimal("0.1"))
    assert budget.state() == "warning"
    assert [(c.old, c.new, c.limit, c.period, c.spent_usd, c.limit_usd) for c in changes] \
        == [("ok", "warning", "daily", "2026-11-24", 0.8, 1.0)]
    for _ in range(2):
        budget.record(Decimal("0.1"))
    assert budget.record(Decimal("0.05")) == "degraded"  # 1.0 reached; 1.05 stays degraded
    assert [c.new for c in changes] == ["warning", "degraded"]
    assert changes[-1].spent_usd == 1.0 and changes[-1].totals == "local"
    assert changes[-1].at == clock.now
    for _ in range(3):
        assert budget.state() == "degraded"
    assert len(changes) == 2  # readings and bookings in the same state report nothing


@pytest.mark.parametrize(("action", "state"), [("degrade", "degraded"),
                                               ("forward", "forwarding"),
                                               ("refuse", "refusing")])
def test_exhausted_state_follows_on_exhausted(action: str, state: str) -> None:
    budget, changes = make_budget(Clock(datetime(2026, 11, 24, tzinfo=UTC)),
                                  on_exhausted=action)
    assert budget.record(Decimal("1.0")) == state
    assert [(c.old, c.new) for c in changes] == [("ok", state)]


def test_daily_limit_lifts_at_next_utc_day_without_a_booking() -> None:
    clock = Clock(datetime(2026, 11, 24, 23, 59, 59, tzinfo=UTC))
    budget, changes = make_budget(clock, on_exhausted="refuse")
    assert budget.record(Decimal("1.2")) == "refusing"
    clock.now = datetime(2026, 11, 25, 0, 0, 1, tzinfo=UTC)
    assert budget.state() == "ok"
    lifted = changes[-1]
    assert (lifted.old, lifted.new, lifted.limit, lifted.period, lifted.spent_usd) \
        == ("refusing", "ok", "daily", "2026-11-25", 0.0)
    # An explicit reading time works the same (the hub may pass the webhook's time).
    budget2, changes2 = make_budget(Clock(datetime(2026, 11, 24, 23, 0, tzinfo=UTC)))
    budget2.record(Decimal("1"))
    assert budget2.state(datetime(2026, 11, 25, 0, 0, 1, tzinfo=UTC)) == "ok"
    assert [c.new for c in changes2] == ["degraded", "ok"]


def test_monthly_limit_holds_across_days_and_lifts_at_next_utc_month() -> None:
    clock = Clock(datetime(2026, 11, 1, 10, 0, tzinfo=UTC))
    budget, changes = make_budget(clock, daily_usd=0.0, monthly_usd=2.0, warning_share=0.5)
    for day in range(1, 5):  # 0.5 a day: warning at 1.0 (day 2), reached at 2.0 (day 4)
        clock.now = datetime(2026, 11, day, 10, 0, tzinfo=UTC)
        budget.record(Decimal("0.5"))
    assert [(c.new, c.limit, c.period, c.spent_usd) for c in changes] == [
        ("warning", "monthly", "2026-11", 1.0), ("degraded", "monthly", "2026-11", 2.0)]
    clock.now = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    assert budget.state() == "degraded"  # a new day does not lift a monthly limit
    clock.now = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    assert budget.state() == "ok"
    assert (changes[-1].limit, changes[-1].period) == ("monthly", "2026-12")


def test_worse_limit_decides_and_a_tie_names_the_monthly_limit() -> None:
    clock = Clock(datetime(2026, 11, 24, tzinfo=UTC))
    budget, changes = make_budget(clock, daily_usd=1.0, monthly_usd=1.25)
    budget.record(Decimal("1.0"))  # monthly warning (1.0 >= 0.8 * 1.25), daily reached
    assert (changes[-1].new, changes[-1].limit) == ("degraded", "daily")
    reading = budget.reading()
    assert (reading.daily.level, reading.monthly.level) == (2, 1)
    budget2, changes2 = make_budget(clock, daily_usd=1.0, monthly_usd=1.0)
    budget2.record(Decimal("1.0"))
    assert changes2[-1].limit == "monthly"  # both reached: the one that lifts later
    clock.now += timedelta(days=1)
    assert budget2.state() == "degraded"


def test_zero_means_no_limit_and_negative_amounts_are_ignored() -> None:
    budget, changes = make_budget(Clock(datetime(2026, 11, 24, tzinfo=UTC)),
                                  daily_usd=0.0, monthly_usd=0.0)
    assert budget.record(Decimal("1000000")) == "ok"
    with capture_logs() as logs:
        assert budget.record(Decimal("-5")) == "ok"
    assert budget.reading().daily.spent_usd == Decimal("1000000")
    assert [entry["event"] for entry in logs] == ["budget.negative_amount_ignored"]
    assert changes == []


def test_seeded_history_counts_toward_day_and_month() -> None:
    totals = LocalSpendTotals()
    # As CallHistory.daily_costs returns them: floats per UTC day.
    totals.seed({date(2026, 11, 1): 3.0, date(2026, 11, 23): 4.5, date(2026, 10, 31): 9.0})
    clock = Clock(datetime(2026, 11, 23, 8, 0, tzinfo=UTC))
    changes: list[BudgetChange] = []
    budget = Budget(BudgetConfig(daily_usd=5.0, monthly_usd=8.0), totals, clock=clock,
                    on_change=changes.append)
    assert totals.total(Period.month_of(date(2026, 11, 5))) == Decimal("7.5")
    assert budget.state() == "warning"  # day 4.5 >= 4.0 and month 7.5 >= 6.4
    budget.record(Decimal("0.5"))
    assert budget.state() == "degraded"  # month 8.0 reached
    # Seeding a day again replaces it, and its month follows.
    totals.seed({date(2026, 11, 23): 1.0})
    assert totals.total(Period.month_of(date(2026, 11, 1))) == Decimal("4.0")
    assert totals.total(Period.day_of(date(2026, 11, 23))) == Decimal("1.0")


def test_periods_and_their_ends() -> None:
    assert Period.day_of(date(2026, 12, 31)).end == datetime(2027, 1, 1, tzinfo=UTC)
    assert Period.month_of(date(2026, 12, 31)).end == datetime(2027, 1, 1, tzinfo=UTC)
    assert Period.month_of(date(2028, 2, 29)).name == "2028-02"
    assert Period.month_of(date(2028, 2, 29)).end == datetime(2028, 3, 1, tzinfo=UTC)


# --- settings ------------------------------------------------------------------------


def test_shipped_config_has_the_documented_budget() -> None:
    budget = load_config(ROOT / "config.toml", env={}).budget
    assert (budget.daily_usd, budget.monthly_usd, budget.warning_share) == (20.0, 500.0, 0.8)
    assert budget.on_exhausted == "degrade" and budget.shared is True
    assert budget.offline_share == 0.5


@pytest.mark.parametrize(("line", "key"), [
    ("daily_usd = -1.0", "budget.daily_usd"),
    ("monthly_usd = -0.01", "budget.monthly_usd"),
    ("daily_usd = inf", "budget.daily_usd"),
    ("warning_share = 0.0", "budget.warning_share"),
    ("warning_share = 1.5", "budget.warning_share"),
    ('on_exhausted = "panic"', "budget.on_exhausted"),
    ("offline_share = 0.0", "budget.offline_share"),
    ("offline_share = 2.0", "budget.offline_share"),
    ("refresh_s = 0", "budget.refresh_s"),
    ("daily_limit = 5", "budget.daily_limit"),  # a typo is refused, not ignored
])
def test_bad_budget_settings_stop_config_loading(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[budget]\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, env={})


def test_boundary_settings_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[budget]\ndaily_usd = 0\nmonthly_usd = 0\nwarning_share = 1.0\n"
                    'on_exhausted = "refuse"\noffline_share = 1.0\nshared = false\n',
                    encoding="utf-8")
    budget = load_config(path, env={}).budget
    assert (budget.warning_share, budget.on_exhausted, budget.shared) == (1.0, "refuse", False)


def test_local_totals_forget_days_the_month_no_longer_needs() -> None:
    totals = LocalSpendTotals()
    long_ago = datetime(2026, 8, 1, 12, 0, tzinfo=UTC)
    totals.add(Decimal("5"), long_ago)
    totals.add(Decimal("1"), datetime(2026, 11, 24, 12, 0, tzinfo=UTC))
    assert totals.total(Period.day_of(long_ago.date())) == 0
    assert totals.total(Period.month_of(long_ago.date())) == 0
    assert totals.total(Period.month_of(date(2026, 11, 1))) == Decimal("1")
