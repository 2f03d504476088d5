"""The business report over a history written through CallHistory, checked by hand."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.config import PricesConfig
from engine.providers.base import Usage
from engine.record.database import HistoryError
from engine.record.history import CallHistory
from engine.record.report import DAYS_PER_MONTH, build_report, parse_since, render_report
from engine.session.records import TurnRecord, TurnTimings

NOW = datetime(2027, 3, 31, 12, 0, tzinfo=UTC)
PRICES = PricesConfig(realtime_audio_in=10.0, realtime_audio_cached_in=0.30,
                      realtime_audio_out=20.0, realtime_caller_tokens_per_minute=600.0,
                      realtime_agent_tokens_per_minute=1200.0)


def turn(idx: int, caller_s: float, agent_s: float, v2v: float, cached: bool = False
         ) -> TurnRecord:
    return TurnRecord(idx=idx, caller_text="q", agent_text="a", heard_text="a", cached=cached,
                      caller_audio_s=caller_s, agent_audio_s=agent_s,
                      timings=TurnTimings(voice_to_voice=v2v))


async def write_history(db: Path) -> None:
    h = CallHistory(db, engine_id="e1")
    await h.open()
    old = (NOW - timedelta(days=40)).timestamp()  # outside a 30-day window
    await h.call_started("CAold", started_at=old)
    await h.usage_recorded("CAold", Usage("openai", "llm", "gpt-4o-mini"), 1.0, at=old + 1)
    await h.call_ended("CAold", "hangup", 1.0, ended_at=old + 30)

    t = (NOW - timedelta(days=5)).timestamp()
    await h.call_started("CA_A", "+1", "+2", started_at=t)
    await h.turn_completed("CA_A", turn(0, 6.0, 3.0, 0.8), at=t + 20)
    await h.turn_completed("CA_A", turn(1, 12.0, 6.0, 1.2, cached=True), at=t + 60)
    await h.usage_recorded("CA_A", Usage("openai", "llm", "gpt-4o-mini"), 0.001, at=t + 15)
    await h.usage_recorded("CA_A", Usage("openai", "stt", "whisper-1"), 0.0004, at=t + 10)
    await h.action_recorded("CA_A", "policy", "handoff", escalation=True, at=t + 100)
    await h.phone_recorded("CA_A", 120.0, 0.017, at=t + 120)
    await h.call_ended("CA_A", "transferred", 0.0184, ended_at=t + 120)

    await h.call_started("CA_B", started_at=t + 1000)
    await h.turn_completed("CA_B", turn(0, 3.0, 6.0, 2.0), at=t + 1020)
    await h.usage_recorded("CA_B", Usage("elevenlabs", "tts", "eleven_flash_v2_5"), 0.0005,
                           at=t + 1015)
    await h.phone_recorded("CA_B", 60.0, 0.0085, at=t + 1060)
    await h.call_ended("CA_B", "hangup", 0.009, ended_at=t + 1060)
    # spend outside any call, inside the window
    await h.usage_recorded(None, Usage("openai", "llm", "gpt-4o-mini"), 0.0001, at=t + 50)
    await h.aclose()


async def test_report_figures(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    await write_history(db)
    r = build_report(db, timedelta(days=30), now=NOW, prices=PRICES)
    assert r.calls == 2 and r.calls_in_progress == 0 and r.calls_ended_unexpectedly == 0
    assert r.total_minutes == pytest.approx(3.0)
    assert r.avg_duration_s == pytest.approx(90.0)
    assert r.cost_by_kind == pytest.approx({"llm": 0.0011, "phone": 0.0255, "stt": 0.0004,
                                            "tts": 0.0005})
    assert r.total_cost_usd == pytest.approx(0.0275)
    assert r.ai_cost_usd == pytest.approx(0.002)
    assert r.cost_per_call_usd == pytest.approx(0.0275 / 2)
    assert r.cost_per_minute_usd == pytest.approx(0.0275 / 3)
    # history began before the window: the full 30 days count
    assert r.monthly_projection_usd == pytest.approx(0.0275 / 30 * DAYS_PER_MONTH)
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


async def test_projection_when_history_starts_inside_window(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    h = CallHistory(db)
    await h.open()
    t = (NOW - timedelta(days=2)).timestamp()
    await h.call_started("CA1", started_at=t)
    await h.usage_recorded("CA1", Usage("openai", "llm", "gpt-4o-mini"), 0.1, at=t + 1)
    await h.call_ended("CA1", "hangup", 0.1, ended_at=t + 60)
    await h.aclose()
    r = build_report(db, timedelta(days=30), now=NOW)
    assert r.monthly_projection_usd == pytest.approx(0.1 / 2 * DAYS_PER_MONTH)


async def test_empty_window_and_unitemized_cost(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    h = CallHistory(db)
    await h.open()
    t = (NOW - timedelta(hours=1)).timestamp()
    await h.call_started("CA1", started_at=t)
    await h.call_ended("CA1", "hangup", 0.25, ended_at=t + 30)  # cost without usage rows
    await h.aclose()
    r = build_report(db, timedelta(hours=2), now=NOW)
    assert r.cost_by_kind == {"unitemized": 0.25} and r.total_cost_usd == 0.25
    assert r.realtime_saving_pct is None and r.cache_hit_rate is None
    empty = build_report(db, timedelta(minutes=30), now=NOW)
    assert empty.calls == 0 and empty.total_cost_usd == 0.0 and empty.cost_per_call_usd is None
    assert "Calls answered" in render_report(empty)


async def test_render_formats(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    await write_history(db)
    r = build_report(db, parse_since("30d"), now=NOW, prices=PRICES)

    data = json.loads(render_report(r, "json"))
    assert data["calls"] == 2 and data["period_end"] == NOW.isoformat()
    assert data["cost_by_kind"]["phone"] == pytest.approx(0.0255)

    rows = list(csv.DictReader(io.StringIO(render_report(r, "csv"))))
    assert len(rows) == 1
    assert rows[0]["calls"] == "2"
    assert float(rows[0]["cost_phone_usd"]) == pytest.approx(0.0255)
    assert float(rows[0]["total_cost_usd"]) == pytest.approx(0.0275)

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
