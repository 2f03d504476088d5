"""Spend ledger: prices applied to usage (to the cent), caps and their warning share,
the budget it books into, projection, and the OpenAI Realtime comparison, all checked
against figures worked out by hand."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import structlog

from engine.config import BudgetConfig, PricesConfig
from engine.money.budget import BudgetChange
from engine.money.catalog import ModelPrice
from engine.money.ledger import CallLedger, SpendLedger
from engine.money.prices import PriceTable
from engine.money.realtime import realtime_conversation_cost
from engine.providers.base import Usage
from engine.providers.billing import BillingUnit

# Explicit prices, so a change of the shipped defaults cannot move these figures.
PRICES = PricesConfig(
    stt_local_per_minute=0.001,
    models=[
        ModelPrice(provider="openai", model="whisper-1", unit=BillingUnit.AUDIO_MINUTE,
                   per_minute=0.006),
        ModelPrice(provider="openai", model="gpt-4o-mini", unit=BillingUnit.TOKENS,
                   input_per_1m=0.15, cached_input_per_1m=0.075, output_per_1m=0.60),
        ModelPrice(provider="elevenlabs", model="eleven_flash_v2_5",
                   unit=BillingUnit.CHARACTERS, per_1k_characters=0.05),
    ],  # espeak and the FAQ agent are free by their providers' declarations
    twilio_per_minute=0.0085,
    realtime_audio_in=10.0, realtime_audio_cached_in=0.30, realtime_audio_out=20.0,
    realtime_caller_tokens_per_minute=600.0, realtime_agent_tokens_per_minute=1200.0,
)


def prices_with(*entries: ModelPrice) -> PricesConfig:
    return PricesConfig.model_validate({**PRICES.model_dump(),
                                        "models": [*PRICES.models, *entries]})


def llm_usage() -> Usage:
    return Usage("openai", "llm", "gpt-4o-mini", input_tokens=1234, cached_input_tokens=200,
                 output_tokens=56)


# (1234 - 200) * 0.15 + 200 * 0.075 + 56 * 0.60 = 155.1 + 15 + 33.6 = 203.7 per 1M
LLM_COST = Decimal("0.0002037")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_llm_cost_matches_hand_computation() -> None:
    table = PriceTable(PRICES)
    assert table.cost_decimal(llm_usage()) == (LLM_COST, True)
    assert table.cost(llm_usage()) == pytest.approx(0.0002037, abs=1e-12)


def test_stt_tts_and_local_prices() -> None:
    table = PriceTable(PRICES)
    # 45 s of whisper-1 at $0.006/min = $0.0045
    assert table.cost_decimal(Usage("openai", "stt", "whisper-1", audio_seconds=45.0))[0] \
        == Decimal("0.0045")
    # local whisper: 90 s at the configured local rate $0.001/min = $0.0015
    assert table.cost_decimal(Usage("local_whisper", "stt", "tiny.en",
                                    audio_seconds=90.0))[0] == Decimal("0.0015")
    # 321 characters of Flash at $0.05/1K = $0.01605
    assert table.cost_decimal(Usage("elevenlabs", "tts", "eleven_flash_v2_5",
                                    characters=321))[0] == Decimal("0.01605")
    assert table.cost(Usage("espeak", "tts", "en-us", characters=500)) == 0.0
    assert table.cost(Usage("faq", "llm", "faq", input_tokens=10)) == 0.0
    assert table.unpriced_models == set()


def test_phone_rounds_up_to_started_minutes() -> None:
    table = PriceTable(PRICES)
    assert [table.phone_minutes(s) for s in (0, 1, 60, 60.001, 61, 179)] == [0, 1, 1, 2, 2, 3]
    assert table.phone_cost_decimal(61) == Decimal("0.0170")
    assert table.phone_cost(0) == 0.0


def test_token_billed_stt() -> None:
    table = PriceTable(prices_with(ModelPrice(
        provider="openai", model="gpt-4o-mini-transcribe", unit=BillingUnit.AUDIO_TOKENS,
        input_per_1m=1.25, output_per_1m=5.0)))
    usage = Usage("openai", "stt", "gpt-4o-mini-transcribe", audio_seconds=10.0,
                  input_tokens=1000, output_tokens=200)
    # 1000 * 1.25 + 200 * 5 = 2250 per 1M
    assert table.cost_decimal(usage) == (Decimal("0.00225"), True)


def test_phone_minutes_are_booked_as_they_start() -> None:
    ledger = SpendLedger(PRICES, BudgetConfig(daily_usd=0, monthly_usd=0))
    ledger.open_call("CA1", 0.0)
    first = ledger.phone_progress("CA1", 0.001)  # minute 1 starts with the call
    same = ledger.phone_progress("CA1", 59.0)
    second = ledger.phone_progress("CA1", 60.5)
    call, end = ledger.end_call("CA1", 61.0)  # nothing new at the end
    per_minute = Decimal(str(PRICES.twilio_per_minute))
    assert Decimal(str(first.entry.cost_usd)) == per_minute
    assert same.entry.cost_usd == 0 and end.entry.cost_usd == 0
    assert Decimal(str(second.entry.cost_usd)) == per_minute
    assert call.total_decimal == 2 * per_minute and call.phone_minutes == 2


def test_unknown_model_is_unpriced_and_warned_once() -> None:
    table = PriceTable(PRICES)
    usage = Usage("openai", "llm", "gpt-9-huge", input_tokens=1000, output_tokens=1000)
    with structlog.testing.capture_logs() as logs:
        assert table.cost_decimal(usage) == (Decimal(0), False)
        assert table.cost(usage) == 0.0
    assert table.unpriced_models == {"llm:openai:gpt-9-huge"}
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["model"] == "gpt-9-huge"
    entry = CallLedger("CA1", 1.0, table).add(usage)
    assert entry.priced is False and entry.cost_usd == 0.0


def test_call_total_is_exact_over_many_entries() -> None:
    ledger = CallLedger("CA1", 0.0, PriceTable(PRICES))
    for _ in range(1000):
        ledger.add(llm_usage())
    assert ledger.total_decimal == LLM_COST * 1000 == Decimal("0.2037")
    assert ledger.by_kind_usd == {"llm": pytest.approx(0.2037)}
    assert ledger.over_cap is False  # cap 0 = no cap


def test_cap_crossing_fires_exactly_once() -> None:
    # cap = two LLM entries exactly: reaching it counts as crossing
    ledger = CallLedger("CA1", 0.0004074, PriceTable(PRICES))
    crossed = [ledger.add(llm_usage()).crossed_cap for _ in range(5)]
    assert crossed == [False, True, False, False, False]
    assert ledger.over_cap


def test_call_ledger_kinds_and_phone() -> None:
    ledger = CallLedger("CA1", 1.0, PriceTable(PRICES))
    ledger.add(llm_usage())
    ledger.add(Usage("openai", "stt", "whisper-1", audio_seconds=45.0))
    ledger.add(Usage("elevenlabs", "tts", "eleven_flash_v2_5", characters=321))
    entry = ledger.add_phone(61.0)
    assert entry.kind == "phone" and entry.cost_usd == pytest.approx(0.017)
    # 0.0002037 + 0.0045 + 0.01605 + 0.017
    assert ledger.total_decimal == Decimal("0.0377537")
    assert entry.total_usd == pytest.approx(0.0377537, abs=1e-12)
    assert ledger.by_kind_usd == {"llm": pytest.approx(0.0002037), "phone": pytest.approx(0.017),
                                  "stt": pytest.approx(0.0045), "tts": pytest.approx(0.01605)}
    assert ledger.phone_minutes == 2


def test_realtime_equivalent_by_hand() -> None:
    # Turn 1: caller 6 s -> 60 tokens in at $10/1M, agent 3 s -> 60 tokens out at $20/1M:
    #   600 + 1200 = 1800 per 1M = $0.0018; conversation now 120 tokens.
    # Turn 2: 120 cached at $0.30 = 36; caller 12 s -> 120 in = 1200; agent 6 s -> 120 out
    #   = 2400: 3636 per 1M = $0.003636. Total $0.005436.
    ledger = CallLedger("CA1", 1.0, PriceTable(PRICES))
    assert ledger.add_turn(6.0, 3.0) == pytest.approx(0.0018, abs=1e-12)
    assert ledger.add_turn(12.0, 6.0) == pytest.approx(0.003636, abs=1e-12)
    assert ledger.realtime_equivalent_usd == pytest.approx(0.005436, abs=1e-12)
    assert realtime_conversation_cost([(6.0, 3.0), (12.0, 6.0)], PRICES) \
        == pytest.approx(0.005436, abs=1e-12)


def test_spend_ledger_call_cap_alert_once() -> None:
    clock = Clock(datetime(2026, 11, 24, 12, 0, tzinfo=UTC))
    spend = SpendLedger(PRICES, BudgetConfig(daily_usd=100.0, monthly_usd=1000.0), clock,
                        default_call_cap_usd=0.001)
    alerts = []
    for _ in range(7):
        alerts += spend.record("CA1", llm_usage()).alerts
    # 5 * 0.0002037 = 0.0010185 is the first total at or over $0.001
    assert [a.kind for a in alerts] == ["call_cap"]
    assert alerts[0].call_sid == "CA1"
    assert alerts[0].spent_usd == pytest.approx(0.0010185, abs=1e-12)
    ledger, update = spend.end_call("CA1", 30.0)
    assert update.entry.kind == "phone" and update.alerts == []
    assert spend.call("CA1") is None and ledger.total_usd > 0
    assert spend.today_usd == pytest.approx(7 * 0.0002037 + 0.0085, abs=1e-12)


def test_call_cap_warning_share_then_cap_each_once() -> None:
    clock = Clock(datetime(2026, 11, 24, 12, 0, tzinfo=UTC))
    spend = SpendLedger(PRICES, BudgetConfig(daily_usd=100.0, monthly_usd=1000.0), clock,
                        default_call_cap_usd=0.001, cap_warning_share=0.8)
    alerts = []
    for _ in range(7):
        alerts += spend.record("CA1", llm_usage()).alerts
    # 4 * 0.0002037 = 0.0008148 reaches 0.8 * $0.001; 5 entries reach the cap
    assert [(a.kind, a.spent_usd) for a in alerts] == [
        ("call_cap_warning", pytest.approx(0.0008148, abs=1e-12)),
        ("call_cap", pytest.approx(0.0010185, abs=1e-12))]
    # One booking over both: the cap alone is reported.
    jump = SpendLedger(PRICES, BudgetConfig(), clock, default_call_cap_usd=0.0002,
                       cap_warning_share=0.5)
    assert [a.kind for a in jump.record("CA2", llm_usage()).alerts] == ["call_cap"]


def test_bookings_go_to_the_budget_whose_limit_is_reported_once_per_utc_day() -> None:
    clock = Clock(datetime(2026, 11, 24, 23, 59, 0, tzinfo=UTC))
    spend = SpendLedger(PRICES, BudgetConfig(daily_usd=0.01, monthly_usd=1000.0), clock)
    changes: list[BudgetChange] = []
    spend.budget.on_change = changes.append
    tts = Usage("elevenlabs", "tts", "eleven_flash_v2_5", characters=100)  # $0.005

    def reached() -> list[str]:
        """The limits this booking reached (the budget reports each change once)."""
        before = len(changes)
        assert spend.record("CA1", tts).alerts == []  # no call cap here
        return [c.limit for c in changes[before:] if c.new == "degraded"]

    assert reached() == []  # 0.005
    assert reached() == ["daily"]  # 0.010: reached
    assert reached() == []  # 0.015: already reported today
    assert spend.today_usd == pytest.approx(0.015)
    clock.now = datetime(2026, 11, 25, 0, 0, 30, tzinfo=UTC)
    assert spend.today_usd == 0.0
    assert reached() == []  # new day: 0.005, and the limit lifted
    assert (changes[-1].old, changes[-1].new) == ("degraded", "ok")
    assert reached() == ["daily"]  # 0.010 on the new day
    assert changes[-1].period == "2026-11-25"
    assert spend.day_usd(date(2026, 11, 24)) == pytest.approx(0.015)
    assert spend.month_to_date_usd == pytest.approx(0.025)


def test_a_refused_call_books_its_first_phone_minute() -> None:
    clock = Clock(datetime(2026, 11, 24, 12, 0, tzinfo=UTC))
    spend = SpendLedger(PRICES, BudgetConfig(), clock)
    update = spend.turned_away("CA9")
    assert (update.entry.kind, update.entry.call_sid) == ("phone", "CA9")
    assert Decimal(str(update.entry.cost_usd)) == Decimal("0.0085")
    assert spend.today_usd == pytest.approx(0.0085) and spend.active_calls == []


def test_monthly_projection_and_monthly_alert() -> None:
    # Half of November (30 days) elapsed, $10 spent this month -> $20 projected.
    clock = Clock(datetime(2026, 11, 16, 0, 0, tzinfo=UTC))
    spend = SpendLedger(PRICES, BudgetConfig(daily_usd=0.0, monthly_usd=10.01), clock)
    changes: list[BudgetChange] = []
    spend.budget.on_change = changes.append
    spend.budget.totals.seed({date(2026, 10, 31): 100.0, date(2026, 11, 1): 4.0,
                              date(2026, 11, 10): 6.0})  # as the history seeds it
    assert spend.month_to_date_usd == pytest.approx(10.0)
    assert spend.monthly_projection_usd == pytest.approx(20.0)
    spend.record(None, Usage("elevenlabs", "tts", "eleven_flash_v2_5",
                             characters=200))  # $0.01 -> $10.01
    assert [(c.new, c.limit, c.period) for c in changes] == [("degraded", "monthly", "2026-11")]
    spend.record(None, llm_usage())
    assert len(changes) == 1
    # Start of a month: elapsed is floored at one hour, not divided by ~0.
    clock.now = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    spend.record(None, Usage("elevenlabs", "tts", "eleven_flash_v2_5", characters=200))
    assert spend.monthly_projection_usd == pytest.approx(0.01 * 31 * 24, rel=1e-9)
    clock.now += timedelta(days=31)
    assert spend.monthly_projection_usd == 0.0


def test_two_price_llm_entry_and_negative_usage() -> None:
    table = PriceTable(prices_with(ModelPrice(
        provider="openai", model="local-70b", unit=BillingUnit.TOKENS, input_per_1m=0.5,
        output_per_1m=1.5)))
    # no cached price listed: cached tokens cost the input price; 1000 * 0.5 + 100 * 1.5
    usage = Usage("openai", "llm", "local-70b", input_tokens=1000, cached_input_tokens=400,
                  output_tokens=100)
    assert table.cost_decimal(usage) == (Decimal("0.00065"), True)
    bad = Usage("openai", "llm", "local-70b", input_tokens=-1000)
    assert table.cost_decimal(bad) == (Decimal(0), False)
