"""The business report over a history written through CallHistory, checked by hand: the
split per item, call and call-minute, the projection, the Realtime comparison, and the
lines json and csv carry."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from engine.config import PricesConfig
from engine.money.prices import ITEMS, CostLine, PriceTable
from engine.providers.base import Usage
from engine.record.database import HistoryError
from engine.record.history import CallHistory
from engine.record.report import build_report, parse_since, render_report
from engine.session.records import TurnRecord, TurnTimings
from tests.history_backends import HistoryBackend

NOW = datetime(2027, 3, 31, 12, 0, tzinfo=UTC)
PRICES = PricesConfig(realtime_audio_in=10.0, realtime_audio_cached_in=0.30,
                      realtime_audio_out=20.0, realtime_caller_tokens_per_minute=600.0,
                      realtime_agent_tokens_per_minute=1200.0)


def turn(idx: int, caller_s: float, agent_s: float, v2v: float, cached: bool = False
         ) -> TurnRecord:
    return TurnRecord(idx=idx, caller_text="q", agent_text="a", heard_text="a", cached=cached,
                      caller_audio_s=caller_s, agent_audio_s=agent_s,
                      timings=TurnTimings(voice_to_voice=v2v))


def costing(usage: Usage, usd: str) -> list[CostLine]:
    """`usage` as one line of `usd` (the figures below are chosen, not priced)."""
    item = ITEMS[usage.kind]
    return [CostLine(item, usage.provider, usage.model, Decimal(1), "request", Decimal(usd),
                     Decimal(usd))]


async def write_history(h: CallHistory) -> None:
    await h.open()
    old = (NOW - timedelta(days=40)).timestamp()  # outside a 30-day window
    await h.call_started("CAold", started_at=old)
    llm = Usage("openai", "llm", "gpt-4o-mini")
    await h.usage_recorded("CAold", llm, costing(llm, "1.0"), at=old + 1)
    await h.call_ended("CAold", "hangup", 1.0, ended_at=old + 30)

    t = (NOW - timedelta(days=5)).timestamp()
    await h.call_started("CA_A", "+1", "+2", started_at=t)
    await h.turn_completed("CA_A", turn(0, 6.0, 3.0, 0.8), at=t + 20)
    await h.turn_completed("CA_A", turn(1, 12.0, 6.0, 1.2, cached=True), at=t + 60)
    await h.usage_recorded("CA_A", llm, costing(llm, "0.001"), at=t + 15)
    stt = Usage("openai", "stt", "whisper-1")
    await h.usage_recorded("CA_A", stt, costing(stt, "0.0004"), at=t + 10)
    await h.action_recorded("CA_A", "policy", "handoff", escalation=True, at=t + 100)
    await h.minutes_recorded("CA_A", "phone", "voice", 2, Decimal("0.0085"), 120.0, at=t + 120)
    await h.call_ended("CA_A", "transferred", 0.0184, ended_at=t + 120)

    await h.call_started("CA_B", started_at=t + 1000)
    await h.turn_completed("CA_B", turn(0, 3.0, 6.0, 2.0), at=t + 1020)
    tts = Usage("elevenlabs", "tts", "eleven_flash_v2_5")
    await h.usage_recorded("CA_B", tts, costing(tts, "0.0005"), at=t + 1015)
    await h.minutes_recorded("CA_B", "phone", "voice", 1, Decimal("0.0085"), 60.0, at=t + 1060)
    await h.call_ended("CA_B", "hangup", 0.009, ended_at=t + 1060)
    # spend outside any call, inside the window
    await h.usage_recorded(None, llm, costing(llm, "0.0001"), at=t + 50)
    await h.aclose()


async def test_report_figures(history_backend: HistoryBackend) -> None:
    await write_history(history_backend.make(engine_id="e1"))
    r = await history_backend.report(timedelta(days=30), now=NOW, prices=PRICES)
    assert r.calls == 2 and r.calls_in_progress == 0 and r.calls_ended_unexpectedly == 0
    assert r.total_minutes == pytest.approx(3.0)
    assert r.avg_duration_s == pytest.approx(90.0)
    assert {item: split.usd for item, split in r.cost_by_item.items()} == pytest.approx(
        {"stt": 0.0004, "agent": 0.0011, "voice": 0.0005, "phone": 0.0255, "media_stream": 0})
    assert r.total_cost_usd == pytest.approx(0.0275)
    assert r.ai_cost_usd == pytest.approx(0.002)
    assert r.cost_per_call_usd == pytest.approx(0.0275 / 2)
    assert r.cost_per_minute_usd == pytest.approx(0.0275 / 3)
    # history began before the window: the last 7 days' average, times March's 31 days
    assert r.projection_days == 7 and r.projection_month_days == 31
    assert r.monthly_projection_usd == pytest.approx(0.0275 / 7 * 31)
    assert r.escalations == 1 and r.escalation_rate == 0.5
    assert r.turns == 3 and r.cached_turns == 1
    assert r.cache_hit_rate == pytest.approx(1 / 3)
    assert r.avg_voice_to_voice_s == pytest.approx((0.8 + 1.2 + 2.0) / 3)
    assert r.p95_voice_to_voice_s == 2.0
    # Realtime, by hand: call A 1800 + 3636, call B (30 tokens in, 120 out) 300 + 2400,
    # all per 1M tokens -> $0.008136
    assert r.realtime_equivalent_usd == pytest.approx(0.008136)
    assert r.realtime_saving_usd == pytest.approx(0.008136 - 0.002)
    assert r.realtime_saving_pct == pytest.approx((0.008136 - 0.002) / 0.008136 * 100)


async def test_projection_when_history_starts_inside_window(
        history_backend: HistoryBackend) -> None:
    h = history_backend.make()
    await h.open()
    t = (NOW - timedelta(days=2)).timestamp()
    await h.call_started("CA1", started_at=t)
    llm = Usage("openai", "llm", "gpt-4o-mini")
    await h.usage_recorded("CA1", llm, costing(llm, "0.1"), at=t + 1)
    await h.call_ended("CA1", "hangup", 0.1, ended_at=t + 60)
    await h.aclose()
    r = await history_backend.report(timedelta(days=30), now=NOW)
    assert r.projection_days == pytest.approx(2)
    assert r.monthly_projection_usd == pytest.approx(0.1 / 2 * 31)


async def test_empty_window_and_unitemized_cost(history_backend: HistoryBackend) -> None:
    h = history_backend.make()
    await h.open()
    t = (NOW - timedelta(hours=1)).timestamp()
    await h.call_started("CA1", started_at=t)
    await h.call_ended("CA1", "hangup", 0.25, ended_at=t + 30)  # cost without usage rows
    await h.aclose()
    r = await history_backend.report(timedelta(hours=2), now=NOW)
    assert {item: split.usd for item, split in r.cost_by_item.items() if split.usd} == {
        "unitemized": 0.25} and r.total_cost_usd == 0.25
    assert r.realtime_saving_pct is None and r.cache_hit_rate is None
    empty = await history_backend.report(timedelta(minutes=30), now=NOW)
    assert empty.calls == 0 and empty.total_cost_usd == 0.0 and empty.cost_per_call_usd is None
    assert "Calls answered" in render_report(empty)


async def test_render_formats(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    await write_history(CallHistory(db, engine_id="e1"))
    r = build_report(db, parse_since("30d"), now=NOW, prices=PRICES)

    data = json.loads(render_report(r, "json"))
    assert data["calls"] == 2 and data["period_end"] == NOW.isoformat()
    assert data["cost_by_item"]["phone"]["usd"] == pytest.approx(0.0255)

    # csv: one row per cost line of the window (the old call's are outside it)
    rows = list(csv.DictReader(io.StringIO(render_report(r, "csv"))))
    assert len(rows) == 6
    assert sum(float(row["amount_usd"]) for row in rows) == pytest.approx(0.0275)
    assert sum(float(row["amount_usd"]) for row in rows if row["item"] == "phone") == \
        pytest.approx(0.0255)

    table = render_report(r, "table")
    assert "last 30 days" in table
    assert "Calls answered" in table and "Projected monthly bill" in table
    assert re.search(r"Handed to a person\s+1 \(50\.0%\)", table)
    assert f"({(0.008136 - 0.002) / 0.008136 * 100:.1f}%)" in table
    assert "$0.0275" in table
    with pytest.raises(ValueError, match="unknown report format"):
        render_report(r, "xml")  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [
    ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("90m", timedelta(minutes=90)),
    (" 2w ", timedelta(weeks=2)), ("1.5d", timedelta(hours=36)), ("7D", timedelta(days=7)),
])
def test_parse_since(text: str, expected: timedelta) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "-5d", "0h", "5x", "thirty days", "5 d h"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 30d|greater than zero"):
        parse_since(text)


def test_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="not found"):
        build_report(tmp_path / "nope.sqlite3", timedelta(days=1), now=NOW)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(HistoryError):
        build_report(junk, timedelta(days=1), now=NOW)


async def test_the_itemised_bill_split_per_call_and_minute_with_every_line(
        history_backend: HistoryBackend) -> None:
    """Lines priced by the real price table: a transcription, an LLM call, an estimated
    voice, an unpriced model (allowed to run), cache hits, Twilio's minutes."""
    table = PriceTable(PricesConfig())
    unpriced = Usage("openai", "llm", "gpt-9-preview", input_tokens=500, output_tokens=20)
    booked = [
        ("CA1", Usage("openai", "stt", "gpt-transcribe", audio_seconds=30.0)),  # $0.00225
        ("CA1", Usage("openai", "llm", "gpt-5.4-mini", input_tokens=2000,
                      cached_input_tokens=1024, output_tokens=100)),
        ("CA1", Usage("openai", "tts", "gpt-4o-mini-tts", input_tokens=30,
                      output_tokens=250, estimated=True)),
        ("CA2", Usage("answer-cache", "llm", "gpt-5.4-mini", cached=True)),
        ("CA2", Usage("elevenlabs", "tts", "eleven_flash_v2_5", cached=True)),
        ("CA2", Usage("elevenlabs", "tts", "eleven_flash_v2_5", characters=120)),
        ("CA2", unpriced)]
    h = history_backend.make()
    await h.open()
    t = (NOW - timedelta(hours=3)).timestamp()
    for i, sid in enumerate(("CA1", "CA2")):
        await h.call_started(sid, started_at=t + 1000 * i)
    for i, (sid, usage) in enumerate(booked):
        await h.usage_recorded(sid, usage, table.cost_lines(usage), at=t + 10 + i)
    await h.minutes_recorded("CA1", "phone", "voice", 2, Decimal("0.0085"), 90.0, at=t + 90)
    await h.minutes_recorded("CA1", "media_stream", "media_stream", 2, Decimal("0.004"), 88.0,
                             at=t + 90)
    await h.minutes_recorded("CA2", "phone", "voice", 1, Decimal("0.0085"), 30.0, at=t + 1030)
    await h.minutes_recorded("CA2", "media_stream", "media_stream", 1, Decimal("0.004"), 29.0,
                             at=t + 1030)
    await h.call_ended("CA1", "hangup", 0.0, ended_at=t + 90, duration_s=90.0)
    await h.call_ended("CA2", "hangup", 0.0, ended_at=t + 1030, duration_s=30.0)
    stored = [line for sid in ("CA1", "CA2") for line in await h.bill(sid)]
    await h.aclose()
    assert table.unpriced_models == {"llm:openai:gpt-9-preview"}

    r = await history_backend.report(timedelta(days=1), now=NOW, prices=PRICES)
    priced = {item: sum((line.amount for _, usage in booked
                         for line in table.cost_lines(usage) if line.item == item), Decimal(0))
              for item in ("stt", "agent", "voice")}
    expected = {**{k: float(v) for k, v in priced.items()},
                "phone": 3 * 0.0085, "media_stream": 3 * 0.004}
    assert {k: s.usd for k, s in r.cost_by_item.items()} == pytest.approx(expected)
    # Two calls, 2 minutes of talk time.
    assert r.total_minutes == pytest.approx(2.0)
    for item, usd in expected.items():
        assert r.cost_by_item[item].per_call_usd == pytest.approx(usd / 2)
        assert r.cost_by_item[item].per_minute_usd == pytest.approx(usd / 2.0)
    ai = sum(float(priced[item]) for item in ("stt", "agent", "voice"))
    assert r.ai_cost_usd == pytest.approx(ai)
    assert r.ai_cost_per_minute_usd == pytest.approx(ai / 2.0)
    assert r.total_cost_usd == pytest.approx(sum(expected.values()))
    assert r.cost_per_minute_usd == pytest.approx(sum(expected.values()) / 2.0)
    # The estimated voice is counted, and so are the unpriced model's lines.
    voice_estimate = float(sum((line.amount for line in table.cost_lines(booked[2][1])),
                               Decimal(0)))
    assert voice_estimate > 0 and r.estimated_lines == 2
    assert r.estimated_usd == pytest.approx(voice_estimate)
    assert r.unpriced_lines == 2 and r.unpriced_models == ["openai gpt-9-preview"]
    # Answer and audio cache: one hit among the agent's two requests (the unpriced one is
    # the other), one among the three voice requests.
    assert (r.answer_cache_hits, r.agent_requests) == (1, 3)
    assert (r.audio_cache_hits, r.voice_requests) == (1, 3)

    table_text = render_report(r, "table")
    for shown in ("Speech-to-text", "Agent (language model)", "Voice (text-to-speech)",
                  "Phone line (Twilio)", "Media Streams (Twilio)", "per call-minute",
                  "2 lines (openai gpt-9-preview)", f"${voice_estimate:.4f} in 2 lines",
                  "re-billed as cached input ($0.30 per 1M) every turn",
                  "600 audio tokens a minute in at $10.00 per 1M",
                  "system prompt is left out, so it understates Realtime",
                  "a day over the last 3 hours x 31 days (March 2027)"):
        assert shown in " ".join(table_text.split()), shown

    # json: the figures and every line; csv: one row per line, with a header.
    data = json.loads(render_report(r, "json"))
    assert data["cost_by_item"]["agent"]["per_minute_usd"] == pytest.approx(
        float(priced["agent"]) / 2.0)
    assert [(x["call_sid"], x["item"], x["unit"], x["amount_usd"], x["cached"])
            for x in data["lines"]] == [
        (line.call_sid, line.item, line.unit, line.amount, line.cached)
        for line in sorted(stored, key=lambda line: line.ts)]
    rows = list(csv.DictReader(io.StringIO(render_report(r, "csv"))))
    assert len(rows) == len(stored) == 15
    assert list(rows[0]) == ["call_sid", "booking", "time", "item", "provider", "model",
                             "quantity", "unit", "unit_price_usd", "amount_usd", "estimated",
                             "unpriced", "cached"]
    assert sum(float(row["amount_usd"]) for row in rows) == pytest.approx(r.total_cost_usd)
    assert {row["unit"] for row in rows if row["estimated"] == "True"} == {
        "1M text input tokens", "1M audio output tokens"}
