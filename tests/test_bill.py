"""The itemised bill in the history: every booking of a real engine call leaves its cost
lines (speech-to-text, agent, voice, phone and media-stream minutes, cache hits), they add
up to the call's total and to the vendors' own bills, and a booking that arrives after
the call's end joins the call's total. And the cost bench runs."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from engine.bus import events as ev
from engine.config import Config
from engine.hub import OpsHub
from engine.money.prices import PriceTable
from engine.providers.base import Usage
from engine.record.bill import BillLine
from engine.record.history import CallHistory
from engine.session.call_session import CallSession
from engine.sim.scenario import Scenario, Step
from engine.sim.standins.elevenlabs_api import ElevenLabsStandin
from engine.sim.standins.openai_api import OpenAIStandin
from engine.wiring import build_engine
from tests.harness import EventLog, base_sections, running_engine
from tests.test_billing import _Control, _end_stream, _Player, dec

QUESTION = "How much does the premium plan cost?"
ANSWER = ("The Premium plan is 45 dollars a month. It comes with unlimited data and calls, "
          "and you can cancel at any time.")
NANO_USD = Decimal("0.000000001")
ROOT = Path(__file__).resolve().parent.parent


def total(lines: list[BillLine]) -> Decimal:
    return sum((dec(line.amount) for line in lines), Decimal(0))


@pytest.mark.slow
async def test_a_real_call_leaves_every_line_of_its_bill_in_the_history(
        tmp_path: Path) -> None:
    openai, eleven = OpenAIStandin(api_key="sk-test"), ElevenLabsStandin(api_key="xi-test")
    oa_url, el_url = await openai.start(), await eleven.start()
    openai.transcript = QUESTION
    openai.reply = ANSWER
    sections = base_sections()
    sections["providers"] = {
        "stt": ["openai"], "agent": ["openai", "faq"], "tts": ["elevenlabs"],
        "openai": {"api_key": "sk-test", "base_url": oa_url},
        "elevenlabs": {"api_key": "xi-test", "base_url": el_url}}
    sections["cache"] = {"backend": "memory"}
    try:
        async with running_engine(
                tmp_path, make_engine=lambda c: build_engine(c, supervisor_api=False),
                **sections) as run:
            events = EventLog(run)
            # The same question twice: the second call is answered from the answer cache
            # and spoken from the audio cache (the greeting too).
            calls = [run.caller(), run.caller()]
            for caller in calls:
                result = await asyncio.wait_for(caller.run(Scenario(
                    name="ask", steps=[Step(say=QUESTION)])), 60)
                assert result.error is None
            deps = run.engine.deps
            for chain in (deps.stt, deps.agent, deps.tts):
                await chain.settle_abandoned(20.0)
            await run.engine.hub.drain()
            history = run.engine.hub.history
            assert isinstance(history, CallHistory)
            bills = [await history.bill(c.call_sid) for c in calls]
            stored = [await history.get_call(c.call_sid) for c in calls]
            await events.close()
    finally:
        await openai.stop()
        await eleven.stop()

    prices = run.config.prices
    table = PriceTable(prices)
    first, second = bills
    # Every kind of booking has its lines, each line its price and amount.
    assert {line.item for line in first} == {"stt", "agent", "voice", "phone", "media_stream"}
    assert all(abs(line.amount - line.unit_price * line.quantity) < 1e-9 for line in first)
    twilio = Counter((line.item, line.unit, line.quantity, line.unit_price)
                     for bill in bills for line in bill if line.provider == "twilio")
    assert twilio == {("phone", "phone minute", 1.0, prices.twilio_per_minute): 2,
                      ("media_stream", "media stream minute", 1.0,
                       prices.twilio_media_streams_per_minute): 2}

    # The vendors' bills, line by line: what OpenAI and ElevenLabs say they charged.
    chats = [u for u in openai.bill() if u.kind == "llm"]
    assert len(chats) == 1  # the second call never reached the LLM
    chat = chats[0]
    agent = {line.unit: line.quantity for line in first if line.item == "agent"}
    assert agent["1M output tokens"] * 1e6 == pytest.approx(chat.output_tokens)
    assert (agent.get("1M input tokens", 0) + agent.get("1M cached input tokens", 0)) * 1e6 \
        == pytest.approx(chat.input_tokens)
    heard = sum(u.audio_seconds for u in openai.bill() if u.kind == "stt")
    stt = [line for bill in bills for line in bill if line.item == "stt"]
    assert sum(line.quantity for line in stt) * 60 == pytest.approx(heard)
    characters = sum(line.quantity for bill in bills for line in bill
                     if line.item == "voice" and not line.cached) * 1000
    assert characters == pytest.approx(sum(u.characters for u in eleven.bill()))
    vendors = sum((table.cost_decimal(u)[0] for u in openai.bill() + eleven.bill()),
                  Decimal(0))
    minutes = 2 * (dec(prices.twilio_per_minute) + dec(prices.twilio_media_streams_per_minute))
    assert abs(total(first) + total(second) - (vendors + minutes)) < Decimal("0.000001")

    # The second call: the answer and its audio from the caches, on the bill at $0.
    hits = [line for line in second if line.cached]
    assert {line.item for line in hits} == {"agent", "voice"}
    assert all(line.amount == 0 and line.unit == "cache hit (not billed)" for line in hits)
    assert not [line for line in second if line.item in ("agent", "voice") and line.amount]

    # Each call's stored total is the sum of its lines and what the engine reported.
    for caller, bill, call in zip(calls, bills, stored, strict=True):
        ended = next(e for e in events.events
                     if isinstance(e, ev.CallEnded) and e.call_sid == caller.call_sid)
        assert call is not None and call.cost_usd is not None
        assert abs(dec(call.cost_usd) - total(bill)) < NANO_USD
        assert abs(dec(ended.cost_usd) - total(bill)) < NANO_USD
        assert all(line.call_sid == caller.call_sid and line.usage_id for line in bill)


async def test_usage_booked_after_the_end_joins_the_calls_total(tmp_path: Path) -> None:
    config = Config()
    history = CallHistory(tmp_path / "h.sqlite3")
    await history.open()
    hub = OpsHub.from_config(config, history)
    hub.publish = lambda event: None  # type: ignore[method-assign]
    session = CallSession("CA" + "d" * 32, config, tts=None, control=_Control(),  # type: ignore[arg-type]
                          observer=hub)
    hub.call_created(session)
    session.created_at = time.time() - 61.0  # answered 61 s ago: two phone minutes
    session.attach_stream("MZ1", _Player(), _end_stream)
    session.book(Usage("openai", "stt", "gpt-transcribe", audio_seconds=3.0))
    await session.end("caller hung up")
    # A reply read on in the background for its usage, finished after the end.
    late = Usage("openai", "llm", "gpt-5.4-mini", input_tokens=1200, cached_input_tokens=1024,
                 output_tokens=40)
    session.book(late)
    await hub.drain()
    call = await history.get_call(session.call_sid)
    bill = await history.bill(session.call_sid)
    await history.aclose()

    table = PriceTable(config.prices)
    prices = config.prices
    expected = (table.cost_decimal(Usage("openai", "stt", "gpt-transcribe",
                                         audio_seconds=3.0))[0]
                + table.cost_decimal(late)[0] + 2 * dec(prices.twilio_per_minute)
                + dec(prices.twilio_media_streams_per_minute))
    assert call is not None and call.ended_at is not None
    assert abs(dec(call.cost_usd or 0.0) - expected) < NANO_USD
    assert abs(total(bill) - expected) < NANO_USD
    assert [(line.item, line.unit) for line in bill if line.item == "agent"] == [
        ("agent", "1M input tokens"), ("agent", "1M cached input tokens"),
        ("agent", "1M output tokens")]
    assert sorted((line.item, line.quantity) for line in bill if line.provider == "twilio") \
        == [("media_stream", 1.0), ("phone", 2.0)]


@pytest.mark.slow
async def test_the_cost_bench_runs_in_its_quick_mode() -> None:
    """bench/bench_cost.py --quick: the default cloud profile through one scenario."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "bench_cost.py"), "--quick", "--json-only",
        cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    rows = {row["profile"]: row for row in result["profiles"]}
    assert set(rows) == {"default", "realtime"} and result["scenarios"] == ["opening-hours"]
    default = rows["default"]
    assert default["calls"] == 1 and default["turns"] >= 2 and not default["errors"]
    split = default["per_minute_by_item_usd"]
    assert all(split[item] > 0 for item in ("stt", "agent", "voice", "phone", "media_stream"))
    assert sum(split.values()) == pytest.approx(default["all_in_per_minute_usd"])
    assert split["stt"] + split["agent"] + split["voice"] == pytest.approx(
        default["ai_per_minute_usd"])
    assert rows["realtime"]["ai_per_minute_usd"] > 0
    assert [(t["profile"], t["figure"]) for t in result["targets"]] == [
        ("default", "ai"), ("default", "all_in")]
